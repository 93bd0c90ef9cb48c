"""Extensions from installed packages, and the checks that name an extension when it is called wrongly.

A package that adds methods, router modes, losses or encoders declares a module in the entry-point group "ahpa.plugins"
(docs/extending.md). It is imported the first time a name is not found in a registry, in every process that
reads one: the CLI, torchrun's workers, `ahpa sample --run` and a fresh Python session reading a run's
config.yaml. Entries registered by a call at run time exist in that process only; such a call imports the
packages first, so that a package's entry of the same name never replaces the session's own afterwards.
"""

from __future__ import annotations

import inspect

GROUP = "ahpa.plugins"
# every entry-point group ahpa reads: this module's, the prior encoders' (ahpa.priors.registry) and REPA's external
# encoders' (ahpa.external_kinds)
GROUPS = (GROUP, "ahpa.encoders", "ahpa.external_encoders")
_loaded = False
_failures: list[str] = []
_importing: str | None = None  # the package whose "ahpa.plugins" module is being imported now


def importing() -> str | None:
    """The package whose module is registering now (None: the session's own code), so that a registry knows whose a
    name is: two packages registering one name is a clash, a session replacing a package's name is not."""
    return _importing


def load_plugins() -> list[str]:
    """Import every installed "ahpa.plugins" entry point, once per process; returns what failed to import, each
    named with its package. One that fails leaves the others, and the built-in names, usable."""
    global _loaded, _importing
    if not _loaded:
        _loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=GROUP):
            _importing = package_of(ep)
            try:
                ep.load()
            except Exception as e:  # the user's package: any error, named with where it comes from
                _failures.append(entry_point_failure(ep, GROUP, e))
            finally:
                _importing = None
    return _failures


def installed_extensions() -> str | None:
    """The installed packages that extend ahpa (an entry point in one of GROUPS), "NAME VERSION, ..." sorted; None
    with none. A package's method, loss or encoder is part of what trains a run and changes its numerics as ahpa's
    own code does, so `ahpa --version` and a run's starts.jsonl name them (their entry points are not imported)."""
    from importlib.metadata import entry_points

    found = set()
    for group in GROUPS:
        for ep in entry_points(group=group):
            version = getattr(getattr(ep, "dist", None), "version", None)
            found.add(package_of(ep) + (f" {version}" if version is not None else ""))
    return ", ".join(sorted(found)) or None


def package_of(ep) -> str:
    """The installed package an entry point comes from (its module where the metadata names none)."""
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else ep.value.partition(":")[0]


def entry_point_failure(ep, group: str, e: Exception) -> str:
    """An entry point that failed to import, named with its package (the error alone names a module only)."""
    dist = getattr(ep, "dist", None)
    package = f" of package {dist.name!r}" if dist is not None else ""
    return f"the {group!r} entry point {ep.name} = {ep.value!r}{package} failed to load: {type(e).__name__}: {e}"


def declares(fn, keyword: str) -> bool:
    """Whether `fn` names the parameter `keyword` and takes it by keyword (an optional argument of a contract, e.g. a
    loss's `level`): read once, where the function is registered or built into a module, never per call. A `**kwargs`
    does not count: the function says which arguments it reads."""
    try:
        param = inspect.signature(fn).parameters.get(keyword)
    except (TypeError, ValueError):  # no signature to read (a builtin)
        return False
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


def check_call(fn, args: tuple, what: str, contract: str, keywords: tuple[str, ...] = ()) -> None:
    """Whether `fn` accepts `args`, and each of the optional `keywords` it declares (ahpa passes those by keyword),
    checked without calling it: a wrong signature is named with the contract, while a TypeError raised inside `fn`
    stays its own."""
    try:
        inspect.signature(fn).bind(*args, **{k: None for k in keywords if declares(fn, k)})
    except ValueError:  # no signature to read (a builtin): the call itself will tell
        return
    except TypeError as e:
        name = getattr(fn, "__qualname__", type(fn).__name__)
        raise ValueError(f"{what} ({name}) cannot be called as {contract}: {e}") from None


def call_loader(loader, args: tuple, what: str, spec: str, contract: str):
    """`loader(*args)`, the loader of a kind named by `spec` (an encoder's, an external encoder's), its signature
    checked first (an entry point's is loaded just now). ValueError, OSError and ImportError pass as they are: they
    say what is wrong already (a folder that moved, a model refused); any other error of the user's loader is named
    with `what` and the spec, not a traceback from inside ahpa."""
    check_call(loader, args, what, contract)
    try:
        return loader(*args)
    except (ValueError, OSError, ImportError):
        raise
    except Exception as e:
        raise ValueError(f"{what} failed on {spec!r}: {type(e).__name__}: {e}") from e
