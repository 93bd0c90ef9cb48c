"""Interpolant, time sampling and solvers, in one convention: t=0 data, t=1 noise."""

from ahpa.transport.path import PATHS, Path, get_path
from ahpa.transport.timesteps import TIME_SAMPLERS, sample_t

__all__ = ["PATHS", "Path", "get_path", "TIME_SAMPLERS", "sample_t"]
