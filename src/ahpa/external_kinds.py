"""The kinds of REPA's external encoder, `prior.external=KIND:WHERE`: `dinov2:DIR`, `transformers:DIR`, and any kind
added with `register_external` or a package's entry point (docs/extending.md).

No torch here: the config checks a kind against this registry as soon as prior.external is set (a misspelt kind
fails before a run starts, naming the kinds); the loaders import torch when called.
"""

from __future__ import annotations

from typing import Callable

from ahpa.plugins import check_call
from ahpa.registry import Registry

ENTRY_POINT_GROUP = "ahpa.external_encoders"
LOADER_CONTRACT = "loader(where: str) -> ExternalEncoder, or an nn.Module mapping images to tokens [B, N, C]"


def _dinov2(where: str):
    from ahpa.priors.transformers_vit import load_dinov2_tokens

    return load_dinov2_tokens(where)


def _transformers(where: str):
    from ahpa.priors.transformers_vit import load_vit_tokens

    return load_vit_tokens(where)


# kind -> loader(where); more come from register_external or, for every process (the CLI, torchrun workers), from
# packages that declare an entry point in the group "ahpa.external_encoders" (name = kind, object = the loader)
EXTERNALS = Registry("external encoder kind", "kinds", "prior.external=KIND:WHERE",
                     {"dinov2": _dinov2, "transformers": _transformers},
                     why=" (every REPA run naming it would align to another encoder)", group=ENTRY_POINT_GROUP)


def register_external(kind: str, loader: Callable) -> None:
    """Make `prior.external=KIND:WHERE` load REPA's encoder with `loader(where)`: an ExternalEncoder (its input side
    and normalisation its own), or a module that ExternalEncoder.wrap takes (224x224 images, ImageNet's mean and std,
    to patch tokens [B, N, C])."""
    if not callable(loader):
        raise ValueError(f"register_external({kind!r}, ...) needs a function {LOADER_CONTRACT}; got "
                         f"{type(loader).__name__}")
    check_call(loader, ("",), f"the loader of external encoder kind {kind!r}", LOADER_CONTRACT)
    EXTERNALS.register(kind, loader)


def parse_external(spec: str) -> tuple[str, str]:
    """(kind, where) of a `prior.external` spec, or a ValueError naming the valid kinds (with a near spelling)."""
    kind, sep, where = spec.partition(":")
    if not sep or not kind or not where:
        raise ValueError(f"external encoder spec {spec!r} is not KIND:DIR; valid kinds: {', '.join(EXTERNALS)} "
                         "(e.g. dinov2:weights/dinov2-vitb14)")
    EXTERNALS.check(kind, f" in {spec!r}")
    return kind, where
