"""The math of EDM2's post-hoc EMA (ahpa.train.posthoc_ema): sigma_rel <-> gamma, beta_t, the profiles' inner
product, and the least-squares reconstruction, against a power EMA tracked directly."""

import math

import numpy as np
import pytest
import torch

from ahpa.train.ema import ema_decay, ema_sigma_rel, ema_update
from ahpa.train.posthoc_ema import (SIGMA_MAX, averaging_sigma_rel, exp_to_std, power_beta, profile_inner,
                                    solve_weights, std_to_exp)


def test_sigma_rel_and_gamma_round_trip_and_edm2s_values():
    # EDM2 (Sec. 3): sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94
    assert std_to_exp(0.05) == pytest.approx(16.97, abs=0.005) and std_to_exp(0.10) == pytest.approx(6.94, abs=0.005)
    for gamma in (0.01, 0.5, 1.0, 6.94, 16.97, 300.0):
        assert std_to_exp(exp_to_std(gamma)) == pytest.approx(gamma, rel=1e-9)
    for sigma in (0.001, 0.05, 0.07, 0.2, 0.28):
        assert exp_to_std(std_to_exp(sigma)) == pytest.approx(sigma, rel=1e-9)
    # gamma -> 0 is the plain mean of [0, t] (sigma_rel 12^-1/2); beyond it, or at 0, there is no such EMA
    assert exp_to_std(1e-9) == pytest.approx(SIGMA_MAX)
    for bad in (0.0, -0.1, SIGMA_MAX, 0.3):
        with pytest.raises(ValueError, match="sigma_rel"):
            std_to_exp(bad)


def test_beta_gives_the_power_profiles_weights_from_the_first_step():
    """hat_t = sum_tau w_tau theta_tau with w_tau = (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1): the recursion run on unit
    vectors (theta_tau = e_tau) leaves each step's weight in its coordinate."""
    assert power_beta(6.94, 1) == 0.0  # the first step's average is its weights: the initial ones never count
    assert power_beta(2.0, 4) == pytest.approx(0.75 ** 3)
    gamma, T = 6.94, 50
    hat = torch.full((T,), 123.0, dtype=torch.float64)  # whatever it held before step 1
    for t in range(1, T + 1):
        ema_update([hat], [torch.nn.functional.one_hot(torch.tensor(t - 1), T).double()], power_beta(gamma, t))
    tau = np.arange(1, T + 1, dtype=np.float64)
    expected = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / T ** (gamma + 1)
    np.testing.assert_allclose(hat.numpy(), expected, rtol=1e-10, atol=1e-15)
    with pytest.raises(ValueError, match="from 1"):
        power_beta(gamma, 0)


@pytest.mark.parametrize("ta,ga,tb,gb", [(1000, 16.97, 1000, 6.94), (300, 6.94, 1000, 16.97), (1000, 2.0, 400, 9.0)])
def test_the_profiles_inner_product_is_their_integral(ta, ga, tb, gb):
    s = np.linspace(0, max(ta, tb), 2_000_001)

    def p(t, g):
        return np.where(s <= t, (g + 1) * s ** g / t ** (g + 1), 0.0)

    integral = np.trapezoid(p(ta, ga) * p(tb, gb), s) if hasattr(np, "trapezoid") else np.trapz(p(ta, ga) * p(tb, gb), s)
    assert profile_inner(ta, ga, tb, gb) == pytest.approx(integral, rel=1e-5)
    assert profile_inner(ta, ga, tb, gb) == pytest.approx(profile_inner(tb, gb, ta, ga), rel=1e-12)


def test_a_snapshots_own_profile_is_reconstructed_from_itself():
    steps = [t for t in range(500, 4001, 500) for _ in (0, 1)]
    gammas = [std_to_exp(s) for _ in range(8) for s in (0.05, 0.10)]
    for i in (0, 7, 15):
        x, residual = solve_weights(steps, gammas, steps[i], gammas[i])
        assert x[i] == pytest.approx(1.0, abs=1e-6) and np.abs(np.delete(x, i)).max() < 1e-6, x
        assert residual < 1e-5


def test_a_reconstruction_between_the_tracked_lengths_matches_a_power_ema_tracked_there():
    """A synthetic trajectory (slow oscillations, a drift and noise in 64 coordinates) over 2,000 steps; power EMAs of
    sigma_rel 0.05 and 0.10 snapshotted every 100 steps (40 snapshots); sigma_rel 0.07 at step 2,000 reconstructed
    from them against its EMA tracked directly. The error is bounded, for any trajectory, by the profile residual
    times ||q|| ||theta|| (Cauchy-Schwarz; posthoc_ema's docstring): measured 3.6e-4 (residual 0.25%, bound 0.045)
    against a norm of 8.3; either tracked EMA alone is 0.89 or 1.10 away. Tolerance: the bound, and 1e-4 relative."""
    gen = torch.Generator().manual_seed(1)
    D, T, every = 64, 2000, 100
    freq, phase = torch.rand(D, generator=gen, dtype=torch.float64) * 0.01, torch.rand(D, generator=gen, dtype=torch.float64) * 6.28
    drift = torch.randn(D, generator=gen, dtype=torch.float64)
    gammas, target = [std_to_exp(0.05), std_to_exp(0.10)], std_to_exp(0.07)
    tracked = [torch.zeros(D, dtype=torch.float64) for _ in gammas]
    direct = torch.zeros(D, dtype=torch.float64)
    snaps, energy = [], 0.0
    for t in range(1, T + 1):
        theta = torch.sin(freq * t + phase) + drift * t / T + 0.05 * torch.randn(D, generator=gen, dtype=torch.float64)
        energy += float(theta @ theta)  # ||theta||^2 over [0, T], theta constant on each step's interval
        for hat, g in zip(tracked, gammas):
            ema_update([hat], [theta], power_beta(g, t))
        ema_update([direct], [theta], power_beta(target, t))
        if t % every == 0:
            snaps += [(t, g, hat.clone()) for hat, g in zip(tracked, gammas)]
    x, residual = solve_weights([s[0] for s in snaps], [s[1] for s in snaps], T, target)
    rebuilt = sum(float(w) * s[2] for w, s in zip(x, snaps))
    error = (rebuilt - direct).norm().item()
    q_norm = (target + 1) / math.sqrt((2 * target + 1) * T)
    assert residual < 0.01
    assert error <= residual * q_norm * math.sqrt(energy)
    assert error < 1e-4 * direct.norm().item(), error
    assert min((s[2] - direct).norm().item() for s in snaps[-2:]) > 0.5  # the neighbours are far: the test can fail


@pytest.mark.parametrize("sigma", [0.05, 0.10, 0.20])
def test_a_power_emas_own_updates_give_back_its_sigma_rel(sigma):
    """averaging_sigma_rel of power_beta's decays: the discrete profile's std is the continuous one's up to O(1/T^2)
    (measured: relative 1.8e-6, 9.3e-7, 5.4e-7 at T = 1,000; 100x less at 10,000)."""
    gamma = std_to_exp(sigma)
    for T, tol in ((1000, 1e-5), (10000, 1e-7)):
        assert averaging_sigma_rel([power_beta(gamma, t) for t in range(1, T + 1)]) == pytest.approx(sigma, rel=tol)


def test_the_library_emas_sigma_rel_is_the_std_of_its_own_updates():
    """ema_sigma_rel against the moments of the average the library's EMA (ema_update, ema_decay) computes itself: run
    on theta_t = t - 1/2 it gives the profile's mean, on (t - 1/2)^2 + 1/12 its second moment (theta_t stands for
    (t-1, t], the initial weights for tau = 0). The warm-up decay (1+n)/(10+n) is a power EMA of gamma 8 shifted by
    9 steps: sigma_rel 0.0906 at 4,000 steps, 0.0905 at 8,000 (exp_to_std(8) = 0.09045); without warm-up, 0.9999
    keeps 67% of the initial weights at 4,000 steps, which sets it at 0.300."""
    T = 4000
    hat = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64), requires_grad=False)  # the initial weights: 0
    for n in range(T):
        mid = n + 0.5  # the weights after update n+1, on (n, n+1]
        theta = torch.nn.Parameter(torch.tensor([mid, mid ** 2 + 1 / 12], dtype=torch.float64), requires_grad=False)
        ema_update([hat], [theta], ema_decay(n, 0.9999, True))
    m1, m2 = hat.tolist()
    assert ema_sigma_rel(0.9999, True, T) == pytest.approx(math.sqrt(m2 - m1 ** 2) / T, rel=1e-6)
    assert ema_sigma_rel(0.9999, True, 4000) == pytest.approx(0.09057, abs=1e-5)
    assert ema_sigma_rel(0.9999, True, 8000) == pytest.approx(0.09051, abs=1e-5)
    assert ema_sigma_rel(0.9999, True, 8000) == pytest.approx(exp_to_std(8.0), rel=1e-3)
    assert ema_sigma_rel(0.9999, False, 4000) == pytest.approx(0.3002, abs=1e-4)
    assert ema_sigma_rel(0.0, False, 10) == pytest.approx(12 ** -0.5 / 10)  # the last step's interval alone
    for bad, match in (((1.0, True, 10), "ema_decay"), ((0.99, True, 0), "steps"), ((0.99, True, 2.5), "steps")):
        with pytest.raises(ValueError, match=match):
            ema_sigma_rel(*bad)
    for bad in ([], [0.5, 1.2]):
        with pytest.raises(ValueError, match="update|decay"):
            averaging_sigma_rel(bad)
