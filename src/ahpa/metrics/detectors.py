"""Feature detectors for Fréchet distances, named by one grammar: `torchscript:FILE`, `inception:FILE`, `dinov2:DIR`.

A detector takes uint8 RGB images [N, 3, H, W] (0-255, the format samples are stored in) and returns
float features [N, D]; any resizing or normalisation is the detector's own business, so that every caller
measures the same thing. Its `name` is the metric it defines: a Fréchet distance in a CIFAR ResNet's
feature space is not FID, and tables must say so (FD-r20, FD-r32, FID, FD-DINOv2).
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import torch

KINDS = ("torchscript", "inception", "dinov2")


class DetectorUnavailableError(ImportError):
    """The detector kind needs an optional dependency (or code) that is not installed.

    An ImportError, so that `except ImportError` around optional metrics keeps working.
    """


def parse_spec(spec: str) -> tuple[str, str]:
    kind, sep, where = spec.partition(":")
    if not sep or not where:
        raise ValueError(
            f"detector spec {spec!r} is not KIND:PATH; valid kinds: {', '.join(KINDS)} "
            "(e.g. torchscript:detectors/cifar10-resnet20.pt)"
        )
    if kind not in KINDS:
        raise ValueError(f"unknown detector kind {kind!r} in {spec!r}; valid kinds: {', '.join(KINDS)}")
    return kind, where


def metric_name(kind: str, path: str | Path) -> str:
    """The name of the Fréchet distance a detector defines, e.g. FD-r20 for cifar10-resnet20.pt."""
    if kind == "inception":
        return "FID"
    if kind == "dinov2":
        return "FD-DINOv2"
    stem = Path(path).stem
    m = re.search(r"resnet(\d+)$", stem)
    return f"FD-r{m.group(1)}" if m else f"FD-{stem}"


class Detector:
    """Base: `features(images)` and, where the network has a classifier head, `logits(images)`."""

    name: str
    spec: str
    device: torch.device

    @property
    def has_logits(self) -> bool:
        return False

    @property
    def dim(self) -> int:
        """Feature dimension, probed once with a blank image (so that empty shards can size their sums)."""
        if getattr(self, "_dim", None) is None:
            probe = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
            self._dim = int(self.features(probe).shape[1])
        return self._dim

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"detector {self.spec!r} has no classifier head (no `logits`)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, name={self.name!r}, device={str(self.device)!r})"


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"detectors take uint8 image tensors (0-255), got {got}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"detectors take RGB images [N, 3, H, W], got shape {tuple(images.shape)}")


class TorchScriptDetector(Detector):
    """A TorchScript module: forward(uint8 [N,3,H,W]) -> float [N, D]; optionally a `logits` method."""

    def __init__(self, path: Path, device: torch.device, spec: str):
        self.spec = spec
        self.device = device
        self.name = metric_name("torchscript", path)
        with warnings.catch_warnings():
            # torch >= 2.10 deprecates TorchScript authoring and warns on load too; the detector files
            # are TorchScript by design (portable, no Python class needed) and loading still works.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=DeprecationWarning)
            self.module = torch.jit.load(str(path), map_location=device).eval()
        self._dim = None

    @property
    def has_logits(self) -> bool:
        return hasattr(self.module, "logits")

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        return self.module(images.to(self.device, non_blocking=True)).float()

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if not self.has_logits:
            return super().logits(images)
        _check_images(images)
        return self.module.logits(images.to(self.device, non_blocking=True)).float()


def _unavailable(kind: str, spec: str, package: str) -> DetectorUnavailableError:
    # Not implemented yet on purpose: these detectors come with the optional extra `ahpa[fid]`, and a
    # silent fallback (or a download) would give numbers nobody can compare.
    if importlib.util.find_spec(package) is None:
        why = f"it needs the optional package {package!r}, which is not installed"
    else:
        why = f"{package!r} is installed, but this version of ahpa does not implement the {kind} detector yet"
    return DetectorUnavailableError(
        f"detector {spec!r}: {why}; install the optional extra with `pip install 'ahpa[fid]'` "
        "or use a TorchScript detector (torchscript:FILE)"
    )


def load_detector(spec: str, device: torch.device | str = "cpu") -> Detector:
    """Build a detector from its spec. Never downloads: every kind loads from a local path."""
    kind, where = parse_spec(spec)
    path = Path(where).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"detector path {str(path)!r} (from {spec!r}) does not exist")
    device = torch.device(device)
    if kind == "torchscript":
        if not path.is_file():
            raise FileNotFoundError(f"detector {spec!r}: {str(path)!r} is not a file")
        return TorchScriptDetector(path, device, spec)
    if kind == "inception":
        raise _unavailable(kind, spec, "pytorch_fid")  # FID Inception-v3 architecture for the weights FILE
    raise _unavailable(kind, spec, "transformers")  # Dinov2Model.from_pretrained(DIR)
