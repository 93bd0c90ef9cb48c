"""`ahpa` command line: thin subcommands over the library (each in ahpa.commands.NAME)."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys

COMMANDS = ("train", "sample", "export", "eval", "compare", "prepare", "convert", "demo", "vae-train")
DISTRIBUTED = ("train", "sample", "prepare")  # the commands whose processes share the work under torchrun


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ahpa", description="Adaptive Hierarchical Prior Alignment for Diffusion Transformers",
                                     epilog="Start with `ahpa demo` (about 3 minutes on a CPU, no files needed). "
                                     "`ahpa COMMAND --help` shows a command's options and examples; your own images: "
                                     "`ahpa prepare --help`. Docs: README.md and docs/ in the repository")
    parser.add_argument("--version", action=_Versions, help="the versions of ahpa, Python, torch (and its CUDA), the "
                        "installed packages that extend ahpa and the libraries it loads models with, for a bug report")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"ahpa.commands.{name.replace('-', '_')}")
        module.register(sub)
    return parser


def versions() -> str:
    """One line per component: what a bug report needs to reproduce a run's numerics."""
    from importlib import metadata

    import torch

    from ahpa.provenance import environment

    env = environment()
    cuda = f"CUDA {env['cuda']}" if env["cuda"] else "no CUDA build"
    gpus = torch.cuda.device_count() if env["cuda"] else 0
    lines = [f"ahpa {env['ahpa']}" + (f" (checkout at {env['source']})" if env["source"] else ""),
             f"Python {env['python']} ({platform.platform()})", f"torch {env['torch']} ({cuda}, {gpus} GPU(s) visible)",
             f"extensions: {env['extensions'] or 'none installed'} (packages with an ahpa.plugins, ahpa.encoders or "
             "ahpa.external_encoders entry point)"]
    for name in ("numpy", "safetensors", "diffusers", "transformers", "tensorboard", "wandb"):
        try:
            lines.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{name}: not installed")
    return "\n".join(lines)


class _Versions(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(versions() + "\n")  # on stdout, as argparse's own version action prints
        parser.exit()


def parse(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The command line as `ahpa` reads it, running nothing (a bad one exits as argparse does, status 2). `parser`:
    one build_parser() made, to read many command lines (the test of the documentation's commands does)."""
    parser = parser or build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse collects a positional list once: `key=value` overrides after an option (`--out X a.b=1`) are left
    # over; they belong to the command's overrides, in the order given (later wins)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides, extra = [*args.overrides, *extra], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    _show_own_warnings_plainly()
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in DISTRIBUTED:
            # each process would do all the work and write the same files
            raise ValueError(f"ahpa {args.command} runs in one process: run it without torchrun (only "
                             f"{', '.join(DISTRIBUTED)} share their work between processes)")
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        # train saves on SIGINT itself; sample and prepare keep their finished chunks and shards
        _report("interrupted" + ("; rerun the same command to resume" if args.command in DISTRIBUTED else ""))
        return 130
    except (ValueError, OSError, FloatingPointError, ImportError) as e:
        # expected user-facing errors: one clear message, no traceback (AHPA_TRACEBACK=1 prints it)
        if os.environ.get("AHPA_TRACEBACK"):
            import traceback

            traceback.print_exc()
        _report(f"ahpa {args.command}: error: {e}{_raised_outside(e)}")
        return 2


def _show_own_warnings_plainly() -> None:
    """ahpa's own warnings (a skipped file in an evaluation's reference folder) as one line, `ahpa: warning: ...`,
    not as Python shows a warning (file, line number and a line of source); other libraries' as Python shows them."""
    import warnings

    default = warnings.formatwarning
    if getattr(default, "ahpa", False):  # main() called again in this process
        return

    def formatwarning(message, category, filename, lineno, line=None):
        if category.__module__.split(".")[0] == "ahpa":
            return f"ahpa: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    formatwarning.ahpa = True
    warnings.formatwarning = formatwarning


def _report(message: str) -> None:
    """Print a failed command's message on stderr once per launch, not once per process. Under torchrun every
    process writes it to its error file (TORCHELASTIC_ERROR_FILE), which torchrun's summary of the failed processes
    shows for each of them (in place of "To enable traceback see ..."), and rank 0 alone prints it: the processes
    of a launch mostly fail alike (a setting, a path), and a message of one process only is in the summary too.
    Other launchers (no error file): every process prints, naming its rank."""
    rank = int(os.environ.get("RANK", "0"))
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        import json
        import time

        try:  # the format of torch.distributed.elastic's own error files (ErrorHandler.record_exception)
            with open(error_file, "w") as f:
                json.dump({"message": {"message": message, "extraInfo": {
                    "py_callstack": message, "timestamp": str(int(time.time()))}}}, f)
        except OSError:
            error_file = None
    if rank == 0 or not error_file:
        print(f"[rank {rank}] {message}" if rank else message, file=sys.stderr)


def _raised_outside(e: BaseException) -> str:
    """Where an error raised by another library (torch, diffusers) came from: its message alone may not say which
    part of the work failed, and the traceback is not printed."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return ""
    where = tb.tb_frame.f_code.co_filename
    if os.path.dirname(os.path.abspath(__file__)) in os.path.abspath(where):
        return ""
    return f" (raised in {where}:{tb.tb_lineno}; AHPA_TRACEBACK=1 prints the traceback)"


def run() -> None:
    """The process entry point (the `ahpa` script and `python -m ahpa.cli`, as torchrun starts it).

    Under torchrun, train, sample and prepare end their process themselves once they completed
    (ahpa.commands.exit: a barrier, then os._exit, never tearing gloo down). Any other command, or one that
    failed, ends here with os._exit as well, so that interpreter finalisation cannot abort it on the way out
    and the exit code stays the command's.
    """
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ahpa.commands.exit import end_process

        end_process(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
