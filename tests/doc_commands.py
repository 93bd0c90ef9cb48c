"""The commands the documentation shows, found as a user copying them reads them: the shell lines of the fenced code
blocks of README.md, CHANGELOG.md, docs/*.md and docs/study/**/README.md, the usage lines at the head of the benchmarks/ scripts
(a Python script's docstring, a shell job's first comments), and the commands quoted in the docs' prose
(`ahpa prepare --levels latent --store-images`: often part of a command, so only their names count).

Each is split as a shell splits it: backslash continuations joined, comments dropped, `&&`, `||`, `;` and `|` cut it
into commands, redirections left out, a variable the block sets (`S=../shared`, `for s in 0 1`) replaced by its
value and any other by its own name (a placeholder: `$OUT` reads OUT). Kept: the commands of `ahpa` (also
`.venv/bin/ahpa`, `python -m ahpa`, `torchrun ... -m ahpa.cli`, `torchrun ... $(which ahpa)`), of a benchmarks/
Python script and of a benchmarks/ shell job. Nothing is run: tests/test_docs_commands.py checks them."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHELL_INFO = {"", "bash", "sh", "shell", "console", "zsh"}  # a fenced block of shell lines (its info string)
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}
REDIRECTIONS = {">", ">>", "<", ">&", "&>", ">|"}  # each takes the next word (a file)
# a usage line in a header: the line starts with the program (prose around it does not)
LAUNCH = re.compile(r"\s*(\S*/)?(ahpa|python[\d.]*|torchrun) |\s*bash (\./)?benchmarks/")
SYNOPSIS = re.compile(r"(^|\s)\[[-A-Z]")  # `[--num N]`, `[LANE ...]`: a usage synopsis, not a command


@dataclass(frozen=True)
class DocCommand:
    file: str  # relative to the repository root
    line: int  # the command's first line in it
    text: str  # the command as written, its continuation lines joined
    # "ahpa", or the script it runs ("benchmarks/study.py", "benchmarks/gpu_job.sh"); "" when no shell splits it
    program: str
    args: tuple[str, ...]  # the program's words
    torchrun: tuple[str, ...] | None  # under torchrun: every word after `torchrun` (its options, then the program's)
    # a synopsis (`[--metrics fd,is,pr]`, `A | B`) or a command quoted in prose: its names count, not its values
    names_only: bool

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


def find(root: Path = ROOT) -> list[DocCommand]:
    """Every command of the documentation and of the benchmarks/ scripts' headers, in file and line order."""
    docs = [root / "README.md", root / "CHANGELOG.md", *sorted((root / "docs").glob("*.md")),
            *sorted((root / "docs").glob("study/**/README.md"))]
    found = [c for path in docs for c in commands_in_markdown(path, root)]
    for path in sorted((root / "benchmarks").glob("*.py")) + sorted((root / "benchmarks").glob("*.sh")):
        lines = header_lines(path.read_text())
        found += _commands(path.relative_to(root).as_posix(), lines, usage_lines_only=True)
    return found


def commands_in_markdown(path: Path, root: Path = ROOT) -> list[DocCommand]:
    name, text = path.relative_to(root).as_posix(), path.read_text()
    blocks = fenced_blocks(text)
    out = [c for info, block in blocks if info in SHELL_INFO for c in _commands(name, block, usage_lines_only=False)]
    fenced = {number for _, block in blocks for number, _ in block}
    for number, line in enumerate(text.splitlines(), 1):
        if number in fenced:
            continue
        for span in re.findall(r"`([^`]+)`", line):
            if LAUNCH.match(span):
                out += _commands(name, [(number, span)], usage_lines_only=False, names_only=True)
    return sorted(out, key=lambda c: c.line)


def fenced_blocks(text: str) -> list[tuple[str, list[tuple[int, str]]]]:
    """(info string's first word, its (line number, line)s) of each fenced block, as CommonMark reads fences: at
    most three spaces before ``` or ~~~, closed by a fence of the same character at least as long and with no info
    string (the fence lines themselves left out)."""
    blocks, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = re.match(r" {0,3}(`{3,}|~{3,})(.*)$", line)
        if fence is None:
            if m and not (m.group(1)[0] == "`" and "`" in m.group(2)):
                fence = m.group(1)
                blocks.append(((m.group(2).split() or [""])[0], []))
        elif m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not m.group(2).strip():
            fence = None
        else:
            blocks[-1][1].append((number, line))
    return blocks


def header_lines(text: str) -> list[tuple[int, str]]:
    """A script's head: a Python module's docstring, or a shell script's first comment lines (`# ` taken off)."""
    lines = text.splitlines()
    if lines and re.match(r'[rb]?"""', lines[0]):
        out = [(1, lines[0].split('"""', 1)[1])]
        if '"""' in out[0][1]:  # a one-line docstring
            return [(1, out[0][1].split('"""', 1)[0])]
        for number, line in enumerate(lines[1:], 2):
            out.append((number, line.split('"""', 1)[0]))
            if '"""' in line:
                break
        return out
    out = []
    for number, line in enumerate(lines, 1):
        if line.startswith("#!"):
            continue
        if not line.startswith("#"):
            break
        out.append((number, line[2:] if line.startswith("# ") else line[1:]))
    return out


def strip_comment(line: str) -> str:
    """The line without its comment: a `#` that starts a word, outside quotes (`a#b` is a word, as in bash)."""
    quote, escaped = None, False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _commands(name: str, lines: list[tuple[int, str]], usage_lines_only: bool,
              names_only: bool = False) -> list[DocCommand]:
    """The commands of consecutive shell lines (a block shares its variables). usage_lines_only: a header's lines,
    where a command starts with its program and prose lies around it."""
    out: list[DocCommand] = []
    variables: dict[str, str] = {}
    joined: list[tuple[int, str, str]] = []  # (first line, as written, code without comments)
    start, raw, code = None, [], ""
    for number, line in lines:
        if start is None and usage_lines_only and not LAUNCH.match(line):
            continue
        part = strip_comment(line).rstrip()
        start = number if start is None else start
        if part.endswith("\\"):  # a continuation (a backslash inside a comment is not one)
            raw.append(part[:-1].strip())
            code += part[:-1] + " "
            continue
        raw.append(line.strip())
        joined.append((start, " ".join(raw), code + part))
        start, raw, code = None, [], ""
    for number, text, line in joined:
        synopsis = bool(SYNOPSIS.search(line))
        names = names_only or synopsis
        try:
            if _sets_variables(_split(line, synopsis=False), variables):
                continue
            line = re.sub(r"\$\(\s*which\s+(\S+)\s*\)", r"\1", line)  # `$(which ahpa)`: the program itself
            commands = _split(_substitute(line, variables), synopsis)
        except ValueError:  # an unclosed quote: prose (a layout block), or a command no shell would run
            if LAUNCH.match(line):
                out.append(DocCommand(name, number, text, "", (), None, names))
            continue
        for words in commands:
            found = program_of(words)
            if found:
                program, args, torchrun = found
                out.append(DocCommand(name, number, text, program, tuple(args), torchrun, names))
    return out


def _substitute(line: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: variables.get(m.group(1), m.group(1)), line)


def _split(line: str, synopsis: bool) -> list[list[str]]:
    """The words of each command of a shell line. A synopsis's `|` separates alternatives and its brackets group
    optional parts: both are left out, and it is one command."""
    if synopsis:
        words = [w.strip("[]") for w in shlex.split(line) if w not in ("|", "...", "...]")]
        return [[w for w in words if w]]
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.commenters, lexer.whitespace_split = "", True
    commands, words, skip = [], [], False
    for word in lexer:
        if skip:
            skip = False
        elif word in REDIRECTIONS:
            skip = True
        elif word in SEPARATORS:
            commands.append(words)
            words = []
        elif word != "...":  # the docs' "and the rest as above"
            words.append(word)
    return [w for w in [*commands, words] if w]


def _sets_variables(commands: list[list[str]], variables: dict[str, str]) -> bool:
    """Records a line that only sets variables: `NAME=VALUE ...` (also after `export`; each value with the variables
    before it in), `for NAME in FIRST ...; do` (its first value), `done`. False, recording nothing, for any other."""
    def sets(words: list[str]) -> bool:
        assigned = words[1:] if words[0] == "export" else words
        return (words[0] == "for" and len(words) >= 4 and words[2] == "in") or words in (["do"], ["done"]) or (
            bool(assigned) and all(re.fullmatch(r"[A-Za-z_]\w*=.*", w) for w in assigned))

    if not commands or not all(sets(words) for words in commands):
        return False
    for words in commands:
        if words[0] == "for":
            variables[words[1]] = words[3]
        elif words not in (["do"], ["done"]):
            for w in words[1:] if words[0] == "export" else words:
                key, _, value = w.partition("=")
                variables[key] = _substitute(value, variables)
    return True


def program_of(words: list[str]) -> tuple[str, list[str], tuple[str, ...] | None] | None:
    """(program, its words, torchrun's words or None) of a command, or None when it runs none of ours. What comes
    before the program (`VAR=1`, `/usr/bin/time -v`, `srun`) is left out."""
    for i, word in enumerate(words):
        name = word.rsplit("/", 1)[-1]
        rest = words[i + 1:]
        if name == "torchrun":
            inner = _module_or_script(rest, torchrun=True)
            return (*inner, tuple(rest)) if inner else None
        if name == "ahpa" or re.fullmatch(r"python[\d.]*", name):
            inner = _module_or_script(words[i:], torchrun=False)
            return (*inner, None) if inner else None
        if name in ("bash", "sh") and rest and re.fullmatch(r"(\./)?benchmarks/\w+\.sh", rest[0]):
            return rest[0].removeprefix("./"), rest[1:], None
    return None


def _module_or_script(words: list[str], torchrun: bool) -> tuple[str, list[str]] | None:
    """("ahpa" or "benchmarks/NAME.py", the words after it) of `ahpa ...`, `python -m ahpa[.cli] ...`,
    `python benchmarks/NAME.py ...`, or of torchrun's words (its options first: `-m ahpa.cli ...`, `PATH/ahpa ...`)."""
    for i, word in enumerate(words):
        if word == "-m" and i + 1 < len(words) and words[i + 1] in ("ahpa", "ahpa.cli"):
            return "ahpa", words[i + 2:]
        if word.rsplit("/", 1)[-1] == "ahpa":
            return "ahpa", words[i + 1:]
        if re.fullmatch(r"(\./)?benchmarks/\w+\.py", word):
            return word.removeprefix("./"), words[i + 1:]
        if not torchrun and i > 0:  # `python -m pytest`, `python -c ...`: not ours
            return None
    return None
