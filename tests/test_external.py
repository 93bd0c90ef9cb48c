"""REPA's external encoders: `dinov2:DIR` as before, `transformers:DIR` for the ViT-likes of REPA's comparison (DINOv2
with registers, CLIP, SigLIP, MAE), and kinds added by register_external or an installed package's entry point. The
models are tiny, with random weights, saved to temporary folders (nothing downloads)."""

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ahpa import config
from ahpa.external_kinds import EXTERNALS, register_external
from ahpa.priors.external import IMAGENET_MEAN, IMAGENET_STD, ExternalEncoder, load_external
from tests.conftest import FakeEntryPoint

SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers", reason="the transformers kinds need the optional extra ahpa[dinov2]")


@pytest.fixture
def kinds(monkeypatch):
    """The test's kinds go with it."""
    monkeypatch.setattr(EXTERNALS, "entries", dict(EXTERNALS.entries))


def _saved(model, folder, preprocessor=None):
    model.eval().save_pretrained(folder)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return model


def _pooled(tokens, grid):  # [B, s*s, C] -> [B, grid*grid, C], as ExternalEncoder pools
    b, n, c = tokens.shape
    side = int(n ** 0.5)
    return F.adaptive_avg_pool2d(tokens.transpose(1, 2).reshape(b, c, side, side), grid).flatten(2).transpose(1, 2)


def test_dinov2_gives_the_targets_it_gave(transformers, tmp_path):
    """`dinov2:DIR` is now a case of the patch-token module: bitwise the old composition (224x224, ImageNet's
    statistics, the CLS token dropped), and a preprocessor_config.json beside the weights changes nothing."""
    torch.manual_seed(0)
    model = _saved(transformers.Dinov2Model(transformers.Dinov2Config(**{**SMALL, "patch_size": 14, "image_size": 224})),
                   tmp_path / "dino", {"crop_size": {"height": 98, "width": 98}, "image_mean": [0.5] * 3})

    class OldTokens(nn.Module):  # ahpa.priors.external._Dinov2Tokens before this change
        def forward(self, x):
            return model(pixel_values=x).last_hidden_state[:, 1:]

    images = torch.rand(2, 3, 32, 32)
    got = load_external(f"dinov2:{tmp_path / 'dino'}")
    assert got.input_size == 224 and got.channels == 16
    # S = 16 tokens a side at 224: a B/2 or XL/2 SiT's 16x16 at 256 (S = G), and a /4's 8x8 (whole 2x2 windows)
    for grid in (16, 8, 4):
        assert torch.equal(got(images, grid), _old_targets(OldTokens(), images, grid, 224)), grid


def _old_targets(module, images, grid, size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """ExternalEncoder's forward before the encoder ran at the SiT's grid: resized to its input side, normalised,
    its tokens pooled to the grid whatever their side."""
    x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False)
    with torch.no_grad():
        tokens = module((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    return _pooled(tokens.float(), grid)


def test_dinov2_runs_where_its_patch_tokens_are_the_sits_grid(transformers, tmp_path):
    """At 512 a /2 SiT on SD-VAE has 32x32 tokens and DINOv2-B/14 at 224 16x16: REPA feeds it 448x448 images, so that
    each target is its own token's patch, where pooling 16 to 32 copied each target onto 2x2 tokens."""
    torch.manual_seed(0)
    model = _saved(transformers.Dinov2Model(transformers.Dinov2Config(**{**SMALL, "patch_size": 14, "image_size": 224})),
                   tmp_path / "dino")
    enc = load_external(f"dinov2:{tmp_path / 'dino'}")
    images = torch.rand(2, 3, 64, 64)
    x = F.interpolate(images, size=448, mode="bicubic", align_corners=False)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model(pixel_values=x).last_hidden_state[:, 1:]  # DINOv2 interpolates its position embeddings itself
    assert want.shape == (2, 32 * 32, 16)
    torch.testing.assert_close(enc(images, 32), want)
    assert enc.setup(32) == (f"REPA's encoder dinov2:{tmp_path / 'dino'}: 448x448 inputs (its 224x224 scaled to tile "
                             "the SiT's grid), 32x32 patch tokens (the SiT's grid), normalised with mean (0.485, 0.456, "
                             "0.406) std (0.229, 0.224, 0.225) (ImageNet's, as REPA feeds DINOv2)")
    assert enc.setup(8).startswith(f"REPA's encoder dinov2:{tmp_path / 'dino'}: 224x224 inputs, 16x16 patch tokens "
                                   "(averaged in 2x2 windows to the SiT's 8x8)")


def test_tiling_side_is_the_multiple_of_the_grid_nearest_the_encoders_own():
    from ahpa.priors.external import tiling_side

    # (encoder's token side, SiT's grid side) -> the token side it runs at
    cases = {(16, 16): 16, (16, 8): 16, (16, 32): 32, (16, 24): 24, (3, 8): 8, (24, 16): 16, (31, 16): 32,
             (40, 16): 32, (37, 16): 32, (4, 3): 3, (3, 2): 2}
    assert {k: tiling_side(*k) for k in cases} == cases


def _models(transformers):
    """(name, model, preprocessor_config.json or None, leading tokens, input side, mean, std, the model whose
    last_hidden_state the tokens are)."""
    clip_mean, clip_std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
    out = []
    if hasattr(transformers, "Dinov2WithRegistersModel"):  # CLS and 4 registers; a 24x24 crop: 3x3 patches of 8
        reg = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**SMALL, num_register_tokens=4))
        out.append(("dinov2-registers", reg, {"do_center_crop": True, "crop_size": {"height": 24, "width": 24},
                                              "size": {"shortest_edge": 28}, "image_mean": clip_mean, "image_std": clip_std},
                    5, 24, clip_mean, clip_std, reg))
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SMALL))
    out.append(("clip-vision", clip, None, 1, 32, IMAGENET_MEAN, IMAGENET_STD, clip))
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=99,
                bos_token_id=0, eos_token_id=1)
    both = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=SMALL, projection_dim=8))
    out.append(("clip-both-towers", both, {"crop_size": 32, "image_mean": clip_mean, "image_std": clip_std}, 1, 32,
                clip_mean, clip_std, both.vision_model))
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SMALL))
    out.append(("siglip", siglip, {"size": {"height": 32, "width": 32}, "image_mean": 0.5, "image_std": 0.5}, 0, 32,
                [0.5] * 3, [0.5] * 3, siglip))
    mae = transformers.ViTMAEModel(transformers.ViTMAEConfig(**SMALL, mask_ratio=0.0))
    out.append(("mae", mae, None, 1, 32, IMAGENET_MEAN, IMAGENET_STD, mae))
    return out


def test_the_transformers_kind_aligns_to_the_patch_tokens_of_repas_encoders(transformers, tmp_path):
    """Each model's own last_hidden_state less its leading tokens (CLS, registers), in raster order, at the input side
    and with the normalisation its preprocessor_config.json names (else its config's image_size and ImageNet's),
    pooled to the SiT's grid."""
    images = torch.rand(3, 3, 40, 40)
    for name, model, pre, leading, side, mean, std, ref in _models(transformers):
        torch.manual_seed(0)
        _saved(model, tmp_path / name, pre)
        enc = load_external(f"transformers:{tmp_path / name}")
        assert enc.input_size == side and enc.channels == 16, name
        torch.testing.assert_close(enc.mean.flatten(), torch.tensor(mean), msg=name)
        torch.testing.assert_close(enc.std.flatten(), torch.tensor(std), msg=name)
        x = F.interpolate(images, size=side, mode="bicubic", align_corners=False)
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            out = ref(pixel_values=x)
        hidden = out.last_hidden_state
        assert hidden.shape[1] == leading + (side // 8) ** 2, name
        patches = hidden[:, leading:]
        if name == "mae":  # MAE shuffles its tokens (all kept at mask_ratio 0): back to raster order
            patches = torch.gather(patches, 1, out.ids_restore[..., None].expand(-1, -1, 16))
        for grid in (1, side // 8):  # grids its own patch tokens tile
            got = enc(images, grid)
            assert got.shape == (3, grid * grid, 16), name
            torch.testing.assert_close(got, _pooled(patches, grid), msg=name)


def test_a_transformers_encoder_runs_at_the_side_whose_patch_tokens_tile_the_sits_grid(transformers, tmp_path):
    """A grid finer than the model's patch tokens (or one they do not tile) is met by running it at the input side
    whose tokens do: the model's own forward at that side, its position embeddings interpolated (asked by
    interpolate_pos_encoding=True where transformers asks; DINOv2 with registers does it unasked)."""
    T = transformers
    images = torch.rand(2, 3, 40, 40)
    models = _models(T) + [("vit", T.ViTModel(T.ViTConfig(**SMALL)), None, 1, 32, IMAGENET_MEAN, IMAGENET_STD, None)]
    if hasattr(T, "IJepaModel"):
        models.append(("ijepa", T.IJepaModel(T.IJepaConfig(**SMALL)), None, 0, 32, IMAGENET_MEAN, IMAGENET_STD, None))
    for name, model, pre, leading, side, mean, std, ref in models:
        ref = ref or model
        _saved(model, tmp_path / name, pre)
        enc = load_external(f"transformers:{tmp_path / name}")
        # 4x4 tokens at 32: twice as fine, and 3, which 4 does not tile; 3x3 at 24: twice as fine, and 2
        for grid, input_side in {32: [(8, 64), (3, 24)], 24: [(6, 48), (2, 16)]}[side]:
            x = F.interpolate(images, size=input_side, mode="bicubic", align_corners=False)
            x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
            asked = {} if name == "dinov2-registers" else {"interpolate_pos_encoding": True}
            with torch.no_grad():
                out = ref(pixel_values=x, **asked)
            patches = out.last_hidden_state[:, leading:]
            assert patches.shape[1] == grid * grid, (name, grid)
            if name == "mae":  # back to raster order, as above
                patches = torch.gather(patches, 1, out.ids_restore[..., None].expand(-1, -1, 16))
            assert enc.input_side(grid) == input_side, (name, grid)
            torch.testing.assert_close(enc(images, grid), patches, msg=f"{name} at grid {grid}")
            assert f": {input_side}x{input_side} inputs (its {side}x{side} scaled to tile the SiT's grid), {grid}x{grid} " \
                   "patch tokens (the SiT's grid)" in enc.setup(grid), name
        # at the grid of its own tokens, bitwise what it gave before: the model's forward as it was always called
        noise = {"noise": torch.arange((side // 8) ** 2).float().expand(2, -1)} if name == "mae" else {}
        as_before = lambda x: ref(pixel_values=x, **noise).last_hidden_state[:, leading:]  # noqa: E731
        assert torch.equal(enc(images, side // 8), _old_targets(as_before, images, side // 8, side, mean, std)), name


def test_a_model_repa_cannot_align_to_is_refused_naming_its_folder_and_the_fix(transformers, tmp_path):
    T = transformers
    _saved(T.ViTMAEModel(T.ViTMAEConfig(**SMALL)), tmp_path / "mae")  # the hub's MAE: mask_ratio 0.75
    _saved(T.ResNetModel(T.ResNetConfig(hidden_sizes=[8], depths=[1], embedding_size=8)), tmp_path / "resnet")
    _saved(T.ConvNextModel(T.ConvNextConfig(num_stages=1, hidden_sizes=[8], depths=[1], image_size=32)), tmp_path / "convnext")
    _saved(T.SiglipVisionModel(T.SiglipVisionConfig(**SMALL)), tmp_path / "oblong", {"size": {"height": 32, "width": 24}})
    _saved(T.SiglipVisionModel(T.SiglipVisionConfig(**SMALL)), tmp_path / "patch")
    _saved(T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                                    window_size=2)), tmp_path / "swin")  # merges patches: 16 tokens for 64 patches
    text = T.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=64)  # LLaVA: its image tower is `vision_tower`
    _saved(T.LlavaModel(T.LlavaConfig(vision_config=T.CLIPVisionConfig(**SMALL), text_config=text)), tmp_path / "llava")
    settings = json.loads((tmp_path / "patch" / "config.json").read_text())
    (tmp_path / "patch" / "config.json").write_text(json.dumps({**settings, "patch_size": [8, 4]}))
    cases = [
        ("mae", rf"mae/config.json: mask_ratio=0.75 makes this ViTMAE drop 75% of its patch tokens at random.*"
                rf"set \"mask_ratio\": 0.0 in that file.*mask_ratio=0.0\).save_pretrained\('{tmp_path / 'mae'}'\)"),
        ("resnet", r"resnet/config.json \(ResNetConfig\) has no patch_size: not a ViT-like token model.*register_external"),
        ("convnext", r"convnext holds a ConvNextModel, whose forward gives no last_hidden_state of tokens \[B, N, C\] "
                     r"\(shape \(1, 8, 8, 8\)\): not a ViT-like token model"),
        ("oblong", r"oblong/preprocessor_config.json: size is \{'height': 32, 'width': 24\}, not the side of a square"),
        ("patch", r"patch/config.json \(SiglipVisionConfig\) has patch_size=\[8, 4\], not a square patch"),
        ("swin", r"swin holds a SwinModel, which gives 16 tokens for a 32x32 image, fewer than its \(32 / 4\)\^2 = 64 "
                 r"patches \(a model that merges patches, as Swin does, is not ViT-like\)"),
        ("llava", r"llava holds a LlavaModel, whose image tower ahpa does not find \(no `vision_model`\): save the image "
                  r"tower alone, as a CLIPVisionModel"),
    ]
    for folder, message in cases:
        with pytest.raises(ValueError, match=message):
            load_external(f"transformers:{tmp_path / folder}")
    with pytest.raises(FileNotFoundError, match=r"model directory .*missing.* does not exist.*AutoImageProcessor"):
        load_external(f"transformers:{tmp_path / 'missing'}")


def test_a_half_precision_folder_loads_in_fp32(transformers, tmp_path):
    """transformers 5 loads a checkpoint in the dtype it was saved in: the encoder is made fp32, as the images are
    (autocast still applies), or its first layer refuses them."""
    _saved(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SMALL)).half(), tmp_path / "half")
    enc = load_external(f"transformers:{tmp_path / 'half'}")
    assert {p.dtype for p in enc.parameters()} == {torch.float32}
    assert enc(torch.rand(2, 3, 32, 32), 2).dtype == torch.float32


def test_the_input_side_and_normalisation_are_read_as_the_preprocessor_gives_them(tmp_path):
    """preprocessor_config.json's other forms: a resize to a shortest edge (no crop), no normalisation (the model
    sees [0, 1] images), and a size that is no side at all."""
    from types import SimpleNamespace

    from ahpa.priors.transformers_vit import preprocessing

    config = SimpleNamespace(image_size=64)
    assert preprocessing(tmp_path, config) == (64, IMAGENET_MEAN, IMAGENET_STD)  # no file: the config's
    file = tmp_path / "preprocessor_config.json"
    file.write_text(json.dumps({"do_center_crop": False, "crop_size": 24, "size": {"shortest_edge": 28}}))
    assert preprocessing(tmp_path, config) == (28, IMAGENET_MEAN, IMAGENET_STD)
    file.write_text(json.dumps({"size": 32, "do_normalize": False, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    assert preprocessing(tmp_path, config) == (32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    for size in (True, 0, [32, 24], {"height": 32}):
        file.write_text(json.dumps({"size": size}))
        with pytest.raises(ValueError, match=r"preprocessor_config.json: size is .*, not the side of a square input"):
            preprocessing(tmp_path, config)


def test_a_tiny_repa_run_trains_with_a_transformers_folder(transformers, tmp_path, tiny):
    from ahpa.train.loop import Trainer

    reg = getattr(transformers, "Dinov2WithRegistersModel", None)
    cls, cfg = (reg, transformers.Dinov2WithRegistersConfig) if reg else (transformers.Dinov2Model, transformers.Dinov2Config)
    vit = _saved(cls(cfg(**{**SMALL, "image_size": 16, "patch_size": 4})), tmp_path / "vit")
    tr = Trainer(tiny("align.method=repa", f"prior.external=transformers:{tmp_path / 'vit'}", "train.steps=2"),
                 tmp_path / "run")
    last = tr.run()
    assert tr.step == 2 and torch.isfinite(torch.tensor(last["loss/align"]))
    assert tr.parts.external.input_size == 16 and tr.parts.external.channels == 16
    # the start records the encoder's forward per image, which `ahpa compare` adds per FLOP: the model's on one
    # image at its input side. Before torch 2.15 the counter does not see the CPU's fused attention kernel (a GPU's it
    # does): the math attention counts more, by exactly the attention's two matmuls (q k^T, weights times v: 4 N^2 D
    # FLOPs a layer, N = 16 patches, the class token and the registers); torch 2.15 counts the CPU kernel as well
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    start = json.loads((tmp_path / "run" / "starts.jsonl").read_text().splitlines()[0])
    counts = []
    for backend in (None, SDPBackend.MATH):
        with (sdpa_kernel(backend) if backend else contextlib.nullcontext()), FlopCounterMode(display=False) as counter:
            tr.parts.external.module(torch.zeros(1, 3, 16, 16))
        counts.append(counter.get_total_flops())
    n = 16 + 1 + getattr(vit.config, "num_register_tokens", 0)
    attention = 4 * n * n * SMALL["hidden_size"] * SMALL["num_hidden_layers"]
    seen = torch.__version__ >= "2.15"  # the CPU kernel counted
    assert start["frozen_flops_per_image"] == counts[0] > 0
    assert counts[1] - counts[0] == (0 if seen else attention)


def test_a_run_says_what_its_encoder_runs_at_and_trains_where_its_tokens_are_coarser_than_the_grid(transformers, tmp_path, tiny):
    """A model of 2x2 patch tokens at its 8x8 for the tiny SiT's 4x4 grid: run at 16x16, and said in one message beside
    the run's first, with the normalisation its folder gives."""
    from ahpa.train.loop import Trainer

    reg = getattr(transformers, "Dinov2WithRegistersModel", None)
    cls, cfg = (reg, transformers.Dinov2WithRegistersConfig) if reg else (transformers.Dinov2Model, transformers.Dinov2Config)
    folder = tmp_path / "vit"
    _saved(cls(cfg(**{**SMALL, "image_size": 8, "patch_size": 4})), folder,
           {"size": {"height": 8, "width": 8}, "image_mean": [0.5] * 3, "image_std": [0.25] * 3})
    tr = Trainer(tiny("align.method=repa", f"prior.external=transformers:{folder}", "train.steps=2"), tmp_path / "run")
    assert tr.messages[1] == (f"REPA's encoder transformers:{folder}: 16x16 inputs (its 8x8 scaled to tile the SiT's "
                              "grid), 4x4 patch tokens (the SiT's grid), normalised with mean (0.5, 0.5, 0.5) std (0.25, "
                              f"0.25, 0.25) ({folder / 'preprocessor_config.json'})")
    last = tr.run()
    assert tr.step == 2 and torch.isfinite(torch.tensor(last["loss/align"]))


class Coarse(nn.Module):
    """A module of one input side whose patches are `patch` pixels: 2x2 tokens at 224 for patch 112."""

    def __init__(self, patch: int = 112, fixed_side: int | None = None):
        super().__init__()
        self.conv, self.fixed_side = nn.Conv2d(3, 8, patch, patch), fixed_side

    def forward(self, x):
        if self.fixed_side is not None and x.shape[-1] != self.fixed_side:  # as a ViT of fixed position embeddings
            raise RuntimeError(f"expected {self.fixed_side}x{self.fixed_side} images, got {tuple(x.shape)}")
        return self.conv(x).flatten(2).transpose(1, 2)  # [B, 8, s, s] -> [B, s*s, 8]


def test_a_module_whose_tokens_do_not_tile_the_grid_is_refused_unless_it_takes_another_side(tmp_path, tiny):
    """From Python, a module takes its input side only: 2x2 tokens for the tiny SiT's 4x4 (each target copied onto 2x2
    tokens) or 6x6 (windows of unequal size) are refused naming the sides and the fix, before a step; given its patch,
    it runs at the side that tiles the grid, unless it cannot."""
    from ahpa.train.loop import Trainer

    fix = r"take a model.preset of larger patch \(a coarser grid\), or an encoder that takes larger inputs"
    with pytest.raises(ValueError, match=r"^the Coarse given from Python gives 2x2 patch tokens for 224x224 inputs, fewer "
                                         r"than the SiT's 4x4 tokens: each target would be copied onto several tokens, "
                                         rf"not the tokens' patches; {fix} \(.*ExternalEncoder\(module, channels, "
                                         r"input_size, mean, std, patch_size=P\)"):
        Trainer(tiny("align.method=repa", "train.steps=1"), tmp_path / "coarse", external=Coarse())
    uneven = ExternalEncoder(Coarse(32), 8, input_size=192)
    with pytest.raises(ValueError, match=r"^the Coarse given from Python gives 6x6 patch tokens for 192x192 inputs, not a "
                                         r"multiple of the SiT's 4x4 tokens: targets would be averages over windows of "
                                         r"unequal size"):
        Trainer(tiny("align.method=repa", "train.steps=1"), tmp_path / "uneven", external=uneven)
    with pytest.raises(ValueError, match=r"gives 2x2 patch tokens for 224x224 inputs, fewer than the SiT's 4x4"):
        ExternalEncoder.wrap(Coarse())(torch.rand(1, 3, 16, 16), 4)  # the forward refuses as well: never upsampled

    module = Coarse()
    enc = ExternalEncoder(module, 8, input_size=224, patch_size=112)
    images = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(enc(images, 4), _old_targets(module, images, 4, 448))
    tr = Trainer(tiny("align.method=repa", "train.steps=1"), tmp_path / "scaled", external=enc)
    assert tr.messages[1].startswith("REPA's encoder the Coarse given from Python: 448x448 inputs (its 224x224 scaled to "
                                     "tile the SiT's grid), 4x4 patch tokens (the SiT's grid)")
    fixed = ExternalEncoder(Coarse(fixed_side=224), 8, input_size=224, patch_size=112)
    with pytest.raises(ValueError, match=rf"^the Coarse given from Python does not run at 448x448 inputs, the side at "
                                         rf"which its patch tokens tile the SiT's 4x4 \(RuntimeError: expected 224x224 "
                                         rf"images, got \(1, 3, 448, 448\)\); {fix}$"):
        Trainer(tiny("align.method=repa", "train.steps=1"), tmp_path / "fixed", external=fixed)


class Patchify(nn.Module):
    """A stand-in encoder of a package: 224x224 images -> 16 tokens of 8 channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 56, 56)

    def forward(self, x):
        return self.conv(x).flatten(2).transpose(1, 2)  # [B, 8, 4, 4] -> [B, 16, 8]


def test_a_registered_kind_is_checked_by_the_config_trains_and_is_named_where_unknown(kinds, tmp_path, tiny):
    from ahpa.train.loop import RunConfigError, Trainer
    from ahpa.train.resume import run_sampler

    register_external("patchify", lambda where: Patchify())
    enc = load_external("patchify:anything")
    assert isinstance(enc, ExternalEncoder) and enc.channels == 8 and not enc.module.training
    Trainer(tiny("align.method=repa", "prior.external=patchify:x", "train.steps=1"), tmp_path / "run").run()
    with pytest.raises(config.ConfigError, match=r"^overrides: prior.external='patchfy:x' is not valid: unknown external "
                                                 r"encoder kind 'patchfy' in 'patchfy:x' \(did you mean 'patchify'\?\); "
                                                 r"valid kinds: dinov2, transformers, patchify"):
        config.load(None, ["prior.external=patchfy:x"])
    for spec in ("dinov2", "dinov2:"):  # no folder: refused as the config is read, not when the run starts
        with pytest.raises(config.ConfigError, match=rf"prior.external='{spec}' is not valid: .* is not KIND:DIR; valid kinds"):
            config.load(None, [f"prior.external={spec}"])
    # another process (the kind registered in the notebook that trained): the run's file and the kind are named
    del EXTERNALS.entries["patchify"]
    with pytest.raises(config.ConfigError, match=r"run/config.yaml: prior.external='patchify:x' is not valid: unknown "
                                                 r"external encoder kind 'patchify'.*registered from Python exists only"):
        config.load(tmp_path / "run" / "config.yaml")
    with pytest.raises(RunConfigError, match=r"prior.external='patchify:x' is not valid.*this process lacks the "
                                             r"package or session code the run trained with"):
        Trainer(tiny("train.steps=2"), tmp_path / "run")  # a resume builds the aligner and its encoder
    # sampling needs the SiT alone (it used to be refused as the config is)
    bundle, step, run_cfg = run_sampler(tmp_path / "run", "cpu")
    assert step == 1 and run_cfg.prior.external == "patchify:x" and run_cfg.align.method == "repa"


def test_register_external_refuses_a_built_in_kind_and_a_loader_off_its_contract(kinds):
    with pytest.raises(ValueError, match=r"external encoder kind 'transformers' is built in \(every REPA run naming it"):
        register_external("transformers", lambda where: Patchify())
    with pytest.raises(ValueError, match=r"cannot be called as loader\(where: str\)"):
        register_external("two", lambda where, spec: Patchify())
    register_external("identity", lambda where: nn.Identity())
    with pytest.raises(ValueError, match=r"'identity' returned, for 'identity:x', what REPA cannot align to: the "
                                         r"external encoder returned \(1, 3, 224, 224\)"):
        load_external("identity:x")

    class Training(nn.Module):  # a loader's own ExternalEncoder, left in training mode with gradients
        def __init__(self):
            super().__init__()
            self.patchify, self.norm = Patchify(), nn.BatchNorm1d(8)

        def forward(self, x):
            return self.norm(self.patchify(x).transpose(1, 2)).transpose(1, 2)  # normalised over the tokens

    register_external("own", lambda where: ExternalEncoder(Training().train(), 8))
    own = load_external("own:x")
    assert not own.training and not own.module.norm.training and not any(p.requires_grad for p in own.parameters())

    def fails(where):
        raise KeyError(where)

    register_external("fails", fails)
    with pytest.raises(ValueError, match=r"the loader of external encoder kind 'fails' failed on 'fails:w': KeyError"):
        load_external("fails:w")


def test_an_installed_package_adds_an_external_kind(packages):
    """By an "ahpa.external_encoders" entry point (loaded when its kind is first used), or by its "ahpa.plugins"
    module calling register_external; a kind two packages give is refused naming both."""
    packages(FakeEntryPoint("pkg-mod", lambda: register_external("modenc", lambda where: Patchify())),
             externals=[FakeEntryPoint("pkg-enc", lambda: (lambda where: Patchify()), "pkgenc")])
    for kind in ("pkgenc", "modenc"):
        assert kind in EXTERNALS and config.load(None, [f"prior.external={kind}:x"]).prior.external == f"{kind}:x"
        assert load_external(f"{kind}:x").channels == 8
    packages(externals=[FakeEntryPoint("pkg-c", lambda: (lambda where, spec: Patchify()), "twoargs")])
    with pytest.raises(ValueError, match=r"the loader of external encoder kind 'twoargs' \(.*\) cannot be called as "
                                         r"loader\(where: str\)"):  # checked before the call, naming the contract
        load_external("twoargs:x")
    loader = lambda where: Patchify()  # noqa: E731
    packages(externals=[FakeEntryPoint("pkg-a", lambda: loader, "dup"), FakeEntryPoint("pkg-b", lambda: loader, "dup")])
    with pytest.raises(config.ConfigError, match=r"external encoder kind 'dup' is given by packages 'pkg-a', 'pkg-b'"):
        config.load(None, ["prior.external=dup:x"])


def test_dinov2_refuses_another_models_folder(transformers, tmp_path):
    """`dinov2:DIR` on a DINOv2-with-registers or CLIP folder loaded as a Dinov2Model with a transformers warning only:
    the registers dropped, or every weight left at random. REPA and FD-DINOv2 would have used features of no trained
    model; the folder is refused naming its config.json and the kind that reads it."""
    from ahpa.metrics import load_detector

    T = transformers
    _saved(T.CLIPVisionModel(T.CLIPVisionConfig(**SMALL)), tmp_path / "clip")
    folders = [("clip", "clip_vision_model")]
    if hasattr(T, "Dinov2WithRegistersModel"):
        _saved(T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**SMALL, num_register_tokens=4)), tmp_path / "reg")
        folders.append(("reg", "dinov2_with_registers"))
    for folder, model_type in folders:
        where = tmp_path / folder
        message = (rf"{where / 'config.json'}: model_type '{model_type}', not 'dinov2'.*name it transformers:{where} ")
        with pytest.raises(ValueError, match=message):
            load_external(f"dinov2:{where}")
        with pytest.raises(ValueError, match=message):
            load_detector(f"dinov2:{where}", torch.device("cpu"))
    (tmp_path / "clip" / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"clip/config.json is not a transformers config \(a JSON object\)"):
        load_external(f"dinov2:{tmp_path / 'clip'}")


def test_loading_a_folder_draws_no_progress_bar_of_transformers(transformers, tmp_path, capfd):
    """transformers 5 draws a "Loading weights" bar on every from_pretrained: once per REPA run and per FD-DINOv2
    evaluation, among the run's own bars. Loading prints nothing, and transformers' setting is left as it was."""
    from transformers.utils import logging as hf_logging

    _saved(transformers.Dinov2Model(transformers.Dinov2Config(**{**SMALL, "patch_size": 14, "image_size": 224})),
           tmp_path / "dino")
    _saved(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SMALL)), tmp_path / "clip")
    capfd.readouterr()
    for spec in (f"dinov2:{tmp_path / 'dino'}", f"transformers:{tmp_path / 'clip'}"):
        load_external(spec)
        out, err = capfd.readouterr()
        assert out == "" and "Loading" not in err and "%|" not in err, (spec, err[-500:])
    assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        load_external(f"dinov2:{tmp_path / 'dino'}")
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
