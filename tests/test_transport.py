import pytest
import torch

from ahpa.transport.guidance import fixed_batch, guided_velocity
from ahpa.transport.path import PATHS, get_path
from ahpa.transport.solvers import euler, heun, solve
from ahpa.transport.timesteps import sample_t


@pytest.mark.parametrize("name", list(PATHS))
def test_velocity_is_the_time_derivative(name):
    path = PATHS[name]
    x, eps = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64).requires_grad_(True)
    x_t = path.interpolate(x, eps, t)
    grad = torch.autograd.grad(x_t.sum(dim=(1, 2, 3)).sum(), t)[0]  # sum over dims: d/dt per sample
    assert torch.allclose(grad, path.velocity(x, eps, t).sum(dim=(1, 2, 3)), atol=1e-10)
    # endpoints: t=0 data, t=1 noise
    assert torch.allclose(path.interpolate(x, eps, torch.zeros(5, dtype=torch.float64)), x)
    assert torch.allclose(path.interpolate(x, eps, torch.ones(5, dtype=torch.float64)), eps, atol=1e-12)


def test_the_linear_velocity_is_the_general_formulas_numbers_in_one_operator():
    """eps - x for alpha' = -1, sigma' = 1: the same bits as (-1) x + 1 eps (each product exact), signed zeros, infinities
    and NaN included, from one kernel where the training step launched six (it runs eagerly every step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ahpa.transport.path import Path

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    path = PATHS["linear"]
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -3.0])
    x = torch.cat([torch.randn(2, 3, 4, 4).flatten(), special, special.flip(0), torch.randn(18)]).reshape(4, 2, 4, 4)
    eps = torch.cat([torch.randn(2, 3, 4, 4).flatten(), special.flip(0), special, torch.randn(18)]).reshape(4, 2, 4, 4)
    t = torch.rand(4)
    general = Path.velocity(path, x, eps, t)  # the formula of every path
    with Ops() as ops:
        v = path.velocity(x, eps, t)
    assert ops.names == ["sub"]
    assert torch.equal(v.isnan(), general.isnan())
    assert torch.equal(v[~v.isnan()].view(torch.int32), general[~general.isnan()].view(torch.int32))


@pytest.mark.parametrize("name", list(PATHS))
def test_predictions_invert_the_path(name):
    path = PATHS[name]
    x, eps = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64) * 0.9 + 0.05
    x0, e = path.predictions(path.interpolate(x, eps, t), path.velocity(x, eps, t), t)
    assert torch.allclose(x0, x) and torch.allclose(e, eps)


def test_time_samplers():
    g = torch.Generator().manual_seed(0)
    for kind in ("uniform", "logit-normal"):
        t = sample_t(10000, kind, g)
        assert t.min() >= 0 and t.max() <= 1
    assert abs(sample_t(20000, "logit-normal", g).mean() - 0.5) < 0.01
    with pytest.raises(ValueError, match="valid"):
        sample_t(3, "beta", g)


def test_logit_normal_times_have_the_set_mean_and_spread_in_logit_space():
    """logit(t) ~ N(mean, std), t = 1 noise as in SD3: a positive mean puts more of the training steps at high noise.
    The defaults (0, 1) are symmetric, so a sampler that ignored std, negated the mean or drew 1 - t looked right."""
    g = torch.Generator().manual_seed(0)
    z = torch.logit(sample_t(40000, "logit-normal", g, mean=0.5, std=0.7).double())
    assert abs(z.mean().item() - 0.5) < 0.02 and abs(z.std().item() - 0.7) < 0.02  # 6 standard errors


def test_solvers_transport_a_point_mass_exactly():
    # data = constant c: the exact velocity field on the linear path is v(x, t) = (x - c) / t
    c = torch.full((3, 2), 0.7, dtype=torch.float64)
    noise = torch.randn(3, 2, dtype=torch.float64)
    vel = lambda x, t: (x - c) / t
    for solver in (euler, heun):
        assert torch.allclose(solver(vel, noise, 10), c, atol=1e-9)


def test_euler_maruyama_marginals_match_for_a_gaussian():
    # data ~ N(0, s^2): x_t ~ N(0, (1-t)^2 s^2 + t^2), exact velocity is linear in x
    s, path = 0.5, get_path("linear")
    var = lambda t: (1 - t) ** 2 * s**2 + t**2
    vel = lambda x, t: x * ((t - (1 - t) * s**2) / var(t))
    n, steps = 20000, 100
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, dtype=torch.float64, generator=g)
    noise = torch.randn(steps - 1, n, 1, dtype=torch.float64, generator=g)
    out = solve("euler-maruyama", vel, x, steps, path, noise)
    assert abs(out.std().item() - s) < 0.02
    with pytest.raises(ValueError, match="valid samplers"):
        solve("ddim", vel, x, steps, path)


def test_cfg_scale_one_is_the_conditional_output():
    fn = lambda x, t, y: x * (y.float()[:, None] + 1) + t[:, None]
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    assert torch.equal(guided_velocity(fn, x, 0.5, y, null_class=3, scale=1.0, micro_batch=4), fn(x, torch.full((5,), 0.5), y))
    guided = guided_velocity(fn, x, 0.5, y, null_class=3, scale=2.0, micro_batch=4)
    cond, uncond = fn(x, torch.full((5,), 0.5), y), fn(x, torch.full((5,), 0.5), torch.full_like(y, 3))
    assert torch.allclose(guided, uncond + 2 * (cond - uncond))
    # outside the guidance interval only the conditional branch runs
    assert torch.equal(guided_velocity(fn, x, 0.9, y, 3, 2.0, (0.0, 0.7), 4), fn(x, torch.full((5,), 0.9), y))
    # by default the interval is all of [0, 1]; it is closed: at either end the velocity is guided
    assert torch.allclose(guided_velocity(fn, x, 0.9, y, 3, 2.0, micro_batch=4), 2 * fn(x, torch.full((5,), 0.9), y)
                          - fn(x, torch.full((5,), 0.9), torch.full_like(y, 3)))
    for t in (0.1, 0.7):
        cond, uncond = fn(x, torch.full((5,), t), y), fn(x, torch.full((5,), t), torch.full_like(y, 3))
        assert torch.allclose(guided_velocity(fn, x, t, y, 3, 2.0, (0.1, 0.7), 4), uncond + 2 * (cond - uncond))


def test_fixed_batch_pads_and_drops():
    calls = []
    fn = lambda x, t, y: (calls.append(x.shape[0]), x * 2)[1]
    x = torch.randn(10, 2)
    assert torch.equal(fixed_batch(fn, 4, x, torch.zeros(10), torch.zeros(10, dtype=torch.long)), x * 2)
    assert calls == [4, 4, 4]


def test_heun_is_second_order_with_2n_minus_1_evaluations():
    """dx/dt = x from t = 1 to 0 ends at x(1)/e. The point mass above is solved exactly by Euler too, so it cannot
    tell a Heun that lost its correction from Euler; this can."""
    x1 = torch.ones(3, dtype=torch.float64)
    calls = []
    exact = x1 / torch.e
    heun10 = (heun(lambda x, t: (calls.append(t), x)[1], x1, 10) - exact).abs().max().item()
    assert len(calls) == 19  # the last step is an Euler step (no evaluation at t = 0)
    assert heun10 < 0.15 * (euler(lambda x, t: x, x1, 10) - exact).abs().max().item()
    heun20 = (heun(lambda x, t: x, x1, 20) - exact).abs().max().item()
    assert 3.0 < heun10 / heun20 < 5.0  # half the step, a quarter of the error
    # a velocity that depends on t: dx/dt = t x ends at x(1) e^(-1/2). dx/dt = x cannot tell a corrector evaluated at
    # t_cur from one at t_next; this one is then first order (the error halves, not quarters, with the step)
    exact = x1 * torch.exp(torch.tensor(-0.5, dtype=torch.float64))
    err = [(heun(lambda x, t: t * x, x1, n) - exact).abs().max().item() for n in (10, 20)]
    assert 3.0 < err[0] / err[1] < 5.0
    # solve() runs the solver it names
    path = get_path("linear")
    for name, solver in (("euler", euler), ("heun", heun)):
        assert torch.equal(solve(name, lambda x, t: t * x, x1, 10, path), solver(lambda x, t: t * x, x1, 10))


def test_euler_maruyama_by_hand_with_diffusion_two_sigma():
    """Two steps by hand on the linear path: w(t) = 2 sigma(t) (REPA's choice), drift in tau = 1 - t of
    -v + (w/2) score with score = -eps_hat / sigma, noise sqrt(w h) n. Any w gives the same marginals, so the
    Gaussian test above cannot tell w = sigma from 2 sigma; this pins the one documented. With v(x, t) = x / 2:
    t = 1 -> 0.04 (h = 0.96, w = 2): eps_hat = x, score = -x, drift = -1.5 x;
    t = 0.04 -> 0 (no noise): eps_hat = 0.96 v + x = 1.48 x, score = -37 x, w = 0.08, drift = -1.98 x."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64, generator=g)
    noise = torch.randn(1, 4, 3, dtype=torch.float64, generator=g)  # [steps - 1, B, ...]
    first = x + 0.96 * (-1.5 * x) + (2 * 0.96) ** 0.5 * noise[0]
    want = first + 0.04 * (-1.98 * first)
    got = solve("euler-maruyama", lambda x, t: x / 2, x, 2, get_path("linear"), noise)
    assert torch.allclose(got, want, atol=1e-12)
