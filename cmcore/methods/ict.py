"""Improved consistency training (iCT; Song & Dhariwal 2023, "Improved techniques for training
consistency models"), as changes to the paper's CT (Algorithm 3):

- exponential curriculum: N(k) doubles from s0 + 1 = 11 to s1 + 1 = 1281 grid points;
- the pair index n is drawn from a discretised lognormal instead of uniformly;
- weighting lambda(t_n) = 1 / (t_{n+1} - t_n);
- pseudo-Huber distance d(x, y) = sqrt(||x - y||^2 + c^2) - c, c = 0.00054 sqrt(dim);
- teacher theta^- = stopgrad(theta): no EMA; the loss evaluates f itself without gradient for the
  target, with the student's dropout masks (iCT synchronises the two dropout RNGs).

API (pure functions; per-example random numbers from ``rng``, a
cmcore.diffusion.rng.Draws; by default torch's own generators):
    ict_N(k, K, s0=10, s1=1280) -> int                       grid size at iteration k of K
    ict_probabilities(N, eps, T, rho, P_mean, P_std) -> (N-1,) float64    p(n), n = 1..N-1
    ict_weighting(t_n, t_n1) -> tensor                       lambda = 1 / (t_{n+1} - t_n)
    ict_loss(f, x0, N, eps, T, rho, P_mean, P_std, distance=pseudo_huber) -> scalar loss
"""

import math

import torch

from cmcore.diffusion.precond import _per_sample
from cmcore.diffusion.rng import Draws, same_randomness
from cmcore.diffusion.schedules import karras_grid
from cmcore.methods.distances import pseudo_huber


def ict_N(k, K, s0=10, s1=1280):
    """N(k) = min(s0 * 2^floor(k / K'), s1) + 1,  K' = floor(K / (log2 floor(s1 / s0) + 1)).

    The number of grid points doubles every K' iterations (s0 = 10, s1 = 1280: 8 stages of
    K / 8 iterations, N = 11, 21, ..., 1281). K' is at least 1 so that tiny runs stay defined.
    """
    K_prime = max(math.floor(K / (math.log2(math.floor(s1 / s0)) + 1)), 1)
    return min(s0 * 2 ** (k // K_prime), s1) + 1


def ict_probabilities(N, eps=0.002, T=80.0, rho=7.0, P_mean=-1.1, P_std=2.0):
    """p(n) = (erf(a_{n+1}) - erf(a_n)) / Z,  a_i = (ln t_i - P_mean) / (sqrt(2) P_std).

    The lognormal mass of [t_n, t_{n+1}] on the Karras grid, normalised over n = 1..N-1;
    entry i (0-based) is the probability of the pair (t_{i+1}, t_{i+2}). Float64, shape (N-1,).
    """
    t = karras_grid(N, eps, T, rho)
    erf = torch.erf((t.log() - P_mean) / (math.sqrt(2) * P_std))
    p = erf[1:] - erf[:-1]
    return p / p.sum()


def ict_weighting(t_n, t_n1):
    """lambda(t_n) = 1 / (t_{n+1} - t_n): small noise levels weigh more (iCT, Section 3.1)."""
    return 1 / (t_n1 - t_n)


def ict_loss(f, x0, N, eps=0.002, T=80.0, rho=7.0, P_mean=-1.1, P_std=2.0, distance=pseudo_huber,
             rng=None):
    """L_iCT = E[ lambda(t_n) d(f_theta(x + t_{n+1} z, t_{n+1}), f_theta-(x + t_n z, t_n)) ],
    n ~ p(n) (ict_probabilities), theta^- = stopgrad(theta), lambda = 1 / (t_{n+1} - t_n).

    ``f`` is the online consistency function; the target is f itself under no_grad, evaluated
    from the same RNG state as the student so that dropout masks coincide. Batch mean.
    """
    rng = rng or Draws()
    t64 = karras_grid(N, eps, T, rho).to(x0.device)
    # Draw the pair index from the discretised lognormal.
    p = ict_probabilities(N, eps, T, rho, P_mean, P_std).to(x0.device)
    n = rng.multinomial(p, x0.shape[0])
    weight = ict_weighting(t64[n], t64[n + 1]).to(x0.dtype)  # the gap taken in float64
    t_n, t_n1 = t64[n].to(x0.dtype), t64[n + 1].to(x0.dtype)

    f_n1, f_n, _ = stopgrad_pair(f, x0, t_n1, t_n, rng)
    return (weight * distance(f_n1, f_n)).mean()


def stopgrad_pair(f, x0, t, s, rng=None):
    """(f_theta(x0 + t z, t), stopgrad f_theta(x0 + s z, s), x0 + s z) with one z ~ N(0, I) for
    both points (the unbiased CT estimate of the ODE step) and the same dropout masks: the
    student and its theta^- = stopgrad(theta) teacher in iCT and ECT."""
    z = (rng or Draws()).randn_like(x0)
    x_t = x0 + _per_sample(t, x0) * z
    x_s = x0 + _per_sample(s, x0) * z

    def target():
        with torch.no_grad():
            return f(x_s, s)

    f_t, f_s = same_randomness(x0.device, lambda: f(x_t, t), target)
    return f_t, f_s, x_s
