"""The math of EDM2's post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", Sec. 3 and Appendix C), as pure functions of numbers: no tensors, no files.

Power-function averaging profile. With training time t (here: optimiser steps) and exponent gamma > 0, the
power-function EMA at time t is the average of the weights theta(tau) over tau in [0, t] with the density

    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),        0 <= tau <= t    (integrates to 1).

Its length is told by its standard deviation relative to t (EDM2's sigma_rel): the moments of p_t are
E[tau] = (gamma+1)/(gamma+2) t and E[tau^2] = (gamma+1)/(gamma+3) t^2, so

    sigma_rel^2 = Var[tau] / t^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)).

sigma_rel falls monotonically from 12^-1/2 (gamma = 0, the plain mean of the whole run) to 0 (gamma -> inf): its
log-derivative in gamma, 1/(gamma+1) - 2/(gamma+2) - 1/(gamma+3), is negative for gamma >= 0. Inverting, gamma is the
largest real root of the cubic (gamma+2)^2 (gamma+3) - s (gamma+1) = 0 with s = sigma_rel^-2, i.e.

    gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0.

The update. Counting optimiser steps t = 1, 2, ... (t is the step just taken; theta_t the weights after it) and taking
theta piecewise constant, theta(tau) = theta_t on (t-1, t], the average at step t is exactly

    hat_t = sum_{tau=1..t} w_tau theta_tau,    w_tau = integral_{tau-1}^{tau} p_t = (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1),

which the recursion hat_t = beta_t hat_{t-1} + (1 - beta_t) theta_t with

    beta_t = ((t - 1) / t)^(gamma + 1) = (1 - 1/t)^(gamma + 1)

computes: multiplying hat_{t-1}'s weights (over (t-1)^(g+1)) by beta_t puts them over t^(g+1), and theta_t's weight
1 - beta_t is w_t. t = 1 gives beta = 0: the average starts at the weights after the first step, and the initial weights
never count. So the discrete EMA is the continuous profile applied to the piecewise-constant trajectory, with no
approximation, which is what makes the reconstruction below exact up to its least-squares residual.

Reconstruction. A snapshot i is hat at step t_i of a tracked gamma_i: the integral of p_i(tau) theta(tau). A linear
combination sum_i x_i hat_i is then the integral of (sum_i x_i p_i) theta, so the EMA of a target profile q (any
gamma, at any step T) is approximated by choosing x to minimise the L2 distance ||sum_i x_i p_i - q||: the normal
equations A x = b with A_ij = <p_i, p_j>, b_i = <p_i, q>. The error of the weights it gives is, by Cauchy-Schwarz,
at most ||sum x_i p_i - q|| * ||theta|| (theta's L2 norm over [0, T]), whatever the trajectory was.

The inner product of two profiles (t_a <= t_b; both vanish beyond their own t):

    <p_a, p_b> = integral_0^{t_a} (g_a+1)(g_b+1) tau^(g_a+g_b) / (t_a^(g_a+1) t_b^(g_b+1)) dtau
               = (g_a+1)(g_b+1) / ((g_a+g_b+1) t_b) * (t_a / t_b)^g_b,

and <q, q> = (g+1)^2 / ((2g+1) T).

Any EMA's length. An EMA run for T updates with per-update decays beta_1..beta_T (the share of the previous average
kept at update t) is sum_{t=0..T} w_t theta_t, with w_T = 1 - beta_T, w_t = (1 - beta_t) beta_{t+1} ... beta_T and
the initial weights' share w_0 = beta_1 ... beta_T. In the conventions above (theta_t on (t-1, t]; theta_0 at tau = 0)
its averaging profile puts the mass w_t uniformly on (t-1, t] and w_0 at 0, whose moments are sums: mean
m = sum_t w_t (t - 1/2) and variance sum_{t>=1} w_t ((t - 1/2 - m)^2 + 1/12) + w_0 m^2 (1/12: a unit interval's own).
Its sigma_rel is sqrt(variance) / T, comparable with a power-function EMA's: beta_t = power_beta(gamma, t) gives back
exp_to_std(gamma) up to O(1/T^2). The common warm-up decay min(d, (1+n)/(10+n)) = 1 - 9/(n+10) is, to first order in
1/t, power_beta(8, t) = (1 - 1/t)^9 at t = n + 10: until d caps it, its sigma_rel is close to exp_to_std(8) = 0.0905.
"""

from __future__ import annotations

import math

import numpy as np

SIGMA_MAX = 12 ** -0.5  # sigma_rel at gamma = 0; a power EMA with gamma > 0 has a smaller one


def exp_to_std(gamma: float) -> float:
    """sigma_rel of the power-function profile of exponent `gamma` (module docstring)."""
    if not gamma > 0:
        raise ValueError(f"exponent gamma={gamma}: a power-function EMA here has gamma > 0")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def std_to_exp(sigma_rel: float) -> float:
    """The exponent gamma > 0 whose profile has relative std `sigma_rel`, in (0, 12^-1/2): the cubic's largest real
    root (module docstring). np.roots finds it; the other two roots are complex or smaller."""
    if not 0 < sigma_rel < SIGMA_MAX:
        raise ValueError(f"sigma_rel={sigma_rel} is outside (0, {SIGMA_MAX:.4f}): larger ones have no power-function "
                         "EMA with a positive exponent (12^-1/2 is the plain mean of the whole run); EDM2 uses 0.05-0.10")
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) <= 1e-9 * max(1.0, abs(r.real))))


def power_beta(gamma: float, t: int) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1): the share of the previous average kept at step t (1-based; t = 1 gives 0)."""
    if t < 1:
        raise ValueError(f"step t={t}: steps are counted from 1")
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def profile_inner(t_a, g_a, t_b, g_b):
    """<p_a, p_b>, the L2 inner product of the profiles of exponent g_a at time t_a and g_b at t_b (module docstring).
    Takes numbers or numpy arrays (broadcast), in float64."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    first = t_a <= t_b
    t_lo, t_hi = np.where(first, t_a, t_b), np.where(first, t_b, t_a)
    g_hi = np.where(first, g_b, g_a)  # the exponent of the profile that reaches further
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * t_hi) * (t_lo / t_hi) ** g_hi


def solve_weights(steps, gammas, target_step: float, target_gamma: float) -> tuple[np.ndarray, float]:
    """The weights x of the snapshots (their steps and exponents, one each) whose combination sum_i x_i p_i is closest
    in L2 to the profile of `target_gamma` at `target_step`, and the fit's relative residual
    ||sum_i x_i p_i - q|| / ||q|| (0: the target's profile exactly; 1: no better than nothing).

    A is a Gram matrix, ill-conditioned when snapshots are many and close (its condition number grows ~10x per
    doubling of their number); lstsq solves it by SVD, which keeps the least-norm x where A is nearly singular."""
    t = np.asarray(steps, dtype=np.float64).reshape(-1)
    g = np.asarray(gammas, dtype=np.float64).reshape(-1)
    if t.shape != g.shape or t.size == 0:
        raise ValueError(f"{t.size} snapshot steps and {g.size} exponents: give one of each per snapshot")
    gram = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner(t, g, target_step, target_gamma)
    x = np.linalg.lstsq(gram, b, rcond=None)[0]
    qq = (target_gamma + 1) ** 2 / ((2 * target_gamma + 1) * target_step)
    # ||e||^2 = <q,q> - 2 x.b + x.A.x, clipped at 0: it cancels to rounding (~1e-16 <q,q>) when the fit is exact
    err2 = max(qq - 2 * float(x @ b) + float(x @ gram @ x), 0.0)
    return x, math.sqrt(err2 / qq)


def averaging_sigma_rel(betas) -> float:
    """sigma_rel of the EMA whose update t (1-based) kept the share betas[t-1] of the previous average, after all
    len(betas) updates (module docstring, "Any EMA's length"): the relative std of its averaging profile over the run."""
    b = np.asarray(betas, dtype=np.float64).reshape(-1)
    if b.size == 0:
        raise ValueError("no EMA updates: sigma_rel is told after at least one")
    ok = (b >= 0) & (b <= 1)  # False for NaN too
    if not ok.all():
        raise ValueError(f"EMA decays {b[~ok][:3].tolist()}: a decay (the share of the average kept) is in [0, 1]")
    kept = np.append(np.cumprod(b[::-1])[::-1], 1.0)  # kept[t] = beta_{t+1} ... beta_T, kept[T] = 1
    w = (1.0 - b) * kept[1:]  # theta_t's weight, t = 1..T
    mid = np.arange(1, b.size + 1, dtype=np.float64) - 0.5
    mean = float(w @ mid)  # theta_0 sits at 0 and adds nothing to it
    var = float(w @ ((mid - mean) ** 2 + 1.0 / 12.0)) + kept[0] * mean ** 2
    return math.sqrt(var) / b.size
