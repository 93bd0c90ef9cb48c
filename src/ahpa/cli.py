"""`ahpa` command line: thin subcommands over the library (each in ahpa.commands.NAME)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = ("train", "sample", "export", "eval", "prepare", "convert", "demo", "vae-train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ahpa", description="Adaptive Hierarchical Prior Alignment for Diffusion Transformers")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"ahpa.commands.{name.replace('-', '_')}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, FloatingPointError, ImportError) as e:
        # expected user-facing errors: one clear message, no traceback
        print(f"ahpa {args.command}: error: {e}", file=sys.stderr)
        return 2


def run() -> None:
    """The process entry point (the `ahpa` script and `python -m ahpa.cli`, as torchrun starts it).

    Under torchrun the process ends with os._exit once the command has returned: by then every file is written
    and closed and the process group destroyed, but gloo's worker threads can still hold finished work whose
    tensors are freed during interpreter finalisation; a thread that wants the GIL then is unwound and the
    process aborts ("terminate called without an active exception", exit -6). It was seen in two CI runs of
    the test suite on a loaded 2-core machine, each time in a 2-process FSDP run that had completed and saved
    everything, once after the barrier in `shutdown` was added. Skipping finalisation keeps the command's own
    exit code.
    """
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
