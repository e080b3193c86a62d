"""Noise-level grids and training curricula. Pure functions of integers and floats."""

import math

import torch


def karras_grid(N, eps=0.002, T=80.0, rho=7.0, dtype=torch.float64):
    """t_i = (eps^(1/rho) + (i-1)/(N-1) * (T^(1/rho) - eps^(1/rho)))^rho, i = 1..N (ascending).

    Returns the N boundary times of the paper's Section 4, t_1 = eps < ... < t_N = T.
    """
    if N < 2:
        raise ValueError(f"karras_grid needs N >= 2, got N = {N}")
    i = torch.arange(N, dtype=dtype)
    lo, hi = eps ** (1 / rho), T ** (1 / rho)
    t = (lo + i / (N - 1) * (hi - lo)) ** rho
    t[0], t[-1] = eps, T  # exact endpoints, free of rounding in the power
    return t


def ct_N(k, K, s0, s1):
    """N(k) = ceil(sqrt(k/K * ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1 (paper, Appendix C).

    The discretisation curriculum of consistency training: N(0) = s0 and N(K) = s1 + 1 grid
    points. (Moving the -1 inside the root, as some transcriptions do, gives other N; this is
    the paper's form.)
    """
    inner = k / K * ((s1 + 1) ** 2 - s0**2) + s0**2
    return math.ceil(math.sqrt(inner) - 1) + 1


def ct_mu(k, K, s0, s1, mu0, variant="paper"):
    """mu(k) = exp(s0 * ln(mu0) / N(k)) (paper); the official code divides by N(k) - 1.

    ``variant="official"`` reproduces openai/consistency_models, which at k = 0 gives mu0^2.
    """
    N = ct_N(k, K, s0, s1)
    if variant == "paper":
        return math.exp(s0 * math.log(mu0) / N)
    if variant == "official":
        return math.exp(s0 * math.log(mu0) / (N - 1))
    raise ValueError(f"ct.schedule_variant must be 'paper' or 'official', got {variant!r}")


def ema_warmup_decay(decay, k):
    """Effective evaluation-EMA decay min(decay, (1 + k) / (10 + k)) at step k.

    The warm-up keeps the average from being dominated by the random initialisation in short
    runs; at paper scale (k >> 10 / (1 - decay)) it equals ``decay``.
    """
    return min(decay, (1 + k) / (10 + k))


def pd_grid(steps, eps=0.002, T=80.0, rho=7.0, dtype=torch.float64):
    """Descending sampling grid of a progressive-distillation student with ``steps`` steps.

    The Karras grid with steps + 1 points, reversed: T = s_0 > ... > s_steps = eps. Grids are
    nested: the grid of n steps is every other point of the grid of 2n steps.
    """
    return karras_grid(steps + 1, eps, T, rho, dtype).flip(0)
