"""Easy consistency tuning (ECT; Geng et al. 2024, "Consistency models made easy").

ECT initialises f_theta from a pretrained denoiser (cmcore.models.init_from_teacher) and trains
on pairs r < t along one noise direction, with the gap t - r shrinking stage by stage
(diffusion -> consistency):
    t ~ lognormal(P_mean, P_std),  r / t = 1 - (1/q)^a n(t),  n(t) = 1 + kappa sigmoid(-b t),
    a = ceil(k / d) (stage of iteration k, d iterations per stage),
    L = E[ d(f_theta(x + t z, t), f_theta-(x + r z, r)) / (t - r) ],  theta^- = stopgrad(theta).
ECT's names: kappa is the paper's k (k is the iteration here). CIFAR-10 settings of the official
code: q = 2, kappa = 8, b = 1, P_mean = -1.1, P_std = 2.0, d(x, y) = ||x - y||_2 (pseudo-Huber
with c = 0), dropout 0.2 with the student's masks reused by the teacher.

Our consistency functions live on [eps, T] with f(x, eps) = x (ECT's on [0, T] with f(x, 0) = x),
so t is drawn from the lognormal truncated to [eps, T] and r is clamped at eps instead of 0; a
clamped r has the exact target x + eps z (the boundary condition), ECT's x at r = 0.

API (pure functions; per-example random numbers from ``rng``, a
cmcore.diffusion.rng.Draws; by default torch's own generators):
    ect_stage(k, d) -> int                                       a = max(ceil(k / d), 1)
    ect_r(t, k, d, q, kappa, b, eps) -> tensor                   the mapping t -> r
    ect_sample_t(n, P_mean, P_std, eps, T) -> (n,) float64       truncated lognormal
    ect_loss(f, x0, k, d, q, kappa, b, P_mean, P_std, eps, T, distance) -> scalar loss
"""

import functools
import math

import torch

from cmcore.diffusion.precond import _per_sample
from cmcore.diffusion.rng import Draws
from cmcore.methods.distances import pseudo_huber
from cmcore.methods.ict import stopgrad_pair

# ECT's CIFAR-10 distance: sqrt(||x - y||^2 + c^2) - c with c = 0, the plain l2 norm.
ECT_DISTANCE = functools.partial(pseudo_huber, c=0.0)


def ect_stage(k, d):
    """a = ceil(k / d), at least 1: the number of times the gap has been divided by q.

    The bare formula gives a = 0 at k = 0 (r = eps for all t, a denoising step); the official
    code starts at a = 1 (its stage counter is (tick - 1) // d + 1), and so do we.
    """
    return max(math.ceil(k / d), 1)


def ect_r(t, k, d, q=2.0, kappa=8.0, b=1.0, eps=0.002):
    """r = max(t (1 - (1/q)^a n(t)), eps),  n(t) = 1 + kappa sigmoid(-b t),  a = ect_stage(k, d).

    n(t) widens the gap at small t, where r would otherwise be too close to t; r < t always.
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    n_t = 1 + kappa * torch.sigmoid(-b * t)
    return torch.clamp(t * (1 - n_t / q ** ect_stage(k, d)), min=eps)


def ect_sample_t(n, P_mean=-1.1, P_std=2.0, eps=0.002, T=80.0, rng=None):
    """ln t ~ N(P_mean, P_std^2) truncated to [eps, T], by inverse CDF; shape (n,), float64.

    t is kept a hair above eps (factor 1 + 1e-6) so that t - r > 0 in the weighting.
    """
    lo = torch.special.ndtr(torch.tensor((math.log(eps) - P_mean) / P_std, dtype=torch.float64))
    hi = torch.special.ndtr(torch.tensor((math.log(T) - P_mean) / P_std, dtype=torch.float64))
    u = lo + (hi - lo) * (rng or Draws()).rand(n, "cpu", torch.float64)
    t = (P_mean + P_std * torch.special.ndtri(u)).exp()
    return t.clamp(eps * (1 + 1e-6), T)


def ect_loss(
    f,
    x0,
    k,
    d,
    q=2.0,
    kappa=8.0,
    b=1.0,
    P_mean=-1.1,
    P_std=2.0,
    eps=0.002,
    T=80.0,
    distance=ECT_DISTANCE,
    rng=None,
):
    """L_ECT = E[ d(f_theta(x + t z, t), f_theta-(x + r z, r)) / (t - r) ], r = ect_r(t, k, ...),
    theta^- = stopgrad(theta), at iteration k with d iterations per stage.

    ``f`` is the online consistency function; the target is f itself under no_grad from the
    student's RNG state (shared dropout masks). Batch mean.
    """
    # Sample t, map it to r (float64 so that the gap t - r is exact enough).
    t64 = ect_sample_t(x0.shape[0], P_mean, P_std, eps, T, rng)
    r64 = ect_r(t64, k, d, q, kappa, b, eps)
    weight = (1 / (t64 - r64)).to(x0.device, x0.dtype)
    t, r = t64.to(x0.device, x0.dtype), r64.to(x0.device, x0.dtype)

    # One noise direction for both points; the teacher is the student without gradient.
    f_t, f_r, x_r = stopgrad_pair(f, x0, t, r, rng)
    # r clamped to eps: the boundary condition gives the target exactly.
    at_boundary = _per_sample((r64 <= eps).to(x0.device), x0) > 0
    f_r = torch.where(at_boundary, x_r, f_r)
    return (weight * distance(f_t, f_r)).mean()
