"""The settings an extension declares for itself (docs/extending.md, "Settings of your own"): a registered loss,
router mode or method names each of its parameters once, with its default, type, allowed values and one line of
documentation, and the user sets it as `align.options.NAME=VALUE`, checked as a key of ahpa's own is.

A declaration only; reading the values from YAML and overrides is ahpa.config's, and which extensions a run uses is
ahpa.align.methods'. No torch here: the config reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# the types a setting may have: one value on the command line and in YAML, compared as such on resume
TYPES = (bool, int, float, str)
# how a bound reads in a refusal: pydantic's names, which a Python user of ML code has met (Field(gt=0))
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


@dataclass(frozen=True)
class Setting:
    """One setting of an extension: `align.options.NAME` (default `default`). `help`: one line, shown by `ahpa train
    --show-config`. `type`: bool, int, float or str (None: the default's). `choices`: the values allowed (else any of
    the type); gt / ge / lt / le: the bounds of a number (greater than, greater or equal, ...)."""

    name: str
    default: Any
    help: str
    type: Any = None
    choices: tuple = ()
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def __post_init__(self):
        # frozen: the checked fields are set through object.__setattr__
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"setting {self.name!r}: give a name that is a Python identifier (letters, digits, _): "
                             "it is written align.options.NAME and read as cfg.options['NAME']")
        typ = type(self.default) if self.type is None else self.type
        if typ not in TYPES:
            raise ValueError(f"setting {self.name!r}: its type is {getattr(typ, '__name__', typ)}; a setting is one of "
                             "bool, int, float, str (give type=, or a default of one of them)")
        object.__setattr__(self, "type", typ)
        if not isinstance(self.help, str) or not self.help.strip() or "\n" in self.help:
            raise ValueError(f"setting {self.name!r}: give help=, one line saying what it does (--show-config prints "
                             "it)")
        bounds = {k: getattr(self, k) for k in _BOUNDS if getattr(self, k) is not None}
        if bounds and typ not in (int, float):
            raise ValueError(f"setting {self.name!r}: bounds ({', '.join(bounds)}) are for an int or float setting, "
                             f"not a {typ.__name__}; give choices= instead")
        object.__setattr__(self, "choices", tuple(self.choices))
        for value in (*self.choices, self.default):
            problem = self.problem(value, checked_type=False)
            if problem:
                raise ValueError(f"setting {self.name!r}: its {'default' if value is self.default else 'choice'} "
                                 f"{value!r} {problem}")
        if typ is float:  # a float setting whose default was written 1: a float, as the user's values are read
            object.__setattr__(self, "default", float(self.default))

    def allowed(self) -> str:
        """What the setting takes, in words: 'a float > 0', 'one of a, b', 'true or false'."""
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.type is bool:
            return "true or false"
        bounds = [f"{_BOUNDS[k]} {getattr(self, k):g}" for k in _BOUNDS if getattr(self, k) is not None]
        kind = f"a{'n' if self.type is int else ''} {self.type.__name__}"
        return kind + (f" {' and '.join(bounds)}" if bounds else "")

    def problem(self, value, checked_type: bool = True) -> str | None:
        """What is wrong with `value` (of this setting's type once `checked_type`), or None."""
        if not checked_type:
            typ = self.type
            right = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
            if typ is float:
                right = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not right:
                return f"is not a{'n' if typ is int else ''} {typ.__name__}"
        if self.choices and value not in self.choices:
            return f"is not valid; it must be {self.allowed()}"
        limits = {"gt": lambda v, b: v > b, "ge": lambda v, b: v >= b, "lt": lambda v, b: v < b,
                  "le": lambda v, b: v <= b}
        if any(getattr(self, k) is not None and not limits[k](value, getattr(self, k)) for k in _BOUNDS):
            return f"is out of range; it must be {self.allowed()}"
        return None


def checked_settings(settings, owner: str) -> tuple[Setting, ...]:
    """An extension's declarations, checked when it registers: Setting objects, each name once."""
    settings = tuple(settings or ())
    for s in settings:
        if not isinstance(s, Setting):
            raise ValueError(f"{owner}: settings= takes ahpa.align.settings.Setting objects, not {type(s).__name__}")
    names = [s.name for s in settings]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{owner}: declares setting {', '.join(map(repr, twice))} more than once")
    return settings
