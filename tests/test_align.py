import math

import pytest
import torch

from ahpa.align import METHODS, get_method, resolve_levels
from ahpa.align.loss import cosine_loss, entropy, router_objective
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
    # the Gaussian window by hand: t = 0.3, centres 0, 0.5, 1, width 0.25: logits -(t - c)^2 / (2 * 0.25^2)
    logits = [-((0.3 - c) ** 2) / (2 * 0.25**2) for c in (0.0, 0.5, 1.0)]
    want = torch.tensor([math.exp(v) for v in logits]) / sum(math.exp(v) for v in logits)
    assert torch.allclose(snr_schedule(torch.tensor([0.3]), 3, 0.25)[0], want, atol=1e-6)
    k = keep_topk(torch.tensor([[0.1, 0.5, 0.15, 0.25]]), 2)
    assert torch.allclose(k, torch.tensor([[0.0, 2 / 3, 0.0, 1 / 3]]))
    assert torch.allclose(Router(3, "uniform")(t), torch.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="valid modes"):
        Router(3, "hard")


def test_the_router_temperature_divides_the_logits():
    """softmax(logits / tau): tau = 0.5 doubles the logits. The default tau = 1 cannot tell / from * or none."""
    router = Router(3, "soft", tau=0.5)
    with torch.no_grad():
        router.mlp[-1].bias.copy_(torch.tensor([1.0, 0.0, -1.0]))  # last weight is zero: these are the logits
    want = torch.tensor([math.exp(2.0), 1.0, math.exp(-2.0)]) / (math.exp(2.0) + 1.0 + math.exp(-2.0))
    assert torch.allclose(router(torch.tensor([0.2, 0.9])), want.expand(2, 3), atol=1e-6)


def test_the_router_objective_and_entropy_by_hand():
    """mean_b [sum_k g_k r_k - eta H(g)], r_k = l_k / m_k, H = -sum g log g; samples not `active` add 0 to the
    mean (they still count in it)."""
    weights = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    losses = torch.tensor([[0.2, 0.4], [1.0, 3.0]])
    running = torch.tensor([0.5, 2.0])
    h = [math.log(2), -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))]
    assert torch.allclose(entropy(weights), torch.tensor(h))
    per_sample = [0.5 * 0.4 + 0.5 * 0.2 - 0.1 * h[0], 0.9 * 2.0 + 0.1 * 1.5 - 0.1 * h[1]]
    got = router_objective(weights, losses, running, 0.1)
    assert got.item() == pytest.approx(sum(per_sample) / 2, rel=1e-6)
    got = router_objective(weights, losses, running, 0.1, torch.tensor([1.0, 0.0]))
    assert got.item() == pytest.approx(per_sample[0] / 2, rel=1e-6)


def test_a_fixed_mode_registered_without_its_branch_is_named(monkeypatch):
    from ahpa.align.methods import ROUTER_MODES, RouterMode

    monkeypatch.setitem(ROUTER_MODES.entries, "ramp", RouterMode(learned=False))
    with pytest.raises(NotImplementedError, match="router mode 'ramp' is fixed .* no branch in Router.route"):
        Router(3, "ramp")(torch.zeros(2))


def test_a_level_topk_leaves_out_still_learns_and_comes_in():
    """At initialisation every weight ties and top-k keeps the tie-break's k levels; after the cut a left-out level's
    weight has no gradient. The router's objective therefore takes the weights before the cut: a left-out level whose
    relative loss is the lowest (set by hand here; in training its head is frozen while it is out) gains weight and
    enters the top k."""
    torch.manual_seed(0)
    al = Aligner(16, ["a", "b", "c", "d"], [3, 3, 3, 3], AlignCfg(projector_dim=32, router_topk=2, router_entropy=0.0,
                                                                router_normalize=False), "topk", "cosine")
    t = torch.linspace(0, 1, 32)
    kept = al.router(t)[0] > 0
    left_out = int((~kept).nonzero()[0])
    losses = torch.full((32, 4), 0.5)
    losses[:, left_out] = 0.1  # the left-out level is the easiest everywhere
    al.level_losses = lambda preds, targets: losses  # the wiring under test is the router's, not the heads'
    opt = torch.optim.SGD(al.router.parameters(), lr=1.0)
    for _ in range(30):
        opt.zero_grad()
        al(torch.randn(32, 4, 16), [torch.randn(32, 4, 3)] * 4, t)[0].backward()
        opt.step()
    assert (al.router(t)[:, left_out] > 0).all()


def test_topk_weighs_the_levels_losses_with_the_cut_weights_and_trains_the_soft_ones():
    """The backbone's loss is sum_k g_k l_k with the top-k weights (renormalised); the router's objective adds
    sum_k p_k l_k with the soft weights p before the cut (router_normalize=false, no entropy term)."""
    al = Aligner(16, ["a", "b", "c"], [3, 3, 3], AlignCfg(projector_dim=32, router_topk=2, router_entropy=0.0,
                                                          router_normalize=False), "topk", "cosine")
    with torch.no_grad():
        al.router.mlp[-1].bias.copy_(torch.tensor([1.0, 0.5, 0.0]))  # the logits at every t
    soft = torch.tensor([math.exp(1.0), math.exp(0.5), 1.0])
    soft = soft / soft.sum()
    cut = torch.tensor([soft[0], soft[1], 0.0]) / (soft[0] + soft[1])
    losses = torch.tensor([0.2, 0.4, 0.8]).expand(4, 3)
    al.level_losses = lambda preds, targets: losses
    loss, m = al(torch.randn(4, 2, 16), [torch.randn(4, 2, 3)] * 3, torch.rand(4))
    assert m["align/weighted"].item() == pytest.approx((cut * losses[0]).sum().item(), rel=1e-6)
    assert loss.item() == pytest.approx((cut * losses[0]).sum().item() + (soft * losses[0]).sum().item(), rel=1e-6)


def test_cosine_loss_is_vectorised_and_fp32():
    p, q = torch.randn(3, 5, 7, dtype=torch.bfloat16), torch.randn(3, 5, 7, dtype=torch.bfloat16)
    out = cosine_loss(p, q)
    assert out.dtype == torch.float32 and out.shape == (3,)
    assert torch.allclose(cosine_loss(q, q), torch.zeros(3), atol=1e-2)


def test_cosine_loss_is_per_token_over_channels_and_averaged_over_tokens():
    """Rescaling each target token by its own positive factor changes nothing; flipping 2 of 5 tokens costs
    2 x 2/5 (a cosine of -1 is a loss of 2)."""
    p = torch.randn(3, 5, 7)
    assert torch.allclose(cosine_loss(p, p * (torch.rand(3, 5, 1) + 0.1)), torch.zeros(3), atol=1e-6)
    sign = torch.ones(3, 5, 1)
    sign[:, :2] = -1
    assert torch.allclose(cosine_loss(p, p * sign), torch.full((3,), 2 * 2 / 5), atol=1e-6)


def test_the_smooth_l1_loss_takes_its_beta_from_align_smooth_l1_beta():
    """vae-latent's loss (SRA2's smooth-L1) is quadratic below align.smooth_l1_beta and linear above: the aligner must
    hand it the run's beta, or the setting is silently ignored. Errors 0.5 and 2 with beta 1: 0.125 and 1.5; with
    beta 4: 0.03125 and 0.5 (the mean over tokens and channels of 0.5 x^2 / beta, or |x| - beta / 2)."""
    pred = torch.tensor([0.5, 2.0]).repeat(2, 3, 1)  # [B=2, N=3, C=2]
    for beta, want in [(1.0, (0.125 + 1.5) / 2), (4.0, (0.03125 + 0.5) / 2)]:
        aligner = Aligner(16, ["a"], [2], AlignCfg(smooth_l1_beta=beta), "uniform", "smooth-l1")
        got = aligner.level_losses([pred], [torch.zeros(2, 3, 2)])  # [B, K=1]
        assert torch.allclose(got, torch.full((2, 1), want)), (beta, got)


def test_the_router_objective_sends_no_gradient_to_the_heads_or_the_backbone():
    """The hidden tokens (and the heads) get the gradient of sum_k g_k(t) l_k with the weights held fixed: the
    router's own objective trains the router alone."""
    torch.manual_seed(0)
    al = Aligner(16, ["a", "b"], [3, 4], AlignCfg(projector_dim=32, router_normalize=False, router_entropy=0.0),
                 "soft", "cosine")
    hidden = torch.randn(4, 6, 16, requires_grad=True)
    targets, t = [torch.randn(4, 6, 3), torch.randn(4, 6, 4)], torch.rand(4)
    loss, _ = al(hidden, targets, t)
    fixed = (al.router(t).detach() * al.level_losses(al.predictions(hidden), targets)).sum(1).mean()
    assert torch.allclose(torch.autograd.grad(loss, hidden)[0], torch.autograd.grad(fixed, hidden)[0], atol=1e-7)


def test_the_running_loss_mean_of_one_bin_follows_its_momentum():
    """The default one bin of t: the first batch as it is, then momentum * old + (1 - momentum) * new; a skipped
    step (non-finite loss) changes nothing."""
    al = Aligner(16, ["a", "b"], [3, 4], AlignCfg(projector_dim=32, router_momentum=0.9), "soft", "cosine")
    al.update_running(*al.running_terms(torch.tensor([[1.0, 2.0]]), None))
    al.update_running(*al.running_terms(torch.tensor([[11.0, 12.0]]), None))
    assert torch.allclose(al.running_loss, torch.tensor([2.0, 3.0]))
    al.update_running(*al.running_terms(torch.tensor([[50.0, 50.0]]), None), skip=torch.tensor(1.0))
    assert torch.allclose(al.running_loss, torch.tensor([2.0, 3.0])) and al.num_updates.item() == 2
    al.update_running(*al.running_terms(torch.tensor([[12.0, 13.0]]), None), skip=torch.tensor(0.0))
    assert torch.allclose(al.running_loss, torch.tensor([3.0, 4.0])) and al.num_updates.item() == 3


def test_shared_trunk_projector_splits_heads():
    proj = Projector(16, [3, 5, 2], proj_dim=32, shared_trunk=True)
    outs = proj(torch.randn(2, 4, 16))
    assert [o.shape for o in outs] == [(2, 4, 3), (2, 4, 5), (2, 4, 2)]
    sep = Projector(16, [3, 5, 2], proj_dim=32, shared_trunk=False)
    assert sep.flops_per_token() > proj.flops_per_token()  # shared trunk is the cheap option


def test_the_projector_is_repas_mlp_and_counts_its_flops():
    """REPA's projector, written out from the weights: Linear(h, P) - SiLU - Linear(P, P) - SiLU - Linear(P, C);
    FLOPs per token are 2 x its multiply-adds, h P + P P + P C per trunk (the biases are adds, not counted)."""
    silu = torch.nn.functional.silu
    h = torch.randn(2, 4, 16)
    sep = Projector(16, [3, 5], proj_dim=32, shared_trunk=False)
    for trunk, out in zip(sep.trunks, sep(h)):
        l1, l2, l3 = [m for m in trunk if isinstance(m, torch.nn.Linear)]
        assert torch.allclose(out, l3(silu(l2(silu(l1(h))))), atol=1e-6)
    assert sep.flops_per_token() == 2 * ((16 * 32 + 32 * 32 + 32 * 3) + (16 * 32 + 32 * 32 + 32 * 5))
    shared = Projector(16, [3, 5], proj_dim=32)
    l1, l2 = [m for m in shared.trunk if isinstance(m, torch.nn.Linear)]
    assert torch.allclose(torch.cat(shared(h), dim=-1), shared.head(silu(l2(silu(l1(h))))), atol=1e-6)
    assert shared.flops_per_token() == 2 * (16 * 32 + 32 * 32 + 32 * 8)


def test_method_registry_and_levels():
    avail = ["stage1", "stage2", "latent"]
    assert resolve_levels(get_method("ahpa"), avail, []) == avail
    assert resolve_levels(get_method("vae-latent"), avail, []) == ["latent"]
    assert resolve_levels(get_method("vae-level"), avail, ["stage2"]) == ["stage2"]
    assert resolve_levels(get_method("ahpa"), avail, ["stage2", "latent"]) == ["stage2", "latent"]  # align.levels
    assert resolve_levels(get_method("none"), avail, []) == []
    with pytest.raises(ValueError, match="exactly one level"):
        resolve_levels(get_method("vae-level"), avail, [])
    with pytest.raises(ValueError, match="vae-latent aligns the VAE latent, not"):  # the latent and one more
        resolve_levels(get_method("vae-latent"), avail, ["stage1", "latent"])
    with pytest.raises(ValueError, match="does not provide"):
        resolve_levels(get_method("ahpa"), avail, ["mid"])
    with pytest.raises(ValueError, match="align.levels names 'stage1' more than once"):  # it weighed stage1 double
        resolve_levels(get_method("multi-uniform"), avail, ["stage1", "stage1", "latent"])
    with pytest.raises(ValueError, match="valid methods"):
        get_method("sra")
    assert set(METHODS) >= {"none", "repa", "vae-latent", "vae-level", "multi-uniform", "ahpa"}  # the study's methods


def test_vae_latent_aligns_the_latent_and_refuses_another_level():
    """`align.method=vae-latent align.levels=[mid]` aligned mid under the latent baseline's name (and its smooth-L1
    loss), so compare's table showed "vae-latent" for a run that never saw the latent; one other level is vae-level's."""
    avail = ["stage1", "stage2", "latent"]
    assert resolve_levels(get_method("vae-latent"), avail, ["latent"]) == ["latent"]
    with pytest.raises(ValueError, match=r"vae-latent aligns the VAE latent.*align.method=vae-level align.levels=\[stage2\]"):
        resolve_levels(get_method("vae-latent"), avail, ["stage2"])


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
        al.update_running(m["running/sums"], m["running/counts"])
        first = first if first is not None else m["align/weighted"].item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m["align/weighted"].item() < 0.5 * first
    assert "align/router_entropy" in m  # a router whose weights change with t; uniform weights log no constant
    _, fixed = Aligner(16, ["a", "b"], [3, 4], cfg, "uniform", "cosine")(hidden, targets, t)
    assert "align/router_entropy" not in fixed
    assert m["align/level_loss"].shape == (2,)
    assert al.num_updates.item() == 30 and torch.all(al.running_loss > 0)


def test_running_means_per_bin_of_t():
    """align.router_t_bins: each bin of t keeps its own running mean per level; a bin without samples keeps its value,
    and a bin's first batch is taken as it is (later ones through the momentum)."""
    al = Aligner(16, ["a", "b"], [3, 4], AlignCfg(projector_dim=32, router_t_bins=4, router_momentum=0.75), "soft", "cosine")
    assert al.running_loss.shape == (4, 2)
    losses = torch.tensor([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0]])
    al.update_running(*al.running_terms(losses, torch.tensor([0, 0, 2])))  # bins 0 and 2 only
    assert torch.equal(al.running_loss, torch.tensor([[2.0, 20.0], [1.0, 1.0], [5.0, 50.0], [1.0, 1.0]]))
    assert al.bin_updates.tolist() == [1, 0, 1, 0]
    al.update_running(*al.running_terms(torch.tensor([[4.0, 40.0], [7.0, 70.0]]), torch.tensor([0, 1])))
    # bin 0: 0.75 * 2 + 0.25 * 4 = 2.5; bin 1's first batch as it is; bins 2 and 3 unchanged
    assert torch.equal(al.running_loss, torch.tensor([[2.5, 25.0], [7.0, 70.0], [5.0, 50.0], [1.0, 1.0]]))
    assert al.bin_updates.tolist() == [2, 1, 1, 0] and al.num_updates.item() == 2
    before = al.running_loss.clone()
    al.update_running(*al.running_terms(losses, torch.tensor([1, 1, 3])), skip=torch.tensor(1.0))  # a bad step
    assert torch.equal(al.running_loss, before) and al.bin_updates.tolist() == [2, 1, 1, 0] and al.num_updates.item() == 2


def test_a_bin_of_t_without_a_running_mean_yet_teaches_the_router_nothing():
    """Before a bin of t has seen a batch its running mean is the initial 1.0, not a loss scale: its samples must not
    move the router (the first step's rule, per bin)."""
    torch.manual_seed(0)
    al = Aligner(16, ["a", "b"], [3, 4], AlignCfg(projector_dim=32, router_t_bins=4, router_entropy=0.0), "soft", "cosine")
    al.update_running(*al.running_terms(torch.tensor([[0.2, 0.4]]), torch.tensor([0])))  # bin 0 only

    def router_grad(t):
        al.zero_grad()
        hidden, targets = torch.randn(len(t), 4, 16), [torch.randn(len(t), 4, 3), torch.randn(len(t), 4, 4)]
        al(hidden, targets, t)[0].backward()
        return al.router.mlp[-1].bias.grad.abs().sum().item()

    assert router_grad(torch.tensor([0.1, 0.2])) > 0  # bin 0: its mean is known
    assert router_grad(torch.tensor([0.6, 0.7])) == 0  # bin 2: nothing yet
    # one bin (the default): the first step, before any running mean, teaches the router nothing either
    al = Aligner(16, ["a", "b"], [3, 4], AlignCfg(projector_dim=32, router_entropy=0.0), "soft", "cosine")
    assert router_grad(torch.tensor([0.1, 0.7])) == 0
    al.update_running(*al.running_terms(torch.tensor([[0.2, 0.4]]), None))
    assert router_grad(torch.tensor([0.1, 0.7])) > 0


def test_each_sample_is_normalised_by_the_running_means_of_its_own_bin_of_t():
    """With align.router_t_bins = 2, t = 0.1 is in bin 0 and t = 1.0 (the last value of t) in bin 1. At the uniform
    start (g = 1/2, 1/2), losses (0.2, 0.4), running means (0.1, 0.2) in bin 0 and (1, 4) in bin 1 and no entropy
    term, the router's objective is the mean of 0.5 (2 + 2) = 2 and 0.5 (0.2 + 0.1) = 0.15; the loss adds the
    weighted 0.3."""
    cfg = AlignCfg(projector_dim=32, router_t_bins=2, router_entropy=0.0)
    al = Aligner(16, ["a", "b"], [3, 4], cfg, "soft", "cosine")
    al.running_loss.copy_(torch.tensor([[0.1, 0.2], [1.0, 4.0]]))
    al.bin_updates.fill_(1)
    al.level_losses = lambda preds, targets: torch.tensor([[0.2, 0.4], [0.2, 0.4]])
    loss, m = al(torch.randn(2, 4, 16), [torch.randn(2, 4, 3), torch.randn(2, 4, 4)], torch.tensor([0.1, 1.0]))
    assert m["align/weighted"].item() == pytest.approx(0.3) and loss.item() == pytest.approx(0.3 + (2.0 + 0.15) / 2)
    assert m["running/counts"].tolist() == [1.0, 1.0]


def test_per_bin_normalisation_removes_the_pull_of_an_easy_level_near_the_data():
    """With one running mean per level, a level whose loss is small at small t (the latent near the data) looks far
    better than usual there and the router's objective pulls its weight up; with per-bin means both levels look
    usual in every bin, and the pull is gone."""
    def weight_gradient(t_bins: int) -> torch.Tensor:
        torch.manual_seed(0)
        al = Aligner(16, ["easy", "hard"], [3, 4], AlignCfg(projector_dim=32, router_t_bins=t_bins, router_entropy=0.0),
                     "soft", "cosine")
        t = torch.linspace(0, 0.99, 64)
        losses = torch.stack([0.05 + t, torch.full_like(t, 0.5)], dim=1)  # [B, 2]: "easy" is easy near t = 0
        for _ in range(3):  # the running means settle on these stationary losses
            if t_bins == 1:
                al.update_running(*al.running_terms(losses, None))
            else:
                al.update_running(*al.running_terms(losses, (t * t_bins).long()))
        weights = al.router(t[:8]).detach().requires_grad_()  # the eight samples nearest the data
        running = al.running_loss if t_bins == 1 else al.running_loss[(t[:8] * t_bins).long()]
        router_objective(weights, losses[:8], running, 0.0).backward()
        return weights.grad.mean(0).tolist()  # d objective / d weight, per level

    one, per_bin = weight_gradient(1), weight_gradient(8)
    assert one[0] < 0.3 * one[1]  # one mean per level: "easy" costs the router far less near the data
    assert per_bin[0] == pytest.approx(per_bin[1], rel=0.1)  # per bin: both at their usual level


def test_aligning_a_share_of_the_tokens_is_an_unbiased_estimate_of_aligning_all():
    """align.token_fraction: the loss over a random k of N tokens averages to the loss over all N, only the kept
    tokens get a gradient, and the heads' FLOPs shrink to k/N."""
    from ahpa.align.tokens import draw_kept, kept_tokens

    torch.manual_seed(0)
    cfg = AlignCfg(projector_dim=32, token_fraction=0.25)
    al = Aligner(16, ["a", "b"], [3, 4], cfg, "uniform", "cosine").eval()
    hidden = torch.randn(2, 16, 16)
    targets = [torch.randn(2, 16, 3), torch.randn(2, 16, 4)]
    t = torch.rand(2)
    with torch.no_grad():
        full = al(hidden, targets, t)[0].item()
        g = torch.Generator().manual_seed(1)
        draws = [al(hidden, targets, t, draw_kept(2, 16, 0.25, g, "cpu"))[0].item() for _ in range(3000)]
    est = torch.tensor(draws)
    spread = est.std().item()
    assert spread > 1e-3  # the subsets differ, so the estimates do
    assert abs(est.mean().item() - full) < 4 * spread / len(draws) ** 0.5, (est.mean().item(), full)

    kept = draw_kept(2, 16, 0.25, torch.Generator().manual_seed(2), "cpu")
    assert kept.shape == (2, 4) and all(len(set(row.tolist())) == 4 for row in kept)  # distinct, per sample
    h = hidden.clone().requires_grad_(True)
    al(h, targets, t, kept)[0].backward()
    touched = h.grad.abs().sum(dim=-1) > 0  # [B, N]
    mask = torch.zeros(2, 16, dtype=torch.bool).scatter_(1, kept, True)
    assert torch.equal(touched, mask)
    everything = Aligner(16, ["a", "b"], [3, 4], AlignCfg(projector_dim=32), "uniform", "cosine")
    assert al.flops_per_image(16) == everything.flops_per_image(16) / 4
    assert kept_tokens(16, 0.01) == 1 and kept_tokens(16, 1.0) == 16
    assert kept_tokens(16, 0.3) == 5  # round(F x N), as docs/method.md says: 4.8 -> 5
    many = draw_kept(64, 16, 0.25, torch.Generator().manual_seed(3), "cpu")
    assert len({tuple(sorted(row)) for row in many.tolist()}) > 32  # a subset of its own per image


def test_levels_at_their_own_blocks_see_only_their_blocks_tokens():
    """align.level_depths: each level's trunk reads the hidden tokens of its own block, so its loss reaches that
    block's tokens and no other; config errors name the item and the fix."""
    from ahpa.align.methods import resolve_depths

    depths = resolve_depths(["a", "b", "c"], 2, ["a:1", "c:3"], 4, shared_trunk=False)
    assert depths == [1, 2, 3]
    al = Aligner(16, ["a", "b", "c"], [3, 4, 5], AlignCfg(projector_dim=32, shared_trunk=False), "uniform", "cosine",
                 depths)
    assert al.taps == (1, 2, 3)
    hidden = [torch.randn(2, 6, 16, requires_grad=True) for _ in al.taps]
    targets = [torch.randn(2, 6, c) for c in (3, 4, 5)]
    preds = al.predictions(hidden)
    for k, pred in enumerate(preds):  # level k's output depends on tap k only
        grads = torch.autograd.grad(pred.sum(), hidden, allow_unused=True, retain_graph=True)
        assert [g is not None and g.abs().sum() > 0 for g in grads] == [i == k for i in range(3)]
    loss, _ = al(hidden, targets, torch.rand(2))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"blocks \(1, 2, 3\); got 1"):
        al(hidden[0], targets, torch.rand(2))
    for items, shared, message in [
        (["a2"], False, r"item 'a2' is not NAME:BLOCK"),
        (["z:1"], False, r"names 'z', which this run does not align"),
        (["a:9"], False, r"gives a block 9; it must lie in \[1, 4\]"),
        (["a:1"], True, r"needs align.shared_trunk=false"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve_depths(["a", "b", "c"], 2, items, 4, shared_trunk=shared)
    assert resolve_depths(["a", "b"], 2, ["a:2"], 4, shared_trunk=True) == [2, 2]  # one block: a shared trunk is fine
    with pytest.raises(ValueError, match=r"gives a block 0; it must lie in \[1, 4\]"):  # blocks count from 1
        resolve_depths(["a", "b"], 2, ["a:0"], 4, shared_trunk=False)
    # levels named in another order than their blocks: the SiT returns the tapped tokens in block order
    al = Aligner(16, ["a", "b"], [3, 4], AlignCfg(projector_dim=32, shared_trunk=False), "uniform", "cosine", [3, 1])
    assert al.taps == (1, 3)
    hidden = [torch.randn(2, 6, 16, requires_grad=True) for _ in al.taps]  # after block 1, after block 3
    grads = torch.autograd.grad(al.predictions(hidden)[0].sum(), hidden, allow_unused=True)  # level "a": block 3
    assert grads[0] is None and grads[1].abs().sum() > 0


def test_a_method_added_to_the_registry_is_valid_everywhere(monkeypatch, tmp_path, tiny):
    """A new entry of METHODS is a valid align.method at once (the config reads the registry), trains, and the
    settings note judges it by its spec: a method taking align.router reads the router's settings."""
    from ahpa import config
    from ahpa.align.methods import METHODS, MethodSpec
    from ahpa.train.loop import Trainer

    with pytest.raises(config.ConfigError, match="align.method='stages-routed' is not valid"):
        tiny("align.method=stages-routed")
    spec = MethodSpec("stages-routed", "all", "", "cosine", "every level, routed: a copy of ahpa")
    monkeypatch.setitem(METHODS.entries, spec.name, spec)
    trainer = Trainer(tiny("align.method=stages-routed", "align.router_entropy=0.1", "train.steps=1"), tmp_path)
    assert not [m for m in trainer.messages if "read" in m] and trainer.parts.aligner.router.learned
    trainer.run()
    with pytest.raises(ValueError, match="unknown loss 'mse'.*; valid losses: cosine, smooth-l1"):
        MethodSpec("x", "all", "", "mse", "")


def test_register_method_refuses_a_built_in_name(monkeypatch):
    from ahpa.align.methods import MethodSpec, register_method

    with pytest.raises(ValueError, match="method 'ahpa' is built in"):
        register_method(MethodSpec("ahpa", "all", "uniform", "cosine", "a look-alike"))
    assert METHODS["ahpa"].router == ""  # untouched
    with pytest.raises(ValueError, match="takes a MethodSpec"):
        register_method({"name": "x"})
    for bad in ("", "all snr", "a=b"):  # written as align.method=NAME: no spaces, no =
        with pytest.raises(ValueError, match=r"method name .*: give a name without spaces"):
            register_method(MethodSpec(bad, "all", "snr", "cosine", ""))
    monkeypatch.setitem(METHODS.entries, "all-snr", None)  # removed again after the test
    register_method(MethodSpec("all-snr", "all", "snr", "cosine", "every level, the SNR schedule"))
    assert get_method("all-snr").router == "snr"


def test_router_modes_registered_at_run_time_train_and_are_checked(monkeypatch, tmp_path, tiny):
    """register_router_mode: a fixed schedule of t is the weights; a learned mode post-processes the soft weights
    while its objective trains the soft ones; both train a run; built-in names, wrong signatures and outputs that are
    not [B, K] distributions are refused, naming the mode."""
    from ahpa import config
    from ahpa.align import router as router_mod
    from ahpa.align.methods import ROUTER_MODES
    from ahpa.train.loop import Trainer

    with pytest.raises(config.ConfigError, match="align.router='ramp' is not valid; valid values: soft, topk"):
        tiny("align.router=ramp")
    for name in ("ramp", "sharp", "bad"):
        monkeypatch.setitem(ROUTER_MODES.entries, name, None)  # removed again after the test

    def ramp(t, num_levels):
        centres = torch.linspace(0.0, 1.0, num_levels)
        return (1 - (t[:, None] - centres[None]).abs() * (num_levels - 1)).clamp_min(0)

    def sharpen(soft):
        return soft.pow(2) / soft.pow(2).sum(dim=-1, keepdim=True)

    router_mod.register_router_mode("ramp", ramp)
    router_mod.register_router_mode("sharp", sharpen, learned=True)
    t = torch.tensor([0.0, 0.25, 1.0])
    fixed = Router(3, "ramp")
    assert not fixed.learned and not list(fixed.parameters())
    assert torch.allclose(fixed(t), torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))
    learned = Router(3, "sharp")
    assert learned.learned
    torch.nn.init.normal_(learned.mlp[-1].weight)  # away from the uniform start, where squaring changes nothing
    weights, trained = learned.route(t)
    assert not torch.allclose(weights, trained) and torch.allclose(weights, sharpen(trained))
    # a mode computing in float64 gives fp32 weights as the built-in ones: float64 promoted the alignment loss
    for name, fn, learned_mode in (("ramp64", lambda t, k: ramp(t, k).double(), False),
                                   ("sharp64", lambda soft: sharpen(soft).double(), True)):
        monkeypatch.setitem(ROUTER_MODES.entries, name, None)
        router_mod.register_router_mode(name, fn, learned=learned_mode)
        assert Router(3, name)(t).dtype == torch.float32

    for mode in ("ramp", "sharp"):
        trainer = Trainer(tiny(f"align.router={mode}", "train.steps=2"), tmp_path / mode)
        before = [p.detach().clone() for p in trainer.parts.aligner.router.parameters()]
        trainer.run()
        after = list(trainer.parts.aligner.router.parameters())
        assert len(before) == (4 if mode == "sharp" else 0)  # the learned mode's MLP, and it trained
        assert all(not torch.equal(b, a) for b, a in zip(before[-2:], after[-2:]))
        # a run stopped for skipped steps names the registered mode beside the usual causes
        from ahpa.train.schedule import registered_code

        assert registered_code(trainer) == [f"router mode {mode!r}"]

    with pytest.raises(ValueError, match="router mode 'soft' is built in"):
        router_mod.register_router_mode("soft", ramp)
    with pytest.raises(ValueError, match=r"router mode 'bad' \(.*\) cannot be called as fn\(t \[B\]"):
        router_mod.register_router_mode("bad", lambda t: t)
    router_mod.register_router_mode("bad", lambda t, k: torch.full((len(t), 2), 0.5))
    with pytest.raises(ValueError, match=r"router mode 'bad' \(register_router_mode\): its function returned \(101, 2\) "
                                         r"for 101 values of t and K=3"):
        Router(3, "bad")
    router_mod.register_router_mode("bad", lambda t, k: torch.full((len(t), k), 1.01 / k))  # rows sum to 1.01
    with pytest.raises(ValueError, match=r"router mode 'bad': its weights at t = 0.00, .* row sums 1.0100"):
        Router(3, "bad")
    router_mod.register_router_mode("bad", lambda t, k: torch.ones(len(t), k))
    with pytest.raises(ValueError, match=r"router mode 'bad': its weights at t = 0.00, 0.01, 0.02, 0.03, ... are no "
                                         r"distribution over the levels \(smallest weight 1.0000, row sums 3.0000"):
        Router(3, "bad")

    def wavy(t, k):  # uniform at t = 0, .25, .5, .75, 1 (sin(4 pi t) = 0 there), negative in between
        return 1 / k + torch.sin(4 * torch.pi * t)[:, None] * torch.linspace(-1.0, 1.0, k)[None]

    router_mod.register_router_mode("bad", wavy)
    with pytest.raises(ValueError, match=r"router mode 'bad': its weights at t = 0.03, 0.04, 0.05, 0.06, ... are no "
                                         r"distribution over the levels \(smallest weight -0.6"):
        Router(3, "bad")


def test_a_loss_registered_at_run_time_is_valid_everywhere(monkeypatch, tmp_path, tiny):
    """register_loss (a notebook, a script) makes align.loss=NAME valid in the config at once, and the loss gets the
    run's align settings, where a parameter of its own lives."""
    from ahpa import config
    from ahpa.align.loss import register_loss
    from ahpa.align.methods import LOSSES
    from ahpa.train.loop import Trainer

    with pytest.raises(config.ConfigError, match="align.loss='mse-ln' is not valid; valid values: default, cosine"):
        tiny("align.loss=mse-ln")
    monkeypatch.setitem(LOSSES.entries, "mse-ln", None)  # removed again after the test
    seen = []

    def mse_ln(pred, target, cfg):
        seen.append(cfg.smooth_l1_beta)
        return (pred.float() - torch.nn.functional.layer_norm(target.float(), target.shape[-1:])).pow(2).flatten(1).mean(1)

    for name, fn in (("default", mse_ln), ("", mse_ln), ("mse-ln", "not a function")):
        with pytest.raises(ValueError, match="register_loss needs a name other than"):
            register_loss(name, fn)
    register_loss("mse-ln", mse_ln, "MSE to layer-normed targets")
    from ahpa.align.objective import Aligner as A

    seen_cfg = []
    monkeypatch.setitem(LOSSES.entries, "cfg-probe", None)  # removed again after the test
    register_loss("cfg-probe", lambda p, q, cfg: seen_cfg.append(cfg) or (p.float() - q.float()).pow(2).flatten(1).mean(1))
    A(16, ["a", "b"], [3, 4], AlignCfg(router="soft"), "uniform", "cfg-probe")  # a method that fixes its router
    assert (seen_cfg[-1].router, seen_cfg[-1].loss) == ("uniform", "cfg-probe")  # the loss sees what is in force
    Trainer(tiny("align.loss=mse-ln", "align.smooth_l1_beta=0.2", "train.steps=1"), tmp_path).run()
    assert seen and set(seen) == {0.2} and "mse-ln" in config.CHOICES["align.loss"]


def test_a_registered_loss_with_a_matmul_computes_in_fp32_under_the_steps_bf16_autocast(monkeypatch):
    """The step runs the aligner under autocast; a loss's matmul (a Gram matrix) used to come out bf16 there, whatever
    it cast its inputs to: logged in bf16, and with several bins of t the running means' index_add_ failed."""
    from ahpa.align.loss import register_loss
    from ahpa.align.methods import LOSSES

    monkeypatch.setitem(LOSSES.entries, "gram", None)
    seen = []

    def gram(pred, target, cfg):
        p, q = (torch.nn.functional.normalize(x.float(), dim=-1) for x in (pred, target))
        g = p @ p.transpose(1, 2) - q @ q.transpose(1, 2)  # [B, N, N]
        seen.append(g.dtype)
        return g.pow(2).mean((1, 2))

    register_loss("gram", gram)
    torch.manual_seed(0)
    al = Aligner(16, ["a", "b"], [3, 4], AlignCfg(projector_dim=32, router_t_bins=4), "soft", "gram")
    hidden, targets, t = torch.randn(4, 6, 16), [torch.randn(4, 6, 3), torch.randn(4, 6, 4)], torch.rand(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, m = al(hidden, targets, t)
    al.update_running(m["running/sums"], m["running/counts"])
    assert seen[-1] == torch.float32 and m["align/level_loss"].dtype == torch.float32 and al.bin_updates.sum() > 0


def test_channel_stats_standardise_and_invert_with_one_copy_per_device():
    """Statistics stay on the CPU (checkpoints record them) and are copied to a device once per layout, not at every
    call: a copy from host memory at every call would wait for the GPU's queued work, a host sync in every training
    step."""
    from ahpa.priors.targets import ChannelStats

    stats = ChannelStats(torch.tensor([1.0, -2.0]), torch.tensor([2.0, 0.5]))
    x = torch.randn(4, 2, 3, 3)
    z = stats.apply(x, channel_dim=1)
    assert torch.allclose(z[:, 1], (x[:, 1] + 2.0) / 0.5) and torch.allclose(stats.invert(z, channel_dim=1), x, atol=1e-6)
    on_meta = torch.empty(4, 5, 2, device="meta")  # a device other than the statistics'
    for _ in range(3):
        stats.apply(on_meta, channel_dim=2)
        stats.invert(on_meta, channel_dim=2)
    assert list(stats._views) == [(torch.device("cpu"), 4, 1), (torch.device("meta"), 3, 2)]
    assert stats.mean.device.type == "cpu"


def test_a_learned_mode_is_checked_again_on_its_trained_weights_where_the_router_is_plotted(monkeypatch, tmp_path):
    """A learned mode passes at its uniform start; a post-processing that goes negative once the soft weights move
    stops the run where its router is plotted (after the checkpoint), naming the mode, with the plot written."""
    from ahpa.align import router as router_mod
    from ahpa.align.methods import ROUTER_MODES
    from ahpa.train import outputs

    monkeypatch.setitem(ROUTER_MODES.entries, "overshoot", None)
    router_mod.register_router_mode("overshoot", lambda soft: 2 * soft - 1 / soft.shape[1], learned=True)
    al = Aligner(16, ["a", "b", "c"], [3, 4, 5], AlignCfg(projector_dim=32), "overshoot", "cosine")  # uniform: fine
    with torch.no_grad():
        al.router.mlp[-1].bias.copy_(torch.tensor([3.0, 0.0, 0.0]))  # as if trained: "a" takes most of the weight
    with pytest.raises(ValueError, match=r"router mode 'overshoot': its weights at t = 0.00, 0.02, 0.04, 0.06, ... are "
                                         r"no distribution over the levels \(smallest weight -0.2"):
        outputs.write_router_plot(al, tmp_path, 5)
    assert (tmp_path / "router.png").exists()


def test_the_router_is_a_softmax_over_tau_of_an_mlp_of_the_sinusoid_of_1000_t():
    """g(t) = softmax(MLP(sinusoidal(1000 t)) / tau) (docs/method.md): the features are computed here by hand (cos then
    sin of 1000 t at frequencies 10000^(-i/32)), the MLP is the router's own, moved off its uniform start."""
    import math

    torch.manual_seed(0)
    router = Router(3, "soft", tau=2.5)
    torch.nn.init.normal_(router.mlp[-1].weight)
    t = torch.tensor([0.0, 0.3, 0.9], dtype=torch.float64)
    freqs = [math.exp(-math.log(10000.0) * i / 32) for i in range(32)]
    feats = torch.tensor([[math.cos(1000 * x * f) for f in freqs] + [math.sin(1000 * x * f) for f in freqs]
                          for x in t.tolist()])  # [3, 64]
    logits = router.mlp(feats).detach().double()
    want = logits.div(2.5).exp() / logits.div(2.5).exp().sum(dim=1, keepdim=True)
    assert torch.allclose(router(t.float()).double(), want, atol=1e-5)


def test_the_snr_schedule_is_a_normalised_gaussian_window_per_level():
    """Level k of K gets exp(-(t - k/(K-1))^2 / (2 width^2)), normalised over the levels: by hand, at one t."""
    import math

    t, width, K = 0.3, 0.2, 4
    raw = [math.exp(-((t - k / (K - 1)) ** 2) / (2 * width**2)) for k in range(K)]
    want = torch.tensor([r / sum(raw) for r in raw])
    assert torch.allclose(snr_schedule(torch.tensor([t]), K, width)[0], want, atol=1e-6)


def test_the_router_objective_is_the_relative_loss_less_eta_times_the_entropy():
    """sum_k g_k l_k / m_k - eta H(g), averaged over the batch (by hand), and the entropy is a bonus: with equal
    relative losses a step on the objective moves the weights towards uniform, never away."""
    import math

    g = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    losses, running = torch.tensor([[0.4, 0.6, 0.9], [0.2, 0.3, 0.1]]), torch.tensor([0.5, 0.3, 0.2])
    want = 0.0
    for row, loss_row in zip(g.tolist(), losses.tolist()):
        rel = sum(w * l / m for w, l, m in zip(row, loss_row, running.tolist()))
        want += (rel - 0.05 * -sum(w * math.log(w) for w in row)) / 2
    assert router_objective(g, losses, running, 0.05).item() == pytest.approx(want, rel=1e-6)
    logits = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    router_objective(torch.softmax(logits, -1), torch.ones(1, 3), None, 0.5).backward()
    with torch.no_grad():
        stepped = torch.softmax(logits - 0.1 * logits.grad, -1)
    entropy = lambda w: -(w * w.log()).sum().item()  # noqa: E731
    assert entropy(stepped) > entropy(torch.softmax(logits.detach(), -1))


@pytest.mark.parametrize("normalize", [False, True])
def test_the_router_gets_the_gradient_of_its_relative_losses(normalize):
    """With align.router_normalize=false and align.router_entropy=0 the router's gradient is that of the paper's
    sum_k g_k(t) l_k (docs/method.md); with normalisation, that of sum_k g_k(t) l_k / m_k, m_k the running means."""
    torch.manual_seed(0)
    cfg = AlignCfg(projector_dim=32, router_normalize=normalize, router_entropy=0.0)
    al = Aligner(16, ["a", "b", "c"], [3, 4, 2], cfg, "soft", "cosine")
    torch.nn.init.normal_(al.router.mlp[-1].weight)
    means = torch.tensor([[0.2, 0.5, 1.5]])
    al.update_running(*al.running_terms(means, None))  # running means known: [0.2, 0.5, 1.5]
    hidden, t = torch.randn(5, 6, 16), torch.rand(5)
    targets = [torch.randn(5, 6, c) for c in (3, 4, 2)]
    params = list(al.router.parameters())
    got = torch.autograd.grad(al(hidden, targets, t)[0], params)
    losses = al.level_losses(al.predictions(hidden), targets).detach()
    rel = losses / means if normalize else losses
    want = torch.autograd.grad((al.router(t) * rel).sum(dim=1).mean(), params)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("shared", [True, False])
def test_the_projector_is_repas_mlp(shared):
    """REPA's Linear(h, P) - SiLU - Linear(P, P) - SiLU - Linear(P, C_k) on each token, written out here with the
    projector's weights (with a shared trunk, each level's last layer is its slice of the fused head)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    proj = Projector(16, [3, 5], proj_dim=32, shared_trunk=shared)
    h = torch.randn(2, 4, 16)
    for k, (out, c) in enumerate(zip(proj(h), (3, 5))):
        trunk = proj.trunk if shared else proj.trunks[k]
        first, second = trunk[0], trunk[2]
        if shared:
            lo = sum((3, 5)[:k])  # the fused head's rows of level k
            w3, b3 = proj.head.weight[lo:lo + c], proj.head.bias[lo:lo + c]
        else:
            w3, b3 = proj.trunks[k][4].weight, proj.trunks[k][4].bias
        assert (first.in_features, first.out_features, second.out_features, w3.shape) == (16, 32, 32, (c, 32))
        z = F.silu(F.linear(F.silu(F.linear(h, first.weight, first.bias)), second.weight, second.bias))
        assert torch.allclose(out, F.linear(z, w3, b3), atol=1e-6)


def test_channel_stats_views_follow_each_inputs_device_rank_and_channel_dim():
    """ChannelStats keeps its broadcast views per (device, rank, channel dimension): one statistics object
    standardises [B, C, H, W] along 1, channels-last along -1 or 3, tokens [B, N, C] along 2 and the same shape on
    another device, each along its own channels. C = H = W here, so a view kept for another dimension would broadcast
    without an error, along the wrong one."""
    from ahpa.priors.targets import ChannelStats

    mean, std = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([2.0, 0.5, 4.0])
    stats = ChannelStats(mean, std)

    def by_hand(x, dim):
        shape = [1] * x.ndim
        shape[dim] = -1
        return (x.float() - mean.reshape(shape)) / std.reshape(shape)

    square, tokens = torch.randn(2, 3, 3, 3), torch.randn(4, 3, 3)
    for x, dim in [(square, 1), (square, 3), (square, -1), (square, 2), (tokens, 2), (tokens, 1), (square, 1)]:
        z = stats.apply(x, channel_dim=dim)
        assert torch.allclose(z, by_hand(x, dim)), (x.shape, dim)
        assert torch.allclose(stats.invert(z, channel_dim=dim), x, atol=1e-6), (x.shape, dim)
    # five layouts (3 and -1 are one), each copied once and kept: the same tensors at the next call
    first = stats._on(square, 1)
    assert len(stats._views) == 5 and all(a is b for a, b in zip(first, stats._on(square, -3)))
    # the copies are float32 whatever the statistics' dtype: the targets are float32
    assert ChannelStats(mean.double(), std.double()).apply(square, channel_dim=1).dtype == torch.float32
    z = stats.apply(torch.empty(2, 3, 3, 3, device="meta"), channel_dim=1)  # a shape seen before, on another device
    assert z.device.type == "meta" and z.shape == (2, 3, 3, 3)
