"""The registries of alignment: methods (which levels they align and how they weight them), router modes and
losses. The config takes its valid names from here, so a new entry is valid everywhere at once."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from ahpa.align.settings import Setting, checked_settings
from ahpa.registry import Registry


@dataclass(frozen=True)
class RouterMode:
    learned: bool  # has parameters and gets the router objective
    # register_router_mode's function (ahpa.align.router); None for the built-in modes, branches of Router.route
    fn: Callable | None = None
    settings: tuple[Setting, ...] = ()  # its own settings, align.options.NAME (ahpa.align.settings)


@dataclass(frozen=True)
class Loss:
    about: str
    # (prediction [B, N, C], target [B, N, C], the run's AlignCfg[, level=NAME]) -> loss per sample [B]
    fn: Callable
    settings: tuple[Setting, ...] = ()  # its own settings, align.options.NAME (ahpa.align.settings)


# the built-in losses: their math is in ahpa.align.loss, imported when called (the config reads this module, and
# needs no torch)
def _cosine(pred, target, cfg):
    from ahpa.align.loss import cosine_loss

    return cosine_loss(pred, target)


def _smooth_l1(pred, target, cfg):
    from ahpa.align.loss import smooth_l1_loss

    return smooth_l1_loss(pred, target, cfg.smooth_l1_beta)


ROUTER_MODES = Registry("router mode", "modes", "align.router=NAME", {
    "soft": RouterMode(True), "topk": RouterMode(True), "snr": RouterMode(False), "uniform": RouterMode(False),
}, why=" (every run naming it would change)")
LOSSES = Registry("loss", "losses", "align.loss=NAME", {
    "cosine": Loss("1 - cos(prediction, target), mean over tokens (REPA's)", _cosine),
    "smooth-l1": Loss("smooth-L1 with beta align.smooth_l1_beta, mean over tokens and channels (SRA2's)", _smooth_l1),
}, why=" (every method that uses it would change)")


# which levels a method aligns (MethodSpec.levels); each value is a branch of resolve_levels
LEVEL_CHOICES = ("none", "latent", "one", "all", "external")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    # which levels it aligns: none | latent (the VAE latent) | one (the single level of align.levels) |
    # all (align.levels, or every level the encoder gives) | external (REPA's encoder, aligned as level "external")
    levels: str
    router: str  # the router mode the method fixes; "" = the mode named by align.router (ahpa)
    loss: str  # the method's loss when align.loss=default: one of LOSSES
    about: str
    settings: tuple[Setting, ...] = ()  # its own settings, align.options.NAME, read by its loss or router mode

    def __post_init__(self):
        object.__setattr__(self, "settings", checked_settings(self.settings, f"method {self.name!r}"))
        if self.levels not in LEVEL_CHOICES:
            raise ValueError(f"method {self.name!r}: levels {self.levels!r} is not {'|'.join(LEVEL_CHOICES)} (a new kind "
                             "is an entry of LEVEL_CHOICES and a branch of resolve_levels)")
        # checked by the registries: an installed package's mode or loss is imported first, a misspelt one named
        for registry, name in ((ROUTER_MODES, self.router), (LOSSES, self.loss)):
            if not name and registry is ROUTER_MODES:  # the mode align.router names
                continue
            try:
                registry.check(name)
            except ValueError as e:
                raise ValueError(f"method {self.name!r}: {e}") from None


METHODS = Registry("alignment method", "methods", "align.method=NAME", {
    m.name: m
    for m in (
        MethodSpec("none", "none", "uniform", "cosine", "vanilla SiT, no alignment"),
        MethodSpec("repa", "external", "uniform", "cosine", "REPA: an external frozen encoder's patch tokens (e.g. DINOv2)"),
        MethodSpec("vae-latent", "latent", "uniform", "smooth-l1", "SRA2 / VAE-REPA: the VAE latent, one level"),
        MethodSpec("vae-level", "one", "uniform", "cosine", "one fixed encoder level (align.levels=[NAME])"),
        MethodSpec("multi-uniform", "all", "uniform", "cosine", "all levels, equal weights (AHPA without its router)"),
        MethodSpec("ahpa", "all", "", "cosine", "all levels weighted by the timestep-conditioned Dynamic Router"),
    )
}, why=" (every run and table naming it would change)")


def register_method(spec: MethodSpec) -> None:
    """Make `align.method=spec.name` valid (configs, overrides, --show-config, tables). A built-in name is refused:
    every run, table and study result that names it would silently mean something else."""
    if not isinstance(spec, MethodSpec):
        raise ValueError(f"register_method takes a MethodSpec (ahpa.align.methods), not {type(spec).__name__}")
    check_new_settings(METHODS, spec.name, spec.settings)
    METHODS.register(spec.name, spec)


# the registries whose entries may declare settings, with the word that names an entry's kind
_DECLARING = (("method", METHODS), ("loss", LOSSES), ("router mode", ROUTER_MODES))


def declared_settings() -> dict[str, tuple[Setting, list[str]]]:
    """{name: (its declaration, the entries declaring it, e.g. "loss 'gram'")} over every registered method, loss and
    router mode (the installed packages imported first)."""
    out: dict[str, tuple[Setting, list[str]]] = {}
    for what, registry in _DECLARING:
        for name in list(registry):  # imports the packages; a pending entry point is no ahpa.plugins entry
            entry = registry.entries.get(name)
            for s in getattr(entry, "settings", ()):
                out.setdefault(s.name, (s, []))[1].append(f"{what} {name!r}")
    return out


def check_new_settings(registry: Registry, name: str, settings: tuple[Setting, ...]) -> None:
    """Refuses a registration whose setting another entry declares otherwise: align.options.NAME is one key, whose
    type, default and allowed values must be one. The same declaration twice (its help aside) is one setting (a
    method and its loss)."""
    what = next(w for w, r in _DECLARING if r is registry)
    for s in settings:
        for other_what, other in _DECLARING:
            for other_name in list(other):
                if other is registry and other_name == name:  # the entry this registration replaces (a rerun cell)
                    continue
                declared = getattr(other.entries.get(other_name), "settings", ())
                theirs = next((t for t in declared if t.name == s.name), None)
                if theirs is not None and dataclasses.replace(theirs, help=s.help) != s:  # its help may differ
                    raise ValueError(f"{what} {name!r} declares setting align.options.{s.name} as {s}, and "
                                     f"{other_what} {other_name!r} declares it as {theirs}: one key has one meaning; "
                                     "rename yours, or declare it the same way")


def extensions_in_use(method: str, router: str, loss: str) -> list[tuple[str, object]] | None:
    """[(e.g. "loss 'gram'", its entry)] of the method, the loss and the router mode a run of these settings uses
    (the method's own loss and mode where it fixes them; vanilla SiT none but the method, REPA no router mode), in
    that order; None when one of them is not registered in this process."""
    spec = METHODS.get(method)
    if spec is None:
        return None
    names = [("method", METHODS, method)]
    if spec.levels != "none":
        names.append(("loss", LOSSES, spec.loss if loss == "default" else loss))
        if spec.levels != "external":
            names.append(("router mode", ROUTER_MODES, spec.router or router))
    entries = [(f"{what} {name!r}", registry.get(name)) for what, registry, name in names]
    return None if any(entry is None for _, entry in entries) else entries


def settings_in_use(method: str, router: str, loss: str) -> dict[str, tuple[Setting, str]] | None:
    """{name: (declaration, the first entry in use declaring it)} of the settings a run of these choices reads; None
    when one of its method, loss or router mode is not registered in this process."""
    used = extensions_in_use(method, router, loss)
    if used is None:
        return None
    out: dict[str, tuple[Setting, str]] = {}
    for owner, entry in used:
        for s in getattr(entry, "settings", ()):
            out.setdefault(s.name, (s, owner))
    return out


def get_method(name: str) -> MethodSpec:
    return METHODS[name]


# the align.* settings that choose and tune the router (the others: what is aligned, where, how strongly)
ROUTING = ("router", "router_tau", "router_topk", "router_normalize", "router_entropy", "router_momentum",
           "router_t_bins", "snr_width")


def align_settings_read(method: str, router: str, router_normalize: bool, loss: str) -> set[str] | None:
    """The align.* settings (AlignCfg's field names) a run of these choices reads; None for a method not registered
    in this process. Vanilla SiT reads only `method`; REPA aligns one external level, so neither align.levels nor
    the router; a fixed schedule reads none of the learned router's settings, the running means' settings matter
    only when the router normalises by them, and align.smooth_l1_beta only to the smooth-L1 loss."""
    spec = METHODS.get(method)
    if spec is None:
        return None
    own = {f"options.{name}" for name in settings_in_use(method, router, loss) or {}}
    if spec.levels == "none":
        return {"method"} | own
    from dataclasses import fields

    from ahpa.config import AlignCfg

    reads = {f.name for f in fields(AlignCfg)} - set(ROUTING) - {"smooth_l1_beta"}
    if spec.levels == "external":
        reads.discard("levels")
    mode = spec.router or router
    if spec.levels != "external":
        reads |= ({"router"} if not spec.router else set()) | ({"snr_width"} if mode == "snr" else set())
        reads |= {"router_topk"} if mode == "topk" else set()
        entry = ROUTER_MODES.get(mode)  # None: a mode unknown here (a plugin's, not installed)
        if entry is not None and entry.learned:
            reads |= {"router_tau", "router_entropy", "router_normalize"}
            reads |= {"router_momentum", "router_t_bins"} if router_normalize else set()
    if (spec.loss if loss == "default" else loss) == "smooth-l1":
        reads.add("smooth_l1_beta")
    # the extensions' own settings (align.options.NAME) of the method, loss and router mode in use; the mapping
    # itself is no setting: its keys are what a run reads
    return (reads - {"options"}) | own


def resolve_levels(method: MethodSpec, available: list[str], requested: list[str]) -> list[str]:
    """The level names a method aligns, checked against what the encoder (or cache) provides."""
    for name in requested:
        if name not in available:
            raise ValueError(f"align.levels names {name!r}, which the encoder does not provide; its levels are {available}")
    twice = sorted({n for n in requested if requested.count(n) > 1})
    if twice:  # it would weigh that level double and log it twice under one name
        raise ValueError(f"align.levels names {', '.join(map(repr, twice))} more than once: name each level once")
    if method.levels == "none":
        return []
    if method.levels == "external":
        return ["external"]
    if method.levels == "latent":
        others = [n for n in requested if n != "latent"]
        if others:  # another level under the latent baseline's name would mislabel the run
            raise ValueError(f"align.method={method.name} aligns the VAE latent, not align.levels={requested}: for one "
                             f"other level, align.method=vae-level align.levels=[{others[0]}] (align.loss=smooth-l1 "
                             "for SRA2's loss)")
        chosen = ["latent"]
    elif method.levels == "one":
        chosen = requested
    else:
        chosen = requested or list(available)
    if method.levels in ("latent", "one") and len(chosen) != 1:
        raise ValueError(f"method {method.name!r} aligns exactly one level: set align.levels=[NAME] with NAME one of {available}")
    return chosen


def resolve_depths(levels: list[str], depth: int, items: list[str], model_depth: int, shared_trunk: bool) -> list[int]:
    """The block whose hidden tokens each level is aligned to: align.depth, or its NAME:BLOCK item of
    align.level_depths."""
    chosen = dict.fromkeys(levels, depth)
    for item in items:
        name, sep, block = str(item).partition(":")
        if not sep or not block.strip().isdigit():
            raise ValueError(f"align.level_depths item {item!r} is not NAME:BLOCK, e.g. stage1:2")
        if name not in chosen:
            raise ValueError(f"align.level_depths names {name!r}, which this run does not align; its levels are {levels}")
        chosen[name] = int(block)
    for name, block in chosen.items():
        if not 1 <= block <= model_depth:
            raise ValueError(f"align.level_depths gives {name} block {block}; it must lie in [1, {model_depth}] (the model's depth)")
    depths = [chosen[name] for name in levels]
    if shared_trunk and len(set(depths)) > 1:
        raise ValueError("align.level_depths puts levels at different blocks, which needs align.shared_trunk=false: "
                         "one projector trunk per level, since a shared trunk would see hidden states of different blocks")
    return depths
