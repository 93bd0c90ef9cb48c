import pytest
import torch

from ahpa.models.sit import SIZES, SiT, SiTConfig


def expected_params(cfg: SiTConfig) -> int:
    """Parameter count of a vanilla SiT (velocity only, fixed sin-cos positions), from the architecture."""
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    m = int(d * cfg.mlp_ratio)
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d) + (6 * d * d + 6 * d)
    embed = (c * p * p * d + d) + (256 * d + d) + (d * d + d) + (cfg.num_classes + 1) * d
    final = (d * p * p * c + p * p * c) + (2 * d * d + 2 * d)
    return cfg.depth * block + embed + final


@pytest.mark.parametrize("size", ["S", "B"])
@pytest.mark.parametrize("patch", [1, 2, 4])
def test_small_presets_forward(size, patch):
    cfg = SiTConfig.preset(f"{size}/{patch}", input_size=8, in_channels=4, num_classes=10)
    model = SiT(cfg)
    x = torch.randn(2, 4, 8, 8)
    out, hidden = model(x, torch.rand(2), torch.tensor([1, 10]), taps=(2, 4))
    assert out.shape == x.shape
    assert [h.shape for h in hidden] == [(2, cfg.num_tokens, cfg.hidden_size)] * 2
    assert model.num_params() == expected_params(cfg)
    # adaLN-Zero and a zero output layer: the untrained prediction is exactly 0
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("name,approx", [("L/2", 458e6), ("XL/2", 675e6)])
def test_large_presets_parameter_count(name, approx):
    cfg = SiTConfig.preset(name, input_size=32, in_channels=4, num_classes=1000)
    with torch.device("meta"):
        model = SiT(cfg)
    n = model.num_params()
    assert n == expected_params(cfg)
    assert abs(n - approx) / approx < 0.01  # the published DiT/SiT sizes (which count learned sigma too)


def test_every_preset_builds_on_meta():
    for size in SIZES:
        for patch in (1, 2, 4):
            with torch.device("meta"):
                SiT(SiTConfig.preset(f"{size}/{patch}", input_size=32))


def test_bad_preset_and_sizes():
    with pytest.raises(ValueError, match="valid presets"):
        SiTConfig.preset("M/2")
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        SiT(SiTConfig.preset("S/4", input_size=6))


def test_qk_norm_and_null_class():
    cfg = SiTConfig.preset("S/2", input_size=8, num_classes=3, qk_norm=True)
    model = SiT(cfg)
    assert model.null_class == 3
    assert model.y_embedder.num_embeddings == 4
    out, _ = model(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([3]))
    assert torch.isfinite(out).all()
