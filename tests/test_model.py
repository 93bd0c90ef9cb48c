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


def _perturbed_sit(depth: int = 4) -> SiT:
    """A tiny SiT whose zero-initialised (adaLN-Zero) layers are perturbed, so every block and output matters."""
    torch.manual_seed(0)
    model = SiT(SiTConfig(input_size=8, in_channels=4, patch_size=2, hidden_size=64, depth=depth, num_heads=4, num_classes=10))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _loss_and_grads(model: SiT, taps=(2,)):
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(6, 4, 8, 8, generator=g), torch.rand(6, generator=g), torch.randint(0, 11, (6,), generator=g)
    out, hidden = model(x, t, y, taps)
    # the tapped hidden state gets a gradient of its own, as the alignment loss gives it in training
    loss = out.square().mean() + hidden[0].sin().mean()
    return loss, torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("blocks", [-1, 3])
def test_activation_checkpointing_keeps_loss_and_gradients(blocks):
    import copy

    ref = _perturbed_sit()
    ck = copy.deepcopy(ref)
    ck.set_activation_checkpointing(blocks)
    calls = [0] * 4  # forward calls per block: a checkpointed block runs again in the backward pass
    for i, block in enumerate(ck.blocks):
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    (loss_a, grads_a), (loss_b, grads_b) = _loss_and_grads(ref), _loss_and_grads(ck)
    n = 4 if blocks == -1 else blocks
    assert calls == [2] * n + [1] * (4 - n)
    # the recomputation repeats the same kernels on the same inputs: bitwise equal on the CPU
    assert torch.equal(loss_a, loss_b)
    for (name, _), a, b in zip(ref.named_parameters(), grads_a, grads_b):
        assert torch.equal(a, b), name
    with torch.no_grad():  # no backward to save for: nothing is recomputed
        calls[:] = [0] * 4
        ck(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]))
        assert calls == [1] * 4
    with pytest.raises(ValueError, match=r"give 0 \(off\), 1..4"):
        ck.set_activation_checkpointing(5)


def test_activation_checkpointing_composes_with_compile():
    """torch.compile traces the non-reentrant checkpoint (aot_eager: the same graph capture as inductor, no codegen)."""
    ref = _perturbed_sit(depth=2)
    ck = _perturbed_sit(depth=2)
    ck.set_activation_checkpointing(-1)
    graphs = []

    def backend(gm, example_inputs):  # records the captured graph, then compiles it as aot_eager does
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(ck, backend=backend)
    (loss_a, grads_a), (loss_b, grads_b) = _loss_and_grads(ref), _loss_and_grads(compiled)
    # one graph, no break at the checkpoints: both blocks are in it as checkpointed regions
    assert len(graphs) == 1
    assert sum("checkpoint" in str(node.target) for node in graphs[0].graph.nodes) == 2
    assert torch.allclose(loss_a, loss_b, rtol=1e-6)
    for (name, _), a, b in zip(ref.named_parameters(), grads_a, grads_b):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


def test_pooled_targets_are_row_major_like_the_sits_tokens():
    """pool_to_grid's token r*g + c is grid cell (row r, column c), as SiT.forward orders its patch tokens: a
    patch-2 SiT whose embedder averages each 2x2 patch of channel k into hidden channel k gives, as the tokens its
    first block reads (less the position embedding), exactly the pooled targets."""
    import torch.nn.functional as F

    from ahpa.models.sit import SiT, SiTConfig
    from ahpa.priors.targets import pool_to_grid

    feat = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    tokens = pool_to_grid(feat, 4)  # [2, 16, 3]
    cells = F.avg_pool2d(feat, 2)  # [2, 3, 4, 4]
    assert all(torch.equal(tokens[:, r * 4 + c], cells[:, :, r, c]) for r in range(4) for c in range(4))
    model = SiT(SiTConfig(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                          num_classes=2)).eval()
    with torch.no_grad():
        model.x_embedder.weight.zero_()
        model.x_embedder.bias.zero_()
        for k in range(3):
            model.x_embedder.weight[k, k] = 0.25
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(feat, torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert torch.allclose((seen[0] - model.pos_embed)[..., :3], tokens, atol=1e-6)


def test_a_tap_is_the_hidden_tokens_after_that_block_counted_from_1():
    """taps=(d,) returns the output of the d-th block (REPA's "encoder depth" d, counted from 1), read here by a
    forward hook on each block."""
    model = _perturbed_sit(depth=4)
    outputs = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: outputs.append(out))
    with torch.no_grad():
        _, hidden = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]), taps=(1, 3))
    assert len(outputs) == 4 and torch.equal(hidden[0], outputs[0]) and torch.equal(hidden[1], outputs[2])


@pytest.mark.parametrize("name,gmacs", [("S/2", 6.06), ("B/2", 23.01), ("L/2", 80.71), ("XL/2", 118.64)])
def test_flops_are_twice_the_multiply_adds_the_dit_paper_gives(name, gmacs):
    """flops_per_image is 2 x the forward's multiply-adds (training: 3x it, so 6 x the multiply-adds; the MFU
    convention), against DiT's published Gflops (multiply-adds) at 256x256 (latent 4x32x32), within 1%."""
    cfg = SiTConfig.preset(name, input_size=32, in_channels=4, num_classes=1000)
    with torch.device("meta"):
        model = SiT(cfg)
    assert model.flops_per_image() == pytest.approx(2 * gmacs * 1e9, rel=0.01)
