import pytest
import torch

from ahpa.align import METHODS, get_method, resolve_levels
from ahpa.align.loss import cosine_loss, router_objective
from ahpa.align.objective import Aligner
from ahpa.align.projector import Projector
from ahpa.align.router import Router, keep_topk, snr_schedule
from ahpa.config import AlignCfg


def test_router_weights_sum_to_one_and_change_with_t():
    router = Router(4, "soft")
    t = torch.linspace(0, 1, 11)
    w0 = router(t)
    assert torch.allclose(w0, torch.full_like(w0, 0.25))  # initialised uniform
    opt = torch.optim.SGD(router.parameters(), lr=1.0)
    losses = torch.stack([t, 1 - t, torch.full_like(t, 0.5), torch.full_like(t, 0.5)], 1)  # level 0 best near t=0
    for _ in range(50):
        opt.zero_grad()
        router_objective(router(t), losses, None, 0.0).backward()
        opt.step()
    w = router(t)
    assert torch.allclose(w.sum(1), torch.ones(11), atol=1e-6)
    assert w[0].argmax() == 0 and w[-1].argmax() == 1  # learned: the easy level at each end


def test_fixed_and_topk_modes():
    t = torch.tensor([0.0, 1.0])
    w = snr_schedule(t, 5, 0.25)
    assert torch.allclose(w.sum(1), torch.ones(2))
    assert w[0].argmax() == 0 and w[1].argmax() == 4  # fine near the data, coarse at high noise
    k = keep_topk(torch.tensor([[0.1, 0.5, 0.15, 0.25]]), 2)
    assert torch.allclose(k, torch.tensor([[0.0, 2 / 3, 0.0, 1 / 3]]))
    assert torch.allclose(Router(3, "uniform")(t), torch.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="valid modes"):
        Router(3, "hard")


def test_cosine_loss_is_vectorised_and_fp32():
    p, q = torch.randn(3, 5, 7, dtype=torch.bfloat16), torch.randn(3, 5, 7, dtype=torch.bfloat16)
    out = cosine_loss(p, q)
    assert out.dtype == torch.float32 and out.shape == (3,)
    assert torch.allclose(cosine_loss(q, q), torch.zeros(3), atol=1e-2)


def test_shared_trunk_projector_splits_heads():
    proj = Projector(16, [3, 5, 2], proj_dim=32, shared_trunk=True)
    outs = proj(torch.randn(2, 4, 16))
    assert [o.shape for o in outs] == [(2, 4, 3), (2, 4, 5), (2, 4, 2)]
    sep = Projector(16, [3, 5, 2], proj_dim=32, shared_trunk=False)
    assert sep.flops_per_token() > proj.flops_per_token()  # shared trunk is the cheap option


def test_method_registry_and_levels():
    avail = ["stage1", "stage2", "latent"]
    assert resolve_levels(get_method("ahpa"), avail, []) == avail
    assert resolve_levels(get_method("vae-latent"), avail, []) == ["latent"]
    assert resolve_levels(get_method("vae-level"), avail, ["stage2"]) == ["stage2"]
    assert resolve_levels(get_method("none"), avail, []) == []
    with pytest.raises(ValueError, match="exactly one level"):
        resolve_levels(get_method("vae-level"), avail, [])
    with pytest.raises(ValueError, match="does not provide"):
        resolve_levels(get_method("ahpa"), avail, ["mid"])
    with pytest.raises(ValueError, match="valid methods"):
        get_method("sra")
    assert set(METHODS) == {"none", "repa", "vae-latent", "vae-level", "multi-uniform", "ahpa"}


def test_aligner_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = AlignCfg(projector_dim=32)
    al = Aligner(16, ["a", "b"], [3, 4], cfg, "soft", "cosine")
    hidden = torch.randn(4, 6, 16)
    targets = [torch.randn(4, 6, 3), torch.randn(4, 6, 4)]
    t = torch.rand(4)
    opt = torch.optim.Adam(al.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss, m = al(hidden, targets, t)
        first = first if first is not None else m["align/weighted"].item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m["align/weighted"].item() < 0.5 * first
    assert m["align/level_loss"].shape == (2,)
    assert al.num_updates.item() == 30 and torch.all(al.running_loss > 0)
