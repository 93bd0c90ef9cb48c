"""ahpa: Adaptive Hierarchical Prior Alignment for Diffusion Transformers.

Time convention (stated once, used everywhere): t=0 is data, t=1 is noise,
x_t = alpha(t) * x + sigma(t) * eps, and the network predicts the velocity d/dt x_t.

The Python API (docs/extending.md, "From Python") is importable from here; each name loads its module on first
use, so that `import ahpa` (and the CLI's start) stays free of torch until it is needed.
"""

__version__ = "0.1.0"

# name -> (module, attribute)
_API = {
    "Config": ("ahpa.config", "Config"),
    "load_config": ("ahpa.config", "load"),
    "Trainer": ("ahpa.train.loop", "Trainer"),
    "StopSignals": ("ahpa.train.signals", "StopSignals"),
    "generate": ("ahpa.sample", "generate"),
    "load_export": ("ahpa.sample", "load_export"),
    "run_sampler": ("ahpa.train.resume", "run_sampler"),
    "posthoc_reconstruct": ("ahpa.train.posthoc_export", "reconstruct"),
    "load_encoder": ("ahpa.priors.registry", "load_encoder"),
    "register_encoder": ("ahpa.priors.registry", "register_encoder"),
    "ExternalEncoder": ("ahpa.priors.external", "ExternalEncoder"),
    "register_external": ("ahpa.external_kinds", "register_external"),
    "register_loss": ("ahpa.align.loss", "register_loss"),
    "Setting": ("ahpa.align.settings", "Setting"),
    "register_method": ("ahpa.align.methods", "register_method"),
    "register_router_mode": ("ahpa.align.router", "register_router_mode"),
    "METHODS": ("ahpa.align.methods", "METHODS"),
    "MethodSpec": ("ahpa.align.methods", "MethodSpec"),
    "ROUTER_MODES": ("ahpa.align.methods", "ROUTER_MODES"),
    "LOSSES": ("ahpa.align.methods", "LOSSES"),
    "ENCODERS": ("ahpa.priors.registry", "ENCODERS"),
    "EXTERNALS": ("ahpa.external_kinds", "EXTERNALS"),
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'ahpa' has no attribute {name!r}")
    import importlib

    module, attr = _API[name]
    return getattr(importlib.import_module(module), attr)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
