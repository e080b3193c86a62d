"""Continuous-time consistency distillation and training: the N -> infinity limits of CD and CT
with theta^- = stopgrad(theta) (paper, Sections 4-5 and the appendix on continuous time).

For a distance d that is twice differentiable at x = y, with G(y) = Hessian_x d(x, y) at x = y,
(N - 1) grad L^N tends to the gradient of the pseudo-objective
    L^inf = E[ lambda(t) / (tau^{-1})'(t) * f_theta(x_t, t)^T G(f_theta-(x_t, t)) df_theta-/dt ],
    df/dt = d/dt f(x_t, t) along dx_t/dt = v = J_x f v + d_t f     (one forward-mode JVP),
    v = (x_t - D_phi(x_t, t)) / t   (CD: the teacher's PF-ODE, -t s_phi(x_t, t)),
    v = (x_t - x) / t = z           (CT: the unbiased estimate of the same velocity),
with x_t = x + t z and t = tau(u), u ~ U[0, 1], tau the Karras warp of the discrete grid.
The value of L^inf is no distance and may be negative; only its gradient matters. ||df/dt||,
zero for the exact consistency function, is total_derivative's second output.
l1 has no Hessian at x = y (the paper treats it apart) and is refused here.

API:
    karras_warp(u, eps, T, rho) -> (t, dt/du)            t = tau(u) and 1 / (tau^{-1})'(t)
    total_derivative(f, x_t, t, dx_dt) -> (f, df/dt)     one torch.func.jvp
    metric_hessian_product(distance, y, v) -> G(y) v     forward-over-reverse, per sample
    continuous_consistency_loss(f, x_t, t, dx_dt, distance, weight) -> scalar pseudo-loss
    continuous_cd_loss(f, D_teacher, x0, distance, eps, T, rho, weighting) -> scalar
    continuous_ct_loss(f, x0, distance, eps, T, rho, weighting) -> scalar
"""

import torch
from torch.func import grad, jvp

from cmcore.diffusion.precond import _per_sample
from cmcore.diffusion.rng import Draws
from cmcore.diffusion.solvers import drift
from cmcore.methods.distances import l1, l2
from cmcore.networks.forward_mode import forward_mode


def karras_warp(u, eps=0.002, T=80.0, rho=7.0):
    """t = tau(u) = (eps^(1/rho) + u (T^(1/rho) - eps^(1/rho)))^rho and
    dt/du = rho (T^(1/rho) - eps^(1/rho)) t^(1 - 1/rho) = 1 / (tau^{-1})'(t).

    u = (i - 1) / (N - 1) gives the Karras grid t_i; dt/du / (N - 1) is its local spacing.
    """
    lo, hi = eps ** (1 / rho), T ** (1 / rho)
    t = (lo + u * (hi - lo)) ** rho
    return t, rho * (hi - lo) * t ** (1 - 1 / rho)


def total_derivative(f, x_t, t, dx_dt):
    """(f(x_t, t), df/dt) with df/dt = J_x f(x_t, t) dx_dt + d_t f(x_t, t), one forward-mode JVP.

    ``t`` is a (B,) tensor. The primal output keeps its autograd graph (gradients reach the
    parameters of f); the tangent does too, detach it for a stop-gradient target. The networks
    run forward_mode()'s kernels (SDPA's math kernel, group norm's analytic JVP).
    """
    with forward_mode():
        return jvp(f, (x_t, t), (dx_dt, torch.ones_like(t)))


def metric_hessian_product(distance, y, v):
    """G(y) v, G(y) = Hessian_x d(x, y) at x = y: the JVP of grad_x d(x, y) at x = y along v.

    Per sample when d acts per sample (all cmcore distances do): l2 gives 2 v / dim,
    pseudo-Huber v / c.
    """
    y = y.detach()

    def grad_d(x):
        return grad(lambda a: distance(a, y).sum())(x)

    return jvp(grad_d, (y,), (v.detach(),))[1]


def continuous_consistency_loss(f, x_t, t, dx_dt, distance=l2, weight=1.0):
    """E[ w f_theta(x_t, t)^T G(f_theta-(x_t, t)) stopgrad(df/dt) ] for given x_t, t, dx_t/dt.

    Its gradient is E[w J_theta^T G df/dt], the limit of (N - 1) times the gradient of the
    discrete loss d(f_theta(x_{t+dt}, t + dt), f_theta-(x_t, t)) with dt = dt/du / (N - 1).
    ``weight`` is a float or (B,) tensor.
    """
    if distance is l1:
        raise ValueError(
            "continuous-time consistency losses need a distance with a Hessian at "
            "x = y (l2, pseudo_huber, lpips); l1 has none"
        )
    # One JVP gives f_theta (with graph) and df/dt (the stop-gradient teacher's derivative).
    f_t, df_dt = total_derivative(f, x_t, t, dx_dt)
    G_df = metric_hessian_product(distance, f_t, df_dt)
    per_sample = (f_t * G_df).flatten(1).sum(1)
    return (weight * per_sample).mean()


def _sample_t(x0, eps, T, rho, rng):
    """t = tau(u), u ~ U[0, 1], and the weight 1 / (tau^{-1})'(t), both (B,) in x0's dtype."""
    u = rng.rand(x0.shape[0], x0.device, x0.dtype)
    return karras_warp(u, eps, T, rho)


def continuous_cd_loss(f, D_teacher, x0, distance=l2, eps=0.002, T=80.0, rho=7.0, weighting=None,
                       rng=None):
    """L_CD^inf pseudo-objective: dx_t/dt = (x_t - D_phi(x_t, t)) / t, the teacher's PF-ODE.

    ``weighting`` is lambda(t) (a callable of the (B,) times; None is 1).
    """
    rng = rng or Draws()
    t, dt_du = _sample_t(x0, eps, T, rho, rng)
    x_t = x0 + _per_sample(t, x0) * rng.randn_like(x0)
    with torch.no_grad():
        v = drift(D_teacher, x_t, t)  # = -t s_phi(x_t, t)
    weight = dt_du if weighting is None else weighting(t) * dt_du
    return continuous_consistency_loss(f, x_t, t, v, distance, weight)


def continuous_ct_loss(f, x0, distance=l2, eps=0.002, T=80.0, rho=7.0, weighting=None,
                       rng=None):
    """L_CT^inf pseudo-objective: dx_t/dt estimated by (x_t - x) / t = z (Tweedie, unbiased)."""
    rng = rng or Draws()
    t, dt_du = _sample_t(x0, eps, T, rho, rng)
    z = rng.randn_like(x0)
    x_t = x0 + _per_sample(t, x0) * z
    weight = dt_du if weighting is None else weighting(t) * dt_du
    return continuous_consistency_loss(f, x_t, t, z, distance, weight)
