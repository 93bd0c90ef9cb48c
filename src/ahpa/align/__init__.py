"""Alignment objectives: projectors, the Dynamic Router, losses and the method registry."""

from ahpa.align.methods import METHODS, MethodSpec, get_method, resolve_depths, resolve_levels
from ahpa.align.objective import Aligner

__all__ = ["METHODS", "MethodSpec", "get_method", "resolve_depths", "resolve_levels", "Aligner"]
