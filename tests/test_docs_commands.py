"""Every command the documentation shows parses as written (tests/doc_commands.py finds them), read by the parsers
that would read it, with nothing run: `ahpa`'s (its subcommand, every option spelt in full, values of the right
type, as `ahpa.cli.parse` reads a command line), torchrun's own (it must hand ahpa's words on untouched), `ahpa
train`'s config (the --config preset exists; every `key=value` override names a key, with a value of its type, as
`ahpa.config.load` checks them), a benchmarks/ script's `parser()` (and study.py's methods and variants), a shell
job's (gpu_job.sh's job names; study_gpu_job.sh's lanes are study.py's flags). A failure names the file and line,
the word and what is valid. A capitalised placeholder (`--seed S`, `--num N`) stands for a value of its option's type.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

from ahpa import cli, config
from ahpa.spelling import did_you_mean
from tests import doc_commands
from tests.doc_commands import ROOT, DocCommand

COMMANDS = doc_commands.find()
# torchrun options the docs use that an older torch's torchrun lacks, with the version that has them (docs/imagenet.md
# says to drop them there); the package supports torch >= 2.4
NEWER_TORCHRUN = {"--shutdown-timeout": "torch 2.13"}
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")


@functools.cache
def ahpa_parser() -> argparse.ArgumentParser:
    return cli.build_parser()


def parsed(parse, words: list[str]) -> tuple[object, str | None]:
    """(what parse(words) returns, None), or (None, the message) where it refuses them: argparse's last line on
    stderr, or the message a SystemExit carries."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parse(words), None
    except SystemExit as e:
        if isinstance(e.code, str):  # a script's own SystemExit("message")
            return None, e.code
        lines = err.getvalue().strip().splitlines() or [f"exit {e.code}"]
        return None, lines[-1].partition(" error: ")[2] or lines[-1]  # argparse's message, without its prog


def options(parser: argparse.ArgumentParser) -> list[str]:
    return [o for action in parser._actions for o in action.option_strings]


def unknown_option(words: list[str], parser: argparse.ArgumentParser, what: str) -> str | None:
    """The first word spelt as an option that `what` does not have, with the nearest one and every valid one.
    argparse would take an abbreviation (`--num-s`) for the option it begins: the docs spell options in full."""
    valid = options(parser)
    for word in words:
        if word == "--":
            break
        name = word.split("=", 1)[0]
        if word.startswith("-") and not re.fullmatch(r"-\.?\d.*", word) and name not in valid:
            return f"{name} is not an option of {what}{did_you_mean(name, valid)}; its options: {', '.join(valid)}"
    return None


def filled(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    """The words with a capitalised placeholder given to a number option (`--seed S`) made a number."""
    out = list(words)
    for i, word in enumerate(out):
        name, eq, value = word.partition("=")
        action = parser._option_string_actions.get(name)
        if action is None or action.type not in (int, float):
            continue
        if eq and PLACEHOLDER.fullmatch(value):
            out[i] = f"{name}=1"
        elif not eq and i + 1 < len(out) and PLACEHOLDER.fullmatch(out[i + 1]):
            out[i + 1] = "1"
    return out


def check(cmd: DocCommand) -> str | None:
    """What is wrong with a documented command, or None."""
    if not cmd.program:
        return "no shell can split it (an unclosed quote)"
    if cmd.program == "ahpa":
        if cmd.torchrun is None:
            return check_ahpa(list(cmd.args), cmd.names_only)
        handed, problem = torchrun_hands(cmd)
        return problem or check_ahpa(handed, cmd.names_only)
    if cmd.program.endswith(".py"):
        problem = check_script(cmd.program, list(cmd.args), cmd.names_only)
        if problem or not cmd.names_only or not cmd.args or doc_commands.SYNOPSIS.search(cmd.text):
            return problem
        # quoted in prose with its arguments, a command is copied as it stands: the options its parser requires
        # must be in it (four study.py lines of docs/study-pilot.md lacked --results); a bare name is a mention
        return missing_required(script(Path(cmd.program).stem).parser(), list(cmd.args), cmd.program)
    job = SHELL_JOBS.get(cmd.program)
    if job is None:
        return f"{cmd.program}: no such job (benchmarks/ has {', '.join(sorted(SHELL_JOBS))})"
    return job(list(cmd.args), cmd.names_only)


def torchrun_hands(cmd: DocCommand) -> tuple[list[str], str | None]:
    """(the words torchrun hands ahpa, what is wrong): its parser must hand on every word after the module (a `--`
    before them is its own), but it takes an abbreviation of its own options (`--run` of --run-path) for its own."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    words = list(cmd.torchrun)
    for option in NEWER_TORCHRUN:  # the docs say to drop it where torchrun --help does not list it
        if option in words and option not in options(parser):
            i = words.index(option)
            del words[i : i + 2]
    args, refused = parsed(parser.parse_args, words)
    if refused:
        return [], f"torchrun's own parser refuses it: {refused}"
    handed, given = list(args.training_script_args), list(cmd.args)
    expected = given[1:] if given[:1] == ["--"] else given
    if handed != expected:
        return handed, f"torchrun hands ahpa {handed}, not {expected}"
    return handed, None


def missing_required(parser: argparse.ArgumentParser, words: list[str], what: str) -> str | None:
    """The options `parser` requires that `words` lack (spelt whole or as --opt=value), named, or None."""
    given = {w.partition("=")[0] for w in words}
    lacking = [a.option_strings[-1] for a in parser._actions
               if a.required and a.option_strings and not given & set(a.option_strings)]
    return f"{what} requires {', '.join(lacking)}: add it to the command as quoted" if lacking else None


def check_ahpa(words: list[str], names_only: bool) -> str | None:
    parser = ahpa_parser()
    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    first = next((i for i, w in enumerate(words) if not w.startswith("-")), None)
    if first is None:  # ahpa's own options only (`ahpa --version`, which prints and exits: not parsed)
        return unknown_option(words, parser, "ahpa")
    name, sub = words[first], commands.get(words[first])
    if sub is None:
        return f"`ahpa {name}` is not a command{did_you_mean(name, commands)}; the commands: {', '.join(commands)}"
    problem = unknown_option(words[:first], parser, "ahpa") or unknown_option(words[first + 1:], sub, f"ahpa {name}")
    if problem or names_only:
        return problem
    words = [*words[:first + 1], *filled(sub, words[first + 1:])]
    args, refused = parsed(functools.partial(cli.parse, parser=parser), words)
    if refused:
        return f"ahpa's parser refuses it: {refused}"
    return check_train_config(args) if name == "train" else None


def check_train_config(args: argparse.Namespace) -> str | None:
    """The --config preset exists and the overrides apply to it, as `ahpa train` loads them. A config file that
    is not one of configs/ (my.yaml, a run's config.yaml) is one an earlier command writes: the defaults stand in."""
    path = None
    if args.config:
        given = Path(args.config)
        if (ROOT / given).is_file():
            path = ROOT / given
        elif given.parts[0] == "configs":
            presets = sorted(f"configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml"))
            return (f"--config {args.config}: no such preset{did_you_mean(args.config, presets)}; "
                    f"presets: {', '.join(presets)}")
    try:
        config.load(path, args.overrides, where="command line")
    except config.ConfigError as e:
        return str(e).replace(str(ROOT) + "/", "")
    return None


@functools.cache
def script(name: str):
    """A benchmarks/ script as a module, imported as it runs: with its neighbours (benchlib, ...) importable."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def check_script(program: str, words: list[str], names_only: bool = False) -> str | None:
    name = Path(program).stem
    if not (ROOT / program).is_file():
        return f"{program}: no such script"
    module = script(name)
    if not hasattr(module, "parser"):
        return f"{program} has no parser() function: give it one that returns its ArgumentParser (for main() too)"
    parser = module.parser()
    problem = unknown_option(words, parser, program)
    if problem or names_only:
        return problem
    words = filled(parser, words)
    _, refused = parsed(parser.parse_args, words)
    if refused:
        return f"{program}'s parser refuses it: {refused}"
    return check_study(words) if name == "study" else None


def check_study(words: list[str]) -> str | None:
    """study.py's --methods are its methods, and its --variant items apply to each method's config."""
    study, setup = script("study"), script("study_setup")
    args, refused = parsed(study.parse_args, words)
    if refused:
        return f"benchmarks/study.py refuses it: {refused}"
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        if method not in study.METHODS:
            return (f"--methods {method}: no such method{did_you_mean(method, study.METHODS)}; "
                    f"methods: {', '.join(study.METHODS)}")
        try:
            setup.study_config(args, study.SIZES[args.size], method)
        except config.ConfigError as e:
            return f"--variant of {method}: {e}".replace(str(ROOT) + "/", "")
    return None


def check_gpu_job(words: list[str], names_only: bool) -> str | None:
    """gpu_job.sh JOB [throughput.py flags]: a job of its `case`; the flags override the job's throughput.py ones."""
    jobs = re.findall(r"^    ([a-z0-9-]+)\)", (ROOT / "benchmarks/gpu_job.sh").read_text(), re.MULTILINE)
    job = words[0] if words else "core"
    if job not in jobs:
        return f"benchmarks/gpu_job.sh {job}: no such job{did_you_mean(job, jobs)}; jobs: {', '.join(jobs)}"
    return check_script("benchmarks/throughput.py", ["--size", "gpu", "--out", "OUT.json", *words[1:]], names_only)


def check_study_gpu_job(words: list[str], names_only: bool) -> str | None:
    """study_gpu_job.sh STEPS SEED EVAL_EVERY LANE...: three integers, then each lane's study.py flags, one word."""
    if names_only:  # its synopsis, STEPS SEED EVAL_EVERY LANE [LANE ...]
        return None
    if len(words) < 4 or not all(re.fullmatch(r"\d+", w) for w in words[:3]):
        return "benchmarks/study_gpu_job.sh takes STEPS SEED EVAL_EVERY (integers), then one quoted LANE or more"
    for lane in words[3:]:
        problem = check_script("benchmarks/study.py", [*shlex.split(lane), "--results", "R.jsonl"])
        if problem:
            return f"lane {lane!r}: {problem}"
    return None


SHELL_JOBS = {"benchmarks/gpu_job.sh": check_gpu_job, "benchmarks/study_gpu_job.sh": check_study_gpu_job}


@pytest.mark.parametrize("cmd", COMMANDS, ids=str)
def test_documented_command_parses(cmd):
    problem = check(cmd)
    assert problem is None, f"{cmd}: {cmd.text}\n  {problem}"


def test_the_documentation_is_read():
    """The commands are found where the docs show them, in each form (a finder that found none would pass)."""
    found = {(c.file, c.program, c.torchrun is not None) for c in COMMANDS}
    for where in [("README.md", "ahpa", False), ("README.md", "ahpa", True), ("docs/imagenet.md", "ahpa", True),
                  ("docs/study.md", "benchmarks/study.py", False),
                  ("docs/study.md", "benchmarks/study_gpu_job.sh", False),
                  ("docs/benchmarks.md", "benchmarks/gpu_job.sh", False),
                  ("benchmarks/throughput.py", "benchmarks/throughput.py", False)]:
        assert where in found, where
    overrides = [c for c in COMMANDS if c.program == "ahpa" and any("=" in w and w[0] != "-" for w in c.args)]
    assert len(overrides) >= 10 and len(COMMANDS) >= 80


STALE = """\
Prose quoting `ahpa prepare --levels latent --store-image` (a part of a command: its names are checked).
Prose quoting `python benchmarks/study.py --size pilot --seed 1` without the --results it requires; a bare mention
of `python benchmarks/study_report.py` is no command.

```bash
# a comment that names ahpa train --no-such-flag is not a command
ahpa train --config configs/tiny.yaml --out runs/x train.stpes=10
ahpa train --config configs/tiny.yaml --out runs/x \\
    train.steps=ten
ahpa train --config configs/tinny.yaml --out runs/x
S=runs/a; ahpa sample --run $S --num-sample 10 --out s.npz
torchrun --nproc_per_node 2 -m ahpa.cli sample --run runs/a --num 10 --out s.npz
ahpa sampel --run runs/a
python benchmarks/study.py --size pilot --seed S --methods ahpa-sofft --results R.jsonl
python benchmarks/study.py --size pilot --methods ahpa-soft --variant align.wieght=1.5 --results R.jsonl
bash benchmarks/gpu_job.sh cudagraph
bash benchmarks/study_gpu_job.sh 8000 0 2000 "--methods none --lrr 1e-3"
python benchmarks/throughput.py --size tiny --out x.json --model B/2
ahpa eval s.npz --ref r.npz --detector d [--metric fd]
ahpa train --out 'runs/x
```
"""


def test_stale_commands_are_named_with_the_fix(tmp_path):
    """A doc with a stale flag, key, value, preset, command or job fails, naming its line and what is valid."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.md").write_text(STALE)
    found = doc_commands.commands_in_markdown(tmp_path / "docs" / "x.md", tmp_path)
    problems = {c.line: check(c) for c in found}
    assert problems.pop(3) is None  # a script named without arguments: a mention, not a command to copy
    expected = {
        1: "--store-image is not an option of ahpa prepare (did you mean '--store-images'?)",
        2: "benchmarks/study.py requires --results: add it to the command as quoted",
        7: "unknown config key 'train.stpes' (did you mean 'train.steps'?)",
        8: "train.steps must be an integer",
        10: "--config configs/tinny.yaml: no such preset (did you mean 'configs/tiny.yaml'?)",
        11: "--num-sample is not an option of ahpa sample (did you mean '--num-samples'?)",
        12: "torchrun's own parser refuses it: ",
        13: "`ahpa sampel` is not a command (did you mean 'sample'?)",
        14: "--methods ahpa-sofft: no such method (did you mean 'ahpa-soft'?)",
        15: "--variant 'align.wieght=1.5': expected KEY=VALUE",
        16: "benchmarks/gpu_job.sh cudagraph: no such job (did you mean 'cudagraphs'?)",
        17: "lane '--methods none --lrr 1e-3': --lrr is not an option of benchmarks/study.py (did you mean '--lr'?)",
        18: "--model is not an option of benchmarks/throughput.py (did you mean '--models'?)",
        19: "--metric is not an option of ahpa eval (did you mean '--metrics'?)",
        20: "no shell can split it",
    }
    assert sorted(problems) == sorted(expected), problems
    for line, message in expected.items():
        assert problems[line] and message in problems[line], (line, problems[line])


@pytest.mark.parametrize("name", ["prepare", "train", "sample", "eval", "compare"])
def test_a_commands_help_ends_with_examples_that_parse(name):
    """`ahpa prepare --help` listed options alone: a first-time user with a folder of their own images learnt neither
    which options a first command needs nor where the docs are. Each of the commands of that walk now ends its help with
    examples, checked as the docs' commands are (options, config keys and values, presets)."""
    sub = next(a for a in ahpa_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    text = sub.format_help()
    assert "\nexamples:\n" in text, f"ahpa {name} --help has no examples"
    lines = list(enumerate(text.split("\nexamples:\n", 1)[1].splitlines(), 1))
    found = doc_commands._commands(f"ahpa {name} --help", lines, usage_lines_only=True)
    assert found and all(c.program == "ahpa" and c.args[0] == name for c in found), found
    for cmd in found:
        problem = check(cmd)
        assert problem is None, f"{cmd}: {cmd.text}\n  {problem}"
    assert "More: " in text  # where to read on


def test_gpu_job_names_its_jobs_as_its_case_has_them():
    """gpu_job.sh's answer to an unknown job lists the jobs, and its header shows each with a command line: both are
    read by whoever plans a GPU session, so a job added to the `case` (or renamed) must appear in both."""
    text = (ROOT / "benchmarks/gpu_job.sh").read_text()
    jobs = set(re.findall(r"^    ([a-z0-9-]+)\)", text, re.MULTILINE))
    listed = re.search(r"unknown job \$job \(([^)]*)\)", text).group(1)
    assert {j.strip() for j in listed.split("|")} == jobs
    header = text.split("\nset ")[0]  # the comment block above the script's first command
    shown = set(re.findall(r"^#\s+bash benchmarks/gpu_job\.sh ([a-z0-9-]+)", header, re.MULTILINE))
    assert jobs - shown == set(), f"jobs without a line in the header: {sorted(jobs - shown)}"
