"""REPA's external encoders from `transformers` (an optional dependency), read from local save_pretrained folders,
never downloaded: DINOv2 (`dinov2:DIR`) and any ViT-like vision model AutoModel loads (`transformers:DIR`: DINOv2
with registers, CLIP's and SigLIP's image towers, MAE, I-JEPA, ...), as the patch tokens of their last hidden state.

A ViT's last_hidden_state [B, N, C] is some leading tokens (CLS, register tokens, a distillation token; none for
SigLIP or I-JEPA), then the (S / p)^2 patch tokens in raster order, S the input side and p the patch size. The
leading N - (S / p)^2 are dropped by count, so no model needs a rule of its own. The input side and normalisation
are those of the folder's preprocessor_config.json (what the model was trained with), else the config's image_size
and ImageNet's mean and std. Where that side's patch tokens do not tile the SiT's grid (too few: DINOv2's 16 a side
at 224 against a /2 model's 32 at 512; or not a multiple), the model runs at the side whose tokens do
(ExternalEncoder.input_side), as REPA feeds DINOv2 448x448 images at 512: DINOv2 interpolates its position
embeddings at any side, and the ViT-likes of transformers that do not (CLIP, SigLIP, MAE, ViT, I-JEPA) are asked to
by `interpolate_pos_encoding=True`.

A folder of several towers (CLIPModel, SiglipModel: what the hub holds for CLIP and SigLIP) gives its image tower,
the module CLIPVisionModel / SiglipVisionModel wrap, with the same outputs: REPA aligns to the image tokens, and
refusing the folder would make every user save the tower alone first, a step whose only effect is to drop the text
tower. The folder loads as the class it was saved as (loading CLIPVisionModel from it would make transformers 5 log
each text weight as unexpected, on every run).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from torch import nn

from ahpa.config import shown
from ahpa.priors.external import IMAGENET_MEAN, IMAGENET_STD, ExternalEncoder

PREPROCESSOR = "preprocessor_config.json"
DINOV2_INPUT = 224  # dinov2:DIR's input side, as REPA feeds DINOv2 for 256x256 images
NOT_A_VIT = ("REPA aligns to a ViT's patch tokens: name the folder of a ViT-like model (DINOv2, CLIP, SigLIP, MAE, "
             "I-JEPA), or load another encoder yourself (ahpa.register_external, or Trainer(external=module))")


class PatchTokens(nn.Module):
    """A transformers ViT as a module from normalised images [B, 3, S, S] to its patch tokens [B, (S / p)^2, C], at
    its own input side `side` or, its position embeddings interpolated, another."""

    def __init__(self, model: nn.Module, patch: int, side: int, fixed_order: bool = False):
        super().__init__()
        self.model, self.patch, self.side = model, patch, side
        # ViTMAE orders its tokens by argsort(noise), random unless given, even when it keeps them all: an ascending
        # noise keeps the raster order
        self.fixed_order = fixed_order
        # CLIP, SigLIP, MAE, ViT, I-JEPA add their position embeddings as trained unless asked to interpolate them
        # (transformers 4.57 and 5); DINOv2 and DINOv2 with registers interpolate them at any side, unasked
        self.interpolates = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters

    def patches(self, x: torch.Tensor) -> int:
        return (x.shape[-1] // self.patch) ** 2

    def outputs(self, x: torch.Tensor):
        # asked at another side only: at its own, the model runs exactly as it always did
        kwargs = {"interpolate_pos_encoding": True} if self.interpolates and x.shape[-1] != self.side else {}
        if self.fixed_order:
            kwargs["noise"] = torch.arange(self.patches(x), device=x.device, dtype=torch.float32).expand(x.shape[0], -1)
        return self.model(pixel_values=x, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.outputs(x).last_hidden_state  # [B, N, C]
        return hidden[:, hidden.shape[1] - self.patches(x):]  # the leading non-patch tokens dropped -> [B, patches, C]


def load_dinov2_tokens(where: str) -> ExternalEncoder:
    """`dinov2:DIR`: DINOv2's patch tokens at 224x224 (or the side whose tokens tile a finer SiT grid) with ImageNet's
    normalisation, whatever the folder holds beside the weights (runs that name it keep their targets)."""
    model = load_dinov2(where, f"dinov2:{where}")
    patch = model.config.patch_size
    return ExternalEncoder(PatchTokens(model, patch, DINOV2_INPUT), model.config.hidden_size, input_size=DINOV2_INPUT,
                           patch_size=patch, origin="ImageNet's, as REPA feeds DINOv2")


def load_vit_tokens(where: str) -> ExternalEncoder:
    """`transformers:DIR`: the patch tokens of the ViT-like model AutoModel loads from DIR (the image tower of a
    folder of several towers), at the input side and with the normalisation its folder names."""
    spec = f"transformers:{where}"
    path = _folder(where, spec, "model", "AutoModel", "facebook/dinov2-with-registers-base",
                   ", and its image processor beside it (AutoImageProcessor, the same way): the input side and "
                   "normalisation the model was trained with")
    transformers = _transformers(spec)
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    tower = getattr(config, "vision_config", None) or config  # CLIP, SigLIP: the image tower's settings
    patch = _patch_size(tower, path)
    side, mean, std = preprocessing(path, tower)
    origin = str(path / PREPROCESSOR) if (path / PREPROCESSOR).is_file() else "ImageNet's: no preprocessor_config.json"
    mask_ratio = getattr(tower, "mask_ratio", None)
    if mask_ratio:
        raise ValueError(
            f"{path / 'config.json'}: mask_ratio={mask_ratio} makes this {type(tower).__name__.removesuffix('Config')} "
            f"drop {mask_ratio:.0%} of its patch tokens at random, other ones each call, and REPA aligns every patch: "
            f"set \"mask_ratio\": 0.0 in that file, or save the model so: ViTMAEModel.from_pretrained(HUB_ID, "
            f"mask_ratio=0.0).save_pretrained('{path}')")
    model = from_folder(transformers.AutoModel, path)
    if tower is not config:
        model = _image_tower(model, tower, path)
    # fp32 as our images are (transformers 5 loads a half-precision checkpoint as it was saved); autocast still applies
    module = PatchTokens(model.float(), patch, side, fixed_order=mask_ratio is not None)
    return ExternalEncoder(module, _channels(module, side, patch, path), side, mean, std, patch_size=patch, origin=origin)


def preprocessing(path: Path, config) -> tuple[int, tuple, tuple]:
    """(input side, mean, std) of the model in `path`: its preprocessor_config.json's (the crop when it crops, else
    the resize; its image_mean and image_std), else `config`'s image_size and ImageNet's statistics."""
    file = path / PREPROCESSOR
    if not file.is_file():
        return _side(getattr(config, "image_size", None), f"{path / 'config.json'}: image_size"), IMAGENET_MEAN, IMAGENET_STD
    pre = json.loads(file.read_text())
    key = "crop_size" if pre.get("do_center_crop", "crop_size" in pre) and pre.get("crop_size") else "size"
    side = _side(pre.get(key), f"{file}: {key}")
    if not pre.get("do_normalize", True):
        return side, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return side, _rgb(pre.get("image_mean", IMAGENET_MEAN), file, "image_mean"), _rgb(pre.get("image_std", IMAGENET_STD), file, "image_std")


def _side(size, where: str) -> int:
    """One side of a square input: an int, [S, S], {"height": S, "width": S} or {"shortest_edge": S} (a square
    image resized so keeps its shape)."""
    given = size
    if isinstance(size, dict):
        size = size.get("shortest_edge") or [size.get("height"), size.get("width")]
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    raise ValueError(f"{where} is {given!r}, not the side of a square input: REPA pools the patch tokens of a square "
                     "image to a square grid; give the square side the model was trained at")


def _patch_size(config, path: Path) -> int:
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, (list, tuple)) and len(patch) == 2 and patch[0] == patch[1]:
        patch = patch[0]
    if isinstance(patch, int) and not isinstance(patch, bool) and patch > 0:
        return patch
    what = "has no patch_size" if patch is None else f"has patch_size={patch!r}, not a square patch"
    raise ValueError(f"{path / 'config.json'} ({type(config).__name__}) {what}: not a ViT-like token model. {NOT_A_VIT}")


def _rgb(values, file: Path, key: str) -> tuple:
    values = [values] * 3 if isinstance(values, (int, float)) else values
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        raise ValueError(f"{file}: {key} is {values!r}; give three numbers, one per RGB channel")
    return tuple(float(v) for v in values)


def _image_tower(model: nn.Module, tower_config, path: Path) -> nn.Module:
    """The image tower of a model of several towers, found where CLIP, SigLIP, BLIP and their kin keep it."""
    tower = getattr(model, "vision_model", None)
    if isinstance(tower, nn.Module):
        return tower
    from transformers import MODEL_MAPPING

    try:
        vision_class = MODEL_MAPPING[type(tower_config)].__name__
    except KeyError:
        vision_class = "its vision model class"
    raise ValueError(f"{path} holds a {type(model).__name__}, whose image tower ahpa does not find (no `vision_model`): "
                     f"save the image tower alone, as a {vision_class}, with save_pretrained, and name that folder")


def _channels(module: PatchTokens, side: int, patch: int, path: Path) -> int:
    """The token width, from one forward of a blank image, which also refuses a model that gives no patch tokens."""
    with torch.no_grad():
        out = module.outputs(torch.zeros(1, 3, side, side))
    hidden = getattr(out, "last_hidden_state", None)
    model = type(module.model).__name__
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        got = "none" if hidden is None else f"shape {tuple(hidden.shape)}"
        raise ValueError(f"{path} holds a {model}, whose forward gives no last_hidden_state of tokens [B, N, C] ({got}): "
                         f"not a ViT-like token model. {NOT_A_VIT}")
    patches = (side // patch) ** 2
    if hidden.shape[1] < patches:
        raise ValueError(f"{path} holds a {model}, which gives {hidden.shape[1]} tokens for a {side}x{side} image, fewer "
                         f"than its ({side} / {patch})^2 = {patches} patches (a model that merges patches, as Swin "
                         f"does, is not ViT-like). {NOT_A_VIT}")
    return int(hidden.shape[-1])


def load_dinov2(path: str | Path, spec: str):
    """transformers' Dinov2Model from a local save_pretrained directory (never a download). Another model's folder is
    refused: Dinov2Model loads one with a warning only, a DINOv2 with registers without its registers, and any other
    ViT as a randomly initialised DINOv2, whose features would be no model's."""
    path = _folder(path, spec, "DINOv2", "Dinov2Model", "facebook/dinov2-base",
                   " (REPA's B/2 and XL/2 use ViT-B/14, dinov2-base)")
    file = path / "config.json"
    try:
        model_type = json.loads(file.read_text()).get("model_type") if file.is_file() else "dinov2"  # transformers says
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{file} is not a transformers config (a JSON object): {e}; save the model again") from None
    if model_type != "dinov2":
        raise ValueError(f"{file}: model_type {model_type!r}, not 'dinov2': {spec!r} loads transformers' Dinov2Model, "
                         f"which would take this model's weights only in part or not at all. For REPA's encoder, name it "
                         f"transformers:{path} (any ViT-like model, DINOv2 with registers, CLIP, SigLIP); FD-DINOv2 is "
                         "measured with DINOv2 itself (facebook/dinov2-large)")
    return from_folder(_transformers(spec).Dinov2Model, path)


def from_folder(model_class, path: Path) -> nn.Module:
    """`model_class.from_pretrained` of a local folder (never a download), without the progress bar transformers 5
    draws on every load ("Loading weights"): a library prints nothing of its own, and the run's bars say what it
    does. transformers' setting for bars is put back as it was."""
    from transformers.utils import logging as hf_logging

    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return model_class.from_pretrained(str(path), local_files_only=True)
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()


def _folder(where: str | Path, spec: str, what: str, model_class: str, example: str, note: str = "") -> Path:
    """The local folder a spec names, or an error saying how to make it once where the hub is reachable."""
    path = Path(where).expanduser()
    if path.is_dir():
        return path
    hub = "" if path.is_absolute() or str(path).count("/") != 1 else (
        f"; a hub id is not read here (nothing downloads during training), so if {str(path)!r} is one, ")
    raise FileNotFoundError(
        f"{what} directory {shown(path)} (from {spec!r}) does not exist{hub or '; '}make the folder "
        f"once where the hub is reachable: python -c \"from transformers import {model_class} as M; "
        f"M.from_pretrained('{example}').save_pretrained('{path}')\"{note}")


def _transformers(spec: str):
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"{spec!r} needs the `transformers` package: pip install transformers (the dinov2 extra: "
                          "pip install -e '.[dinov2]' in a checkout)") from e
    return transformers
