"""The "did you mean" of every error that lists what is valid: a setting's value, a config key, an encoder's or a
detector's kind, a device."""

from __future__ import annotations

import difflib


def did_you_mean(given, valid) -> str:
    """' (did you mean 'x'?)' for the valid name nearest `given` (the same but for case first: the README writes
    AHPA and REPA), or '' when none is near."""
    names = [str(v) for v in valid]
    same_but_case = [v for v in names if v.lower() == str(given).lower()]
    close = same_but_case or difflib.get_close_matches(str(given), names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
