"""A configuration as YAML with every key's documentation: the comments written beside the fields in
ahpa.config_sections, so that `ahpa train --show-config` is the reference of every setting, and its output a
config file."""

from __future__ import annotations

import dataclasses
import inspect

import yaml

from ahpa.align.methods import declared_settings, settings_in_use
from ahpa.config import CHOICES, OPTIONS, Config


def _one_line(value) -> str:
    # a one-item flow list, brackets dropped: any value on one line ('' quoted, lists as [a, b])
    return yaml.safe_dump([value], default_flow_style=True, width=10**6).strip()[1:-1]


def _options(cfg: Config) -> list[str]:
    """align.options as a block, each setting with its declaration's line: what it does, what it takes, whose it is
    (a setting no extension in use declares is kept, and the run notes it as ignored)."""
    a = cfg.align
    used, declared = settings_in_use(a.method, a.router, a.loss) or {}, declared_settings()
    lines = ["  options:"]
    for name, value in a.options.items():
        setting, owners = used.get(name) or declared.get(name, (None, ["no extension registered here"]))
        owner = owners if isinstance(owners, str) else ", ".join(owners)
        if name not in used:
            owner += "; not used by this run"
        if setting is not None:
            lines.append(f"    # {setting.help} ({setting.allowed()}; {owner})")
        else:
            lines.append(f"    # ({owner})")
        lines.append(f"    {name}: {_one_line(value)}")
    return lines


def field_comments(section_type: type) -> dict[str, list[str]]:
    """{field: comment lines} from a config dataclass's source: the comment block above a field and the comment
    after it, in that order."""
    out: dict[str, list[str]] = {}
    above: list[str] = []
    names = {f.name for f in dataclasses.fields(section_type)}
    for line in inspect.getsource(section_type).splitlines():
        text = line.strip()
        if text.startswith("#"):
            above.append(text[1:].strip())
            continue
        name = text.split(":", 1)[0].strip()
        if name in names:
            after = text.partition("  # ")[2]
            out[name] = above + ([after.strip()] if after else [])
        above = []
    return out


def documented_yaml(cfg: Config) -> str:
    """`cfg` as YAML (every key, defaults filled in), each key preceded by its documentation; loadable by
    ahpa.config.load like any config file."""
    lines = []
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        comments = field_comments(type(sub))
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(sub):
            doc = list(comments.get(f.name, []))
            choices = CHOICES.get(f"{section.name}.{f.name}")
            # the registries' keys (align.method, .router, .loss) have no list in their comments: theirs comes
            # from CHOICES, so that a new method or router mode shows here at once
            if choices and not any("|" in c for c in doc):
                doc.append(" | ".join(choices))
            lines += [f"  # {c}" for c in doc]
            if f"{section.name}.{f.name}" == OPTIONS:
                if getattr(sub, f.name):
                    lines += _options(cfg)
                    continue
                others = [f"{n} ({', '.join(owners)})" for n, (_, owners) in declared_settings().items()]
                if others:
                    lines.append(f"  # declared here, by extensions this run does not use: {', '.join(others)}")
            lines.append(f"  {f.name}: {_one_line(getattr(sub, f.name))}")
        lines.append("")
    return "\n".join(lines)
