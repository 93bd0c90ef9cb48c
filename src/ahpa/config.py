"""Run configuration read from YAML files and dotted `key=value` overrides into the typed sections of
ahpa.config_sections, and written back.

Strings become checked choices here, once: an unknown key or value fails with the valid names.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from ahpa.align.methods import declared_settings, settings_in_use
from ahpa.plugins import load_plugins
from ahpa.spelling import did_you_mean
from ahpa.config_rules import (ACROSS_KEYS, CHOICES, OPTIONS, RANGES,  # noqa: F401  (CHOICES, RANGES re-exported)
                               choice_hint, named_elsewhere, spec_problem)
# the sections, re-exported: `from ahpa.config import AlignCfg` is how src/, tests and docs name them
from ahpa.config_sections import (AlignCfg, Config, DataCfg, EvalCfg, ModelCfg, PriorCfg,  # noqa: F401
                                  SampleCfg, TrainCfg, TransportCfg)


class ConfigError(ValueError):
    pass


def _section_types(obj: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _coerce(key: str, value: Any, typ: Any, where: str, unresolved: tuple[str, ...] = ()) -> Any:
    """Check/convert one value to the declared type; strings from the command line are parsed as YAML. A key of
    `unresolved` may hold a registered name unknown here (config_rules.named_elsewhere)."""
    if isinstance(value, str) and typ is not str and value != "":
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:  # an unclosed [ or {, say: the value, not YAML's parser state, is the news
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            hint = "; a list is written [a,b] or a,b" if typ is list or typing.get_origin(typ) is list else ""
            raise ConfigError(f"{where}: {key}={value!r} is not a valid value ({problem}){hint}") from None
    origin = typing.get_origin(typ)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    elif typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            span = f" ({RANGES[key][1]})" if key in RANGES else ""  # e.g. -1 (all blocks), 0 (off) or ...
            raise ConfigError(f"{where}: {key} must be an integer{span}, got {value!r}")
    elif typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        value = float(value)
    elif typ is str:
        if not isinstance(value, str):
            value = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
    elif typ is list or origin is list:
        numbers = typing.get_args(typ) == (float,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        elif numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # one number given bare
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        value = [_number(key, v, where) for v in value] if numbers else list(value)
    choices = CHOICES.get(key)
    elsewhere = key in unresolved and named_elsewhere(key, value)
    if choices is not None and value not in choices and not elsewhere:
        raise ConfigError(f"{where}: {key}={value!r} is not valid; valid values: {', '.join(choices)}"
                          f"{choice_hint(key, value, list(choices))}")
    problem = None if elsewhere else spec_problem(key, value)
    if problem:
        raise ConfigError(f"{where}: {key}={value!r} is not valid: {problem}")
    allowed, text = RANGES.get(key, (None, ""))
    if allowed is not None and not allowed(value):
        raise ConfigError(f"{where}: {key}={value!r} is out of range; it must be {text}")
    return value


def _number(key: str, item: Any, where: str) -> float:
    """An item of a list of numbers: `a,b` on the command line gives strings, YAML 1.1 reads 3e-4 as one."""
    try:
        if isinstance(item, bool):
            raise ValueError
        return float(item)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key} must be a list of numbers, got the item {item!r}") from None


def _apply_option(cfg: Config, name: str, value: Any, where: str, unresolved: tuple[str, ...],
                  parsed: bool = False) -> None:
    """align.options.NAME=VALUE: a setting a registered method, loss or router mode declares (ahpa.align.settings),
    checked against its declaration. With OPTIONS in `unresolved` (a run's config read to sample or export), a name
    no extension here declares is kept as written: its package may be missing here, and the SiT needs none. `parsed`:
    the value is YAML's already (an item of a mapping), not a command line's string."""
    key = f"{OPTIONS}.{name}"
    declared = declared_settings()
    if name in declared:
        setting = declared[name][0]
        try:
            value = _coerce(key, value, setting.type, where)
        except ConfigError as e:  # "must be a number" alone: the rule and its owner, as --show-config writes them
            raise ConfigError(f"{e} ({setting.allowed()}; {', '.join(declared[name][1])})") from None
        problem = setting.problem(value)
        if problem:
            raise ConfigError(f"{where}: {key}={value!r} {problem} ({', '.join(declared[name][1])})")
    elif OPTIONS in unresolved and name.isidentifier():
        # only a command line's string is parsed: a string of the file's ('1.0', '@latest') is the setting's value,
        # which parsed again would change type or fail to parse, and a run could not be sampled without its package
        if not parsed and isinstance(value, str) and value != "":
            value = _coerce(key, value, typing.Any, where)
    else:
        valid = [f"{n} ({', '.join(owners)})" for n, (_, owners) in declared.items()]
        failed = "".join(f"; {f}" for f in load_plugins())  # the setting may be a package's that failed to import
        near = did_you_mean(name, declared).replace("'", f"'{OPTIONS}.", 1)
        # no near spelling and no broken package: most likely a run's or a file's setting whose package is not here
        fix = "" if near or failed else (
            "; a setting is declared by the package or session code of a method, loss or router mode: install that "
            "package in this environment (`ahpa --version` lists the extension packages installed) or run its code "
            "before this, docs/extending.md")
        raise ConfigError(f"{where}: unknown config key {key!r}{near}; align.options holds the "
                          "settings that registered methods, losses and router modes declare: "
                          f"{', '.join(valid) or 'none is registered in this process'}{failed}{fix}")
    cfg.align.options[name] = value


def _apply_options(cfg: Config, value: Any, where: str, unresolved: tuple[str, ...]) -> None:
    """align.options as one mapping (a YAML file's, or `align.options={a: 1}`): each item as align.options.NAME."""
    if isinstance(value, str):
        value = _coerce(OPTIONS, value, typing.Any, where) if value else {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {OPTIONS} must be a mapping of NAME: VALUE (a setting of a registered method, loss "
                          f"or router mode each), got {value!r}; one setting is align.options.NAME=VALUE")
    for name, item in value.items():
        _apply_option(cfg, str(name), item, where, unresolved, parsed=True)


def fill_options(a: AlignCfg) -> None:
    """The settings of the method, loss and router mode in use, each given or its default, first and in that order
    (what the run reads, in config.yaml and --show-config; what the aligner's functions get); any other given setting
    stays (an extension not in use: the run notes it as ignored). With a name not registered here (read unresolved),
    the options stay as written."""
    used = settings_in_use(a.method, a.router, a.loss)
    if used is None:
        return
    filled = {name: a.options.get(name, s.default) for name, (s, _) in used.items()}
    a.options = {**filled, **{k: v for k, v in a.options.items() if k not in filled}}


def _apply(cfg: Config, key: str, value: Any, where: str, unresolved: tuple[str, ...] = ()) -> None:
    if key == OPTIONS:
        return _apply_options(cfg, value, where, unresolved)
    if key.startswith(OPTIONS + "."):
        return _apply_option(cfg, key[len(OPTIONS) + 1:], value, where, unresolved)
    section, _, name = key.partition(".")
    sections = {f.name for f in dataclasses.fields(cfg)}
    if section not in sections or not name:
        raise ConfigError(f"{where}: unknown config key {key!r}{did_you_mean(section, sections) if name else ''}; "
                          f"sections are: {', '.join(sorted(sections))}")
    sub = getattr(cfg, section)
    types_ = _section_types(sub)
    if name not in types_:
        elsewhere = [f"{other}.{name}" for other in sorted(sections) if name in _section_types(getattr(cfg, other))]
        hint = (f" (did you mean {' or '.join(elsewhere)}?)" if elsewhere
                else did_you_mean(name, types_).replace("'", f"'{section}.", 1))
        raise ConfigError(f"{where}: unknown config key {key!r}{hint}; valid keys in {section}: {', '.join(types_)}")
    setattr(sub, name, _coerce(key, value, types_[name], where, unresolved))


def check_across_keys(cfg: Config, where: str) -> None:
    """The rules between keys (ahpa.config_rules.ACROSS_KEYS), once every key is set."""
    for rule in ACROSS_KEYS:
        problem = rule(cfg)
        if problem:
            raise ConfigError(f"{where}: {problem}")


def checked_sample(cfg: SampleCfg | dict, where: str) -> SampleCfg:
    """`cfg` (a SampleCfg, or a mapping of some of its keys) checked as a config's `sample` section is: each key's
    type, choices and range, and the rules across keys. Returns a checked copy (a mapping's missing keys default)."""
    if isinstance(cfg, SampleCfg):
        values = vars(cfg)
    elif isinstance(cfg, dict):
        values = cfg
    else:
        raise ConfigError(f"{where}: expected a SampleCfg (or a dict of its keys), got {type(cfg).__name__}")
    return from_dict({"sample": dict(values)}, where=where).sample


def _fill(cfg: Config, data: dict, where: str, unresolved: tuple[str, ...] = ()) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping, got {values!r}")
        for name, value in values.items():
            _apply(cfg, f"{section}.{name}", value, where, unresolved)
    return cfg


def from_dict(data: dict, where: str = "config", base: Config | None = None) -> Config:
    cfg = _fill(base if base is not None else Config(), data, where)
    fill_options(cfg.align)
    check_across_keys(cfg, where)
    return cfg


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), where: str = "overrides",
         unresolved: tuple[str, ...] = ()) -> Config:
    """A config from an optional YAML file plus `section.key=value` overrides (later wins); an error in an override
    names it as coming from `where` (`ahpa train` passes "command line"; a notebook has none). `unresolved`: keys of
    config_rules.REGISTERED_KEYS whose names may be unknown in this process, for a reader that builds no aligner (a
    run's config read to sample or export its SiT: the package that registered its method is not needed there)."""
    if isinstance(overrides, str):  # one override given bare: its characters would be read as overrides
        overrides = [overrides]
    if isinstance(overrides, dict):  # its keys alone would be read, each refused as "not of the form section.key=value"
        raise ConfigError(f"{where}: a list of 'section.key=value' strings, as the command line takes them, not a "
                          "dict: e.g. [f'{k}={v}' for k, v in overrides.items()]")
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        _fill(cfg, data, str(path), unresolved)  # the keys across sections are checked once the overrides are in
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        _apply(cfg, key.strip(), value.strip(), where, unresolved)
    fill_options(cfg.align)
    check_across_keys(cfg, str(path) + (f" with the {where}" if overrides else "") if path is not None else where)
    return cfg


# keys naming files: a path, or a KIND:PATH spec of a pretrained part (a list of specs for detectors)
PATH_KEYS = ("data.path", "eval.ref")
SPEC_KEYS = ("prior.encoder", "prior.external", "eval.detectors")


def shown(path: str | Path) -> str:
    """A path for an error message: a relative one says what it is relative to (the directory `ahpa` runs from,
    which is not where the config file lies)."""
    p = Path(path).expanduser()
    return repr(str(path)) + ("" if p.is_absolute() else f" (relative to {os.getcwd()})")


def _absolute(path: str) -> str:
    # only a path that exists here: a hub id (diffusers:org/name) or `ahpa-vae:random` stays as written, and a
    # missing file keeps its name for the error that reports it. abspath, not resolve: symlinks stay as given
    local = os.path.expanduser(path)
    return os.path.abspath(local) if path and os.path.exists(local) else path


def absolute_spec(spec: str) -> str:
    """KIND:PATH with PATH made absolute where it exists here (a hub id or KIND:random stays as written)."""
    kind, sep, where = spec.partition(":")
    return f"{kind}:{_absolute(where)}" if sep else spec


def with_absolute_paths(cfg: Config) -> Config:
    """A copy whose file paths are absolute, relative ones taken from the working directory: a run's config.yaml
    and its export then name the same files from any directory, and resuming from elsewhere compares equal."""
    out = from_dict(cfg.to_dict())
    for key in PATH_KEYS + SPEC_KEYS:
        section, _, name = key.partition(".")
        value = getattr(getattr(out, section), name)
        fix = _absolute if key in PATH_KEYS else absolute_spec
        setattr(getattr(out, section), name, [fix(v) for v in value] if isinstance(value, list) else fix(value))
    return out


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
