"""The examples at the end of a subcommand's --help: a first-time user reads `ahpa prepare --help` before any doc, and
an option list says what each option is, not which ones a first command needs. tests/test_docs_commands.py parses
every example as it parses the docs' commands."""

from __future__ import annotations

import argparse


class ExamplesFormatter(argparse.HelpFormatter):
    """argparse's formatter, wrapping the description and the options' help, but keeping the lines of an epilog that
    starts with "examples:" as written (argparse would run the commands together into one paragraph)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def with_examples(*lines: str) -> dict:
    """add_parser's keyword arguments for an epilog of these lines: a command is indented by two spaces (a long one
    continued with a backslash, as in a shell), a comment says what the next command does."""
    return {"epilog": "examples:\n" + "\n".join(lines), "formatter_class": ExamplesFormatter}
