"""Generation: per-sample seeded noise -> solver -> VAE decode -> uint8 images, and the ADM `.npz`.

Sample i's noise comes from a generator seeded by (seed, i) alone and every network call runs on
a fixed micro-batch, so a file is identical whatever the batch size or number of processes.
"""

from __future__ import annotations

import json
import operator
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ahpa.atomic import atomic_path
from ahpa.config import SampleCfg, checked_sample
from ahpa.device import autocast
from ahpa.models.sit import SiT, SiTConfig
from ahpa.priors.base import PriorEncoder
from ahpa.priors.targets import ChannelStats
from ahpa.train.rng import SAMPLE_STREAM, generator
from ahpa.transport.guidance import fixed_batch, guided_velocity
from ahpa.transport.path import Path as TPath
from ahpa.transport.path import get_path
from ahpa.transport.solvers import SOLVERS, solve


@dataclass
class SamplerBundle:
    """Everything needed to turn noise into images: backbone, path, latent statistics, decoder."""

    model: SiT
    path: TPath
    latent_stats: ChannelStats
    encoder: PriorEncoder
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    compiled: Callable | None = field(default=None, repr=False)  # torch.compile(model), made on first use
    # the share of labels replaced by the null class in training (0: guidance has no trained unconditional branch);
    # None where unknown (an export from before the field, a converted checkpoint)
    label_dropout: float | None = None
    # class k's name where the training data recorded names (ahpa.data.class_names), for `--class NAME`; else None
    class_names: list[str] | None = None
    # an export's sampler settings: its run's sample section (SAMPLER_MATH), the defaults of `ahpa sample --model`;
    # None for an export from before them or a converted checkpoint
    sample_settings: dict | None = None

    def network(self, compile: bool) -> Callable:
        """The backbone to call: the model itself, or its compiled form (made once, then reused)."""
        if not compile:
            return self.model
        if self.compiled is None:
            self.compiled = torch.compile(self.model)
        return self.compiled

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.model.cfg
        return (c.in_channels, c.input_size, c.input_size)

    @property
    def num_classes(self) -> int:
        return self.model.cfg.num_classes


def class_balanced_labels(indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    return indices % num_classes


def round_robin_labels(indices: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Sample i's label among the given classes: the (i mod len(classes))-th, so any n consecutive samples hold each
    once (class_balanced_labels with classes 0..C-1)."""
    return torch.as_tensor(classes, dtype=torch.long)[indices % len(classes)]


def per_sample_noise(seed: int, indices: list[int], shape: tuple[int, ...], sde_steps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(initial noise [n, *shape], SDE noise [sde_steps, n, *shape] or None) from (seed, index)."""
    x0, extra = [], []
    for i in indices:
        g = generator(seed, i, stream=SAMPLE_STREAM)
        x0.append(torch.randn(shape, generator=g))
        if sde_steps:
            extra.append(torch.randn((sde_steps, *shape), generator=g))
    sde = torch.stack(extra, dim=1) if sde_steps else None  # [steps, n, *shape]
    return torch.stack(x0), sde


def _velocity_fn(bundle: SamplerBundle, compile: bool) -> Callable:
    net = bundle.network(compile)

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(bundle.device, bundle.autocast_dtype):
            return net(x, t, y)[0].float()

    return fn


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3]."""
    return (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1)


def sample_indices(indices) -> list[int]:
    """generate's sample indices as Python ints: each is hashed into its noise's seed by value, so that index 3 draws
    the same noise given as 3, numpy's int64(3) or torch's tensor(3), as `ahpa sample` draws for sample 3."""
    if isinstance(indices, int) or (isinstance(indices, (np.ndarray, torch.Tensor)) and indices.ndim != 1):
        raise ValueError(f"generate: indices must be a list of sample indices (e.g. list(range(8)) for samples 0-7), "
                         f"got {type(indices).__name__} {indices!r:.60}")
    try:  # a float (0.5) is refused, not truncated
        out = [operator.index(i) for i in indices]
    except TypeError:
        out = None
    if out is None or any(isinstance(i, bool) for i in indices):
        raise ValueError(f"generate: sample indices must be integers, got {indices!r:.80}")
    return out


def whole_seed(seed) -> int:
    try:
        return operator.index(seed)
    except TypeError:
        raise ValueError(f"generate: seed must be an integer, got {type(seed).__name__} {seed!r:.60}") from None


@torch.no_grad()
def generate(bundle: SamplerBundle, indices, labels, seed: int, cfg: SampleCfg) -> torch.Tensor:
    """uint8 [n, H, W, 3] images for sample indices `indices` (a list, range, array or tensor of n ints: sample i's
    noise is drawn from (seed, i)) with class `labels` (a tensor, array or list of n ints in [0, num_classes);
    num_classes itself, the null class, samples without a class). `cfg` is checked as the CLI checks its options (a
    SampleCfg, or a dict of some of its keys)."""
    cfg = checked_sample(cfg, "generate")  # the config's own ranges: steps=0 or cfg_scale=nan gave garbage images
    if cfg.solver not in SOLVERS:
        raise ValueError(f"unknown sampler {cfg.solver!r}; valid samplers: {', '.join(SOLVERS)}")
    indices, seed = sample_indices(indices), whole_seed(seed)
    if labels is None:  # torch's "Could not infer dtype of NoneType" said nothing of the fix
        raise ValueError(f"generate: labels are required, one class per sample; {bundle.num_classes} (this model's "
                         "null class) samples without a class")
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        # a cast to long would truncate 0.5 and 1.7 to classes 0 and 1 without a word
        raise ValueError(f"generate: labels must be integer class indices, got {labels.dtype} values; give integers "
                         "(e.g. labels.long() where they are whole numbers)")
    labels = labels.to(torch.long).reshape(-1)
    if len(labels) != len(indices):
        raise ValueError(f"generate: {len(indices)} sample indices but {len(labels)} labels; give one label per sample")
    if len(labels) and (labels.min() < 0 or labels.max() > bundle.num_classes):
        raise ValueError(f"generate: labels {labels.min().item()}..{labels.max().item()} lie outside this model's "
                         f"classes 0..{bundle.num_classes - 1} ({bundle.num_classes}, the null class, samples without a class)")
    sde_steps = cfg.steps - 1 if cfg.solver == "euler-maruyama" else 0
    x, sde = per_sample_noise(seed, indices, bundle.latent_shape, sde_steps)
    x, y = x.to(bundle.device), labels.to(bundle.device)
    fn = _velocity_fn(bundle, cfg.compile)
    interval = (cfg.guidance_low, cfg.guidance_high)

    def velocity(x_t: torch.Tensor, t: float) -> torch.Tensor:
        return guided_velocity(fn, x_t, t, y, bundle.model.null_class, cfg.cfg_scale, interval, cfg.micro_batch)

    latents = solve(cfg.solver, velocity, x, cfg.steps, bundle.path, None if sde is None else sde.to(bundle.device))
    raw = bundle.latent_stats.invert(latents, channel_dim=1)
    images = fixed_batch(bundle.encoder.decode, cfg.micro_batch, raw)
    return to_uint8(images).cpu()


def iter_samples(
    bundle: SamplerBundle, start: int, end: int, seed: int, batch_size: int, cfg: SampleCfg,
    labels: torch.Tensor | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yields (first index, uint8 images, labels) for samples [start, end) in batches."""
    for lo in range(start, end, batch_size):
        hi = min(lo + batch_size, end)
        idx = torch.arange(lo, hi)
        y = labels[lo:hi] if labels is not None else class_balanced_labels(idx, bundle.num_classes)
        yield lo, generate(bundle, idx.tolist(), y, seed, cfg), y


def write_npz(path: str | Path, images: np.ndarray | Iterable[np.ndarray], labels: np.ndarray,
              shape: tuple[int, ...] | None = None) -> Path:
    """ADM layout: arr_0 uint8 [N, H, W, 3], arr_1 int64 [N]; written atomically, as np.savez writes it.

    `images` is one array, or its consecutive pieces along N (with the whole `shape`), written one at a time:
    50,000 samples at 256 are 9.8 GB, which np.concatenate and np.savez would hold twice."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"sample output {str(path)!r} must end in .npz")
    if isinstance(images, np.ndarray):
        images, shape = [images], images.shape
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        _npy_member(z, "arr_0", np.dtype(np.uint8), tuple(shape), images)
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        _npy_member(z, "arr_1", labels.dtype, labels.shape, [labels])
    return path


def _npy_member(z: zipfile.ZipFile, name: str, dtype: np.dtype, shape: tuple[int, ...], pieces: Iterable[np.ndarray]) -> None:
    """One .npy file in the archive, its header first, then the pieces' bytes in order (C order along axis 0)."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    written = 0
    with z.open(f"{name}.npy", "w", force_zip64=True) as f:  # its size is not known before it is written
        np.lib.format.write_array_header_1_0(f, header)
        for piece in pieces:
            if piece.dtype != dtype or piece.shape[1:] != shape[1:]:
                raise ValueError(f"{name}: a piece of dtype {piece.dtype} and shape {piece.shape} in an array of "
                                 f"{dtype} {shape}")
            f.write(np.ascontiguousarray(piece).data)
            written += piece.shape[0]
    if written != shape[0]:
        raise ValueError(f"{name}: {written} rows written for an array of {shape[0]}")


# ---- export: the EMA backbone alone, with what sampling needs in the metadata ----

# the sample settings that decide what a model draws (not how fast: micro_batch, compile), recorded in an export so
# that sampling it draws what sampling its run draws
SAMPLER_MATH = ("solver", "steps", "cfg_scale", "guidance_low", "guidance_high")


def export_model(path: str | Path, model: SiT, latent_stats: ChannelStats, encoder_spec: str, path_name: str, resolution: int,
                 encoder_sha256: str | None = None, label_dropout: float | None = None,
                 class_names: list[str] | None = None, sample: SampleCfg | None = None,
                 posthoc: dict | None = None) -> Path:
    """The model as a safetensors file whose metadata names what sampling needs: the VAE (its spec, and the sha256
    of its weights when they come from a file, checked when the export is sampled), latent statistics, the path;
    the training's label dropout where known (0: no trained null class, so guidance has nothing to guide by); its
    classes' names where the data recorded them; and its run's sampler settings (`sample`, SAMPLER_MATH), which
    `ahpa sample --model` takes where its options are left out, as `--run` takes the run's; and, for an EMA
    reconstructed after training (`posthoc`, ahpa.train.posthoc_export), its sigma_rel, step, residual and snapshots."""
    meta = {
        "sit": model.cfg.to_dict(),
        "encoder": encoder_spec,
        "encoder_sha256": encoder_sha256,
        "latent_mean": latent_stats.mean.tolist(),
        "latent_std": latent_stats.std.tolist(),
        "transport_path": path_name,
        "resolution": resolution,
    }
    if label_dropout is not None:
        meta["label_dropout"] = label_dropout
    if class_names is not None:
        meta["class_names"] = list(class_names)
    if sample is not None:
        meta["sample"] = {k: getattr(sample, k) for k in SAMPLER_MATH}
    if posthoc is not None:
        meta["posthoc_ema"] = posthoc
    path = Path(path)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"ahpa": json.dumps(meta), "format": "pt"})
    return path


def export_metadata(path: str | Path) -> dict:
    """An export's metadata (the SiT's shape, its VAE, latent statistics, path), read from the file's header alone; a
    ValueError naming what the file is otherwise."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("ahpa")
    except Exception as e:  # safetensors raises its own error type for a file that is not one of its own
        raise ValueError(f"{path}: not a safetensors file ({e}). A training checkpoint is sampled through its run "
                         f"(--run RUN_DIR) or exported first with `ahpa export --run RUN_DIR`") from None
    if meta is None:
        raise ValueError(f"{path}: not an ahpa export (no 'ahpa' metadata); export one with `ahpa export`")
    return json.loads(meta)


def load_export(path: str | Path, device: str | torch.device, encoder: PriorEncoder | None = None) -> SamplerBundle:
    from safetensors.torch import load_file

    from ahpa.device import as_device
    from ahpa.priors.registry import load_encoder, parse_spec

    path, device = Path(path), as_device(device)
    if not path.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist")
    meta = export_metadata(path)
    if encoder is None:
        try:
            parse_spec(meta["encoder"])
        except ValueError as e:  # the export's kind, registered where it trained: say whose spec it is
            raise ValueError(f"{path} decodes with {meta['encoder']!r}: {e}") from None
    model = SiT(SiTConfig(**meta["sit"]))
    model.load_state_dict(load_file(str(path)), strict=True)
    try:
        enc = encoder if encoder is not None else load_encoder(meta["encoder"], device)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path} decodes with {meta['encoder']!r}, which is not here ({e}); name where that "
                                f"VAE is on this machine (`ahpa sample --encoder KIND:PATH`)") from None
    if enc.latent_channels != model.cfg.in_channels:  # would fail inside the decoder's first convolution
        raise ValueError(f"{getattr(enc, 'spec', 'the encoder')!r} has latents of {enc.latent_channels} channels, but "
                         f"{path} was trained on latents of {model.cfg.in_channels} ({meta['encoder']!r}): name that VAE")
    recorded, found = meta.get("encoder_sha256"), getattr(enc, "weights_sha256", None)
    if recorded and found and recorded != found:  # exports from before this field have none, and pass
        raise ValueError(f"{getattr(enc, 'spec', 'the encoder')!r} is not the VAE {path} was trained with: its weights' "
                         f"sha256 is {found[:12]}..., the export's {recorded[:12]}... ({meta['encoder']!r})")
    stats = ChannelStats(torch.tensor(meta["latent_mean"]), torch.tensor(meta["latent_std"]))
    return SamplerBundle(model.to(device).eval(), get_path(meta["transport_path"]), stats, enc, device,
                         label_dropout=meta.get("label_dropout"), class_names=meta.get("class_names"),
                         sample_settings={k: v for k, v in meta["sample"].items() if k in SAMPLER_MATH}
                         if isinstance(meta.get("sample"), dict) else None)


def unguidable(num_classes: int, label_dropout: float | None) -> str | None:
    """Why classifier-free guidance cannot work on a model, or None: with one class the conditional and unconditional
    predictions learn the same distribution, and without label dropout the null class's embedding never trained."""
    if num_classes == 1:
        return ("the model has a single class (its data had no labels): the class and the null class learn the same "
                "images, so guidance adds the noise of their difference, not conditioning, at twice the network calls")
    if label_dropout == 0:
        return ("the model was trained with train.label_dropout=0: its null class, the unconditional branch of "
                "guidance, never received a gradient")
    return None
