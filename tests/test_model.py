import itertools
import math

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


def test_forward_matches_dit_written_out():
    """The forward against DiT's computation written out here with plain tensor ops, in float64: the patch embedding
    as a matmul over each patch's pixels, the t (x 1000) and class embeddings, adaLN-Zero's six chunks in DiT's
    order (shift, scale, gate for attention, then for the MLP), timm's qkv layout, the tanh GELU, the final layer's
    (shift, scale) and unpatchify's layout (per token, pixel (p, q), then channel fastest). Shapes, parameter counts
    and the zero start all stay right under a swapped chunk or axis; this does not. (The position embedding is
    checked against MAE's definition in test_convert.)"""
    import torch.nn.functional as F

    torch.manual_seed(0)
    P, G, C, D, H = 2, 4, 3, 32, 4
    model = SiT(SiTConfig(input_size=G * P, in_channels=C, patch_size=P, hidden_size=D, depth=2, num_heads=H,
                          num_classes=10)).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # away from the zero start, where every block is the identity
            p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, C, G * P, G * P, dtype=torch.float64, generator=g)
    t, y = torch.tensor([0.3, 0.8], dtype=torch.float64), torch.tensor([4, 10])
    with torch.no_grad():
        got, (tapped,) = model(x, t, y, taps=(1,))
    sd = model.state_dict()
    lin = lambda h, name: h @ sd[name + ".weight"].T + sd[name + ".bias"]  # noqa: E731
    norm = lambda h: (h - h.mean(-1, keepdim=True)) / (h.var(-1, False, keepdim=True) + 1e-6).sqrt()  # noqa: E731
    gelu = lambda h: 0.5 * h * (1 + torch.tanh((2 / math.pi) ** 0.5 * (h + 0.044715 * h**3)))  # noqa: E731
    # token r * G + c holds the pixels of patch (row r, column c), ordered (channel, p, q) as the conv's [D, C, P, P]
    patches = x.reshape(2, C, G, P, G, P).permute(0, 2, 4, 1, 3, 5).reshape(2, G * G, C * P * P)
    h = patches @ sd["x_embedder.weight"].reshape(D, -1).T + sd["x_embedder.bias"] + model.pos_embed
    # the sinusoid of 1000 t is computed in fp32 (timestep_embedding's contract), the rest in the model's dtype
    args = (1000 * t).float()[:, None] * torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    c = lin(F.silu(lin(torch.cat([args.cos(), args.sin()], -1).double(), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.weight"][y]  # [B, D]
    for i in range(2):
        b = f"blocks.{i}."
        shift1, scale1, gate1, shift2, scale2, gate2 = lin(F.silu(c), b + "adaLN_modulation.1")[:, None].chunk(6, -1)
        qkv = lin(norm(h) * (1 + scale1) + shift1, b + "attn.qkv").reshape(2, G * G, 3, H, D // H)
        q, k, v = qkv.unbind(2)  # [B, N, H, Dh] each
        att = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / (D // H) ** 0.5, dim=-1)
        h = h + gate1 * lin(torch.einsum("bhnm,bmhd->bnhd", att, v).reshape(2, G * G, D), b + "attn.proj")
        h = h + gate2 * lin(gelu(lin(norm(h) * (1 + scale2) + shift2, b + "mlp.fc1")), b + "mlp.fc2")
        if i == 0:
            assert torch.allclose(tapped, h, atol=1e-10)  # taps count blocks from 1: after the first block
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1")[:, None].chunk(2, -1)
    out = lin(norm(h) * (1 + scale) + shift, "final_layer.linear")  # [B, N, P * P * C]
    want = torch.empty_like(x)
    for r, col, p, q in itertools.product(range(G), range(G), range(P), range(P)):
        want[:, :, r * P + p, col * P + q] = out[:, r * G + col, (p * P + q) * C : (p * P + q + 1) * C]
    assert torch.allclose(got, want, atol=1e-10)


def test_a_config_without_a_position_order_means_ahpas_row_first_layout():
    """pos_embed_order "hw" (ahpa's own): the first half of the channels encodes the row only, the second the column
    only. A config written before the field existed (a checkpoint's, an export's) gets this default: changing it
    would silently give those models another position embedding."""
    from ahpa.models.sit import sincos_pos_embed

    old = {k: v for k, v in SiTConfig().to_dict().items() if k != "pos_embed_order"}
    assert SiTConfig(**old).pos_embed_order == "hw"
    emb = sincos_pos_embed(16, 4, "hw").reshape(4, 4, 16)  # [row, column, channel]
    assert torch.equal(emb[:, :1, :8].expand(4, 4, 8), emb[..., :8])  # the same along a row: the row's code
    assert torch.equal(emb[:1, :, 8:].expand(4, 4, 8), emb[..., 8:])  # the same down a column: the column's code


def test_every_block_starts_as_the_identity():
    """adaLN-Zero (DiT): each block's modulation starts at zero, so its gates are 0 and a fresh block passes its input
    through. The zero output layer alone makes the untrained prediction 0 whatever the blocks do."""
    model = SiT(SiTConfig(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=4,
                          num_classes=10))
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in model.blocks:
        assert torch.equal(block(h, c), h)


@pytest.mark.parametrize("preset", ["S/1", "B/2", "XL/4"])
def test_flops_per_image_counts_the_per_token_layers_and_attention(preset):
    """2 x multiply-adds per image, counted here from the model's own layers: every per-token matmul (patch
    embedding, qkv, output projection, the MLP's two, the final linear) N times, plus attention's two N x N x D
    products per block. The per-image conditioning (adaLN, the t and class embedders) is left out: under 1/N of it."""
    cfg = SiTConfig.preset(preset, input_size=32)
    with torch.device("meta"):
        model = SiT(cfg)
    per_token = ("x_embedder.weight", "qkv.weight", "attn.proj.weight", "fc1.weight", "fc2.weight",
                 "final_layer.linear.weight")
    macs = sum(p.numel() for name, p in model.named_parameters() if name.endswith(per_token))
    n, d = cfg.num_tokens, cfg.hidden_size
    assert model.flops_per_image() == 2 * n * macs + cfg.depth * 2 * (2 * n * n * d)


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
