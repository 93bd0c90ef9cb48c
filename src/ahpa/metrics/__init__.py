"""Evaluation metrics: feature detectors, streaming feature statistics, Fréchet distances, Inception
Score and precision/recall, and cached reference measurements."""

from ahpa.metrics.detectors import KINDS, Detector, DetectorUnavailableError, load_detector, metric_name, metric_tag, parse_spec
from ahpa.metrics.evaluation import EvaluationWarning, evaluate
from ahpa.metrics.frechet import FeatureStats, frechet_distance, trace_sqrt_product
from ahpa.metrics.images import ImageFolder, iter_image_batches
from ahpa.metrics.inception_score import inception_score
from ahpa.metrics.measurement import Measurement, compute_stats, fd_between, measure, reference_stats
from ahpa.metrics.precision_recall import precision_recall
from ahpa.metrics.reference import load_reference, reference_measurement

__all__ = [
    "KINDS",
    "Detector",
    "DetectorUnavailableError",
    "EvaluationWarning",
    "FeatureStats",
    "ImageFolder",
    "Measurement",
    "compute_stats",
    "evaluate",
    "fd_between",
    "frechet_distance",
    "inception_score",
    "iter_image_batches",
    "load_detector",
    "load_reference",
    "measure",
    "metric_name",
    "metric_tag",
    "parse_spec",
    "precision_recall",
    "reference_measurement",
    "reference_stats",
    "trace_sqrt_product",
]
