"""Alignment objectives: projectors, the Dynamic Router, losses and the method registry.

The registry (ahpa.align.methods) imports no torch: the config checks its names against it. The module with
parameters is ahpa.align.objective.Aligner.
"""

from ahpa.align.methods import (LOSSES, METHODS, ROUTER_MODES, MethodSpec, get_method, register_method, resolve_depths,
                                resolve_levels)

__all__ = ["LOSSES", "METHODS", "ROUTER_MODES", "MethodSpec", "get_method", "register_method", "resolve_depths",
           "resolve_levels"]
