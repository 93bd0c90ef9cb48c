"""A registry of one kind of extension: alignment methods, router modes, losses, encoder kinds (docs/extending.md).

Each kind keeps name -> entry in one dict (the entry holds whatever the kind needs: a MethodSpec, a router mode's
function, a loss's function, an encoder's loader), and shares the rules: a name is written in overrides and YAML,
so it is checked when registered; a built-in name is refused; registering imports the installed packages first
(ahpa.plugins); a name not found imports them before it is refused, with a near spelling and the valid names; a
name two installed packages give is refused naming both.
"""

from __future__ import annotations

from ahpa.plugins import entry_point_failure, importing, load_plugins, package_of
from ahpa.spelling import did_you_mean


# why a name that a run or export records, or a user remembers, may be unknown here (no near spelling, no broken package)
ELSEWHERE = ("a name registered from Python exists only in the process that registered it: register it again before "
             "loading, or declare it as an entry point of an installed package, docs/extending.md")


def unknown_hint(name, valid) -> tuple[str, str]:
    """What follows the refusal of a name not among `valid`: (a near spelling, or ''; what else may explain it: the
    installed packages that failed to import, since the name may be theirs, or, with neither, the order of a
    package's registrations while its module imports, else why a name registered elsewhere is unknown here).
    Registry.check puts the spelling before the valid names, a config error after."""
    near, failed = did_you_mean(name, valid), "".join(f"; {f}" for f in load_plugins())
    if near or failed:
        return near, failed
    package = importing()
    if package is not None:  # a package's module names a name it has not registered yet: ELSEWHERE's advice is no fix
        return near, (f" (package {package!r} is importing its 'ahpa.plugins' module: register a router mode or loss "
                      "before the method that names it)")
    return near, f" ({ELSEWHERE})"


def check_name(name: str, what: str, usage: str) -> None:
    """A registered name is written in overrides and YAML as `usage` shows (e.g. align.method=NAME): no spaces, no
    = , [ ] :"""
    if not isinstance(name, str) or not name or any(c.isspace() or c in "=,[]:" for c in name):
        raise ValueError(f"{what} name {name!r}: give a name without spaces or = , [ ] : (it is written as {usage})")


class Registry:
    """`what` names the kind in errors ("router mode"), `plural` its list ("modes"), `usage` how a name is written
    ("align.router=NAME"); `why` says what a built-in name registered again would break. `group`: an entry-point
    group whose entries (name = a name, object = the entry) count as registered and load when first looked up, so
    that a package failing to import breaks its own name only."""

    def __init__(self, what: str, plural: str, usage: str, built_in: dict, why: str = "", group: str | None = None):
        self.what, self.plural, self.usage, self.why, self.group = what, plural, usage, why, group
        self.entries = dict(built_in)  # name -> entry: read it freely, add to it with `register`
        self.built_in = frozenset(built_in)
        self.owners: dict[str, str] = {}  # name -> the package whose "ahpa.plugins" module registered it

    def register(self, name: str, entry) -> None:
        """Make `name` valid, with `entry` (checked by the caller: each kind has its own contract). The session may
        register a name again (a notebook's cell rerun); two packages may not: which one a run got would depend on
        the order they were imported in, so the name is refused naming both."""
        check_name(name, self.what, self.usage)
        if name in self.built_in:
            raise ValueError(f"{self.what} {name!r} is built in{self.why}; register yours under another name")
        package = importing()
        load_plugins()  # first: a package's entry imported later would replace this one, the session's own
        if package is not None and self.owners.get(name, package) != package:
            self.entries.pop(name, None)  # neither package's: the owner stays, so that a third is refused too
            raise ValueError(self._clash(name, [self.owners[name], package]))
        self.entries[name] = entry
        if package is None:
            self.owners.pop(name, None)
        else:
            self.owners[name] = package

    def __contains__(self, name) -> bool:
        """Whether `name` is valid (the config's choices). A name not found imports the packages first; the refusal
        of one still missing names any package that failed to import (`check`, ahpa.config_rules.choice_hint), with
        the key and the near spelling."""
        if name in self.entries:
            return True
        load_plugins()
        return name in self.entries or name in self._pending()

    def __iter__(self):
        """Every valid name (an error message, --show-config): built in, registered, and the packages'."""
        load_plugins()
        return iter([*self.entries, *self._pending()])

    def get(self, name: str):
        """The entry of `name`, or None where it is not valid: as `in`, a name not found imports the packages first (a
        fresh process reading a run's settings: `ahpa compare`, the notes of what a run reads)."""
        return self[name] if name in self else None

    def __getitem__(self, name: str):
        """The entry of `name` (an entry point's is loaded now), or the error of `check`."""
        self.check(name)
        if name not in self.entries:
            ep = self._pending()[name]
            try:
                self.entries[name] = ep.load()
            except Exception as e:  # the user's package: any error, named with where it comes from
                raise ImportError(f"{self.what} {name!r} cannot load: {entry_point_failure(ep, self.group, e)}") from e
        return self.entries[name]

    def check(self, name: str, where: str = "") -> None:
        """A ValueError unless `name` is valid, with a near spelling, the valid names and any package that failed to
        import (the name may be its); `where` says where the name was read (" in 'kind:path'")."""
        if name in self.entries and name not in self.owners:
            return
        valid = list(self)
        if name not in valid:
            near, rest = unknown_hint(name, valid)
            raise ValueError(f"unknown {self.what} {name!r}{where}{near}; valid {self.plural}: {', '.join(valid)}{rest}")
        claims = self._claims(name)
        if len(claims) > 1:
            raise ValueError(self._clash(name, claims))

    def _clash(self, name: str, packages: list[str]) -> str:
        return (f"{self.what} {name!r} is given by packages {', '.join(map(repr, sorted(set(packages))))}: which one a "
                "run got would depend on the order they were imported in; uninstall one, or rename it in one of them")

    def _claims(self, name: str) -> list[str]:
        """The installed packages that give `name`: the one whose "ahpa.plugins" module registered it, and those with
        an entry point of that name in `group` (a built-in or the session's own name is none of theirs)."""
        claims = [self.owners[name]] if name in self.owners else []
        if self.group is not None and (name not in self.entries or name in self.owners):
            from importlib.metadata import entry_points

            claims += [package_of(ep) for ep in entry_points(group=self.group) if ep.name == name]
        return sorted(set(claims))

    def _pending(self) -> dict:
        """The entry points of `group` by name, not loaded yet; one named as a registered name never loads."""
        if self.group is None:
            return {}
        from importlib.metadata import entry_points

        return {ep.name: ep for ep in entry_points(group=self.group) if ep.name not in self.entries}
