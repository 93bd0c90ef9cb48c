"""Evaluation metrics: feature detectors, streaming feature statistics and Fréchet distances."""

from ahpa.metrics.detectors import KINDS, Detector, DetectorUnavailableError, load_detector, metric_name, parse_spec
from ahpa.metrics.frechet import FeatureStats, frechet_distance, trace_sqrt_product
from ahpa.metrics.images import compute_stats, fd_between, iter_image_batches, reference_stats

__all__ = [
    "KINDS",
    "Detector",
    "DetectorUnavailableError",
    "FeatureStats",
    "compute_stats",
    "fd_between",
    "frechet_distance",
    "iter_image_batches",
    "load_detector",
    "metric_name",
    "parse_spec",
    "reference_stats",
    "trace_sqrt_product",
]
