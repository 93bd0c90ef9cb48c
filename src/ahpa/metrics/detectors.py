"""Feature detectors for Fréchet distances, named by one grammar: `torchscript:FILE`, `inception:FILE`, `dinov2:DIR`.

A detector takes uint8 RGB images [N, 3, H, W] (0-255, the format samples are stored in) and returns
float features [N, D]; any resizing or normalisation is the detector's own business, so that every caller
measures the same thing. Its `name` is the metric it defines: a Fréchet distance in a CIFAR ResNet's
feature space is not FID, and tables must say so (FD-r20, FD-r32, FID, FD-DINOv2). Detectors with a
classifier head also give class probabilities (for the Inception Score).

- `torchscript:FILE`: any TorchScript module `forward(uint8 images) -> features`, optionally `logits(images)`
  (the CIFAR-10 ResNets of ../shared/detectors).
- `inception:FILE`: the TorchScript translation of TensorFlow's Inception-v3 (`inception-2015-12-05.pt`, the
  network of StyleGAN2-ADA, EDM, EDM2 and clean-fid): pool_3 features for FID, softmax without the output
  bias for the Inception Score, as the original TensorFlow code computes them. PyTorch runs it as it is, so
  FID needs no torchvision and no hand-written copy of the network.
- `dinov2:DIR`: DINOv2 from a local directory through `transformers` (FD-DINOv2, as in Stein et al. 2023):
  images resized to 224 (bicubic, antialiased), ImageNet normalisation, the final normalised CLS token.
"""

from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

from ahpa.config import shown
from ahpa.device import as_device
from ahpa.metrics.spatial import check_split, pool_and_spatial
from ahpa.spelling import did_you_mean

KINDS = ("torchscript", "inception", "dinov2")


class DetectorUnavailableError(ImportError):
    """The detector kind needs an optional dependency that is not installed.

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
        raise ValueError(f"unknown detector kind {kind!r} in {spec!r}{did_you_mean(kind, KINDS)}; valid kinds: "
                         f"{', '.join(KINDS)}")
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


def metric_tag(name: str) -> str:
    """The detector part of a metric name, for the other metrics it defines: "" for FID (plain IS,
    precision, recall, as the literature names them), "r20" for FD-r20, "DINOv2" for FD-DINOv2."""
    return "" if name == "FID" else name.removeprefix("FD-")


def _load_torchscript(path: Path, device: torch.device):
    with warnings.catch_warnings():
        # torch >= 2.10 deprecates TorchScript authoring and warns on load too; the detector files are
        # TorchScript by design (portable, no Python class needed) and loading still works. The category
        # moved from DeprecationWarning (2.10 to 2.13) to FutureWarning (2.14, 2.15), which Python shows to
        # every user: match the message alone. Python 3.14's "not supported ... may break" still shows.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated")
        return torch.jit.load(str(path), map_location=device).eval()


class Detector:
    """Base: `features(images)` and, where the network has a classifier head, `logits(images)`."""

    name: str
    spatial_name: str | None = None  # the metric of its spatial features, where it has them (sFID: Inception-v3)
    spec: str
    device: torch.device

    @property
    def has_logits(self) -> bool:
        return False

    @property
    def has_classes(self) -> bool:
        """Whether `class_probs` works (a classifier head: the Inception Score needs one)."""
        return self.has_logits

    @property
    def has_spatial(self) -> bool:
        """Whether the detector has `features_and_spatial(images)` (sFID's spatial features: Inception-v3 only)."""
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

    def check_spatial(self) -> None:
        raise ValueError(f"detector {self.spec!r} ({self.name}) has no spatial features: sFID is Inception-v3's "
                         "(inception:FILE)")

    def class_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities [N, K] (float32, rows sum to 1)."""
        return torch.softmax(self.logits(images).float(), dim=1)

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
        self.module = _load_torchscript(path, device)
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


class InceptionDetector(Detector):
    """TensorFlow's Inception-v3 as NVIDIA's TorchScript translation (`inception-2015-12-05.pt`).

    Its forward takes uint8-range images of any size and resizes them to 299x299 inside, as the
    TensorFlow graph did: `forward(img, return_features=True)` gives the 2048 pool_3 features FID uses,
    `forward(img, no_output_bias=True)` the 1008 softmax probabilities of the original Inception Score
    code (which left the output bias out); `features_and_spatial` adds sFID's features (ahpa.metrics.spatial).
    """

    name = "FID"
    spatial_name = "sFID"

    def __init__(self, path: Path, device: torch.device, spec: str):
        self.spec, self.device = spec, device
        self.module = _load_torchscript(path, device)
        self._dim = 2048
        self._spatial_dim = None  # known once the split is checked

    @property
    def has_classes(self) -> bool:
        return True

    @property
    def has_spatial(self) -> bool:
        return True

    def check_spatial(self) -> None:
        """A ValueError unless this network, run layer by layer for sFID, gives back its own pool_3 features
        (ahpa.metrics.spatial.check_split); checked once, on a probe batch, before any image is measured."""
        if self._spatial_dim is None:
            self._spatial_dim = check_split(self.module, self.device, self.spec)

    @property
    def spatial_dim(self) -> int:
        """sFID's feature count: 2023 (7 channels of 17x17) for inception-2015-12-05.pt."""
        self.check_spatial()
        return self._spatial_dim

    @torch.inference_mode()
    def features_and_spatial(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool_3 features [N, 2048], sFID's spatial features [N, 2023]) in one pass through the network."""
        _check_images(images)
        self.check_spatial()
        return pool_and_spatial(self.module, images.to(self.device, non_blocking=True))

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        return self.module(images.to(self.device, non_blocking=True), return_features=True).float()

    @torch.inference_mode()
    def class_probs(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        return self.module(images.to(self.device, non_blocking=True), no_output_bias=True).float()


class Dinov2Detector(Detector):
    """FD-DINOv2: the final layer-normed CLS token of DINOv2 (ViT-L/14 in the literature) at 224x224."""

    name = "FD-DINOv2"
    input_size = 224

    def __init__(self, path: Path, device: torch.device, spec: str):
        from ahpa.priors.external import IMAGENET_MEAN, IMAGENET_STD
        from ahpa.priors.transformers_vit import load_dinov2

        self.spec, self.device = spec, device
        self.model = load_dinov2(path, spec).to(device).eval()
        self._dim = int(self.model.config.hidden_size)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        x = images.to(self.device, non_blocking=True).float() / 255.0
        # antialiased bicubic: the reference pipeline resizes PIL images, which low-pass filters when shrinking
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False, antialias=True)
        out = self.model(pixel_values=(x.clamp(0, 1) - self.mean) / self.std)
        return out.pooler_output.float()  # [N, hidden]: the CLS token after the final LayerNorm


def probed(det: InceptionDetector) -> InceptionDetector:
    """The Inception detector, once a blank image has gone through it with Inception's own keyword: another
    TorchScript network given as `inception:` (a CIFAR ResNet, say) fails here, with its spec, instead of at the first
    evaluation after training. (It resizes inside, so any probe size does; a `torchscript:` network may take one size
    only, and is not probed.)"""
    try:
        det.features(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if not any("argument" in line for line in lines):  # not the calling convention: out of memory, say
            raise
        raise ValueError(f"detector {det.spec!r}: the network does not take Inception-v3's forward(img, "
                         f"return_features=True) ({lines[-1]}); another TorchScript detector is named "
                         "torchscript:FILE") from None
    return det


def _is_torchscript_archive(path: Path) -> bool:
    # torch.jit.save writes a zip with the model's code; a state dict (torch.save) has data.pkl and no code/
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n for n in z.namelist())


def load_detector(spec: str, device: torch.device | str = "cpu") -> Detector:
    """Build a detector from its spec. Never downloads: every kind loads from a local path."""
    kind, where = parse_spec(spec)
    path = Path(where).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"detector path {shown(path)} (from {spec!r}) does not exist")
    device = as_device(device)
    if kind in ("torchscript", "inception") and not path.is_file():
        raise FileNotFoundError(f"detector {spec!r}: {str(path)!r} is not a file")
    if kind == "torchscript":
        if not _is_torchscript_archive(path):
            raise ValueError(f"detector {spec!r}: {str(path)!r} is not a TorchScript file (one torch.jit.save wrote); "
                             "a state dict or a training checkpoint of the network is not read")
        return TorchScriptDetector(path, device, spec)
    if kind == "inception":
        if not _is_torchscript_archive(path):
            raise ValueError(
                f"detector {spec!r}: {str(path)!r} is not a TorchScript file. FID uses the TorchScript translation of "
                "TensorFlow's Inception-v3, inception-2015-12-05.pt (the file StyleGAN2-ADA, EDM and clean-fid "
                "download from nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/). Weights-only "
                "files (pytorch-fid's pt_inception-*.pth) and EDM's .pkl wrapper of the same network are not read"
            )
        return probed(InceptionDetector(path, device, spec))
    if not path.is_dir():
        raise FileNotFoundError(f"detector {spec!r}: {str(path)!r} is not a directory (a DINOv2 save_pretrained folder)")
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise DetectorUnavailableError(
            f"detector {spec!r} needs the optional package 'transformers'; install it with `pip install transformers` "
            "(the dinov2 extra: `pip install -e '.[dinov2]'` in a checkout)"
        ) from e
    return Dinov2Detector(path, device, spec)
