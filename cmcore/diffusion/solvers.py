"""One-step solvers of the probability-flow ODE dx/dt = (x - D(x, t)) / t, and the EDM sampler.

Every solver takes a denoiser callable ``D(x, sigma)``; times may be floats or (B,) tensors.
"""

import torch

from cmcore.diffusion.precond import _per_sample
from cmcore.diffusion.schedules import karras_grid


def drift(D, x, t):
    """dx/dt = (x - D(x, t)) / t = -t * score(x, t) (EDM form of the PF-ODE, paper eq. 2)."""
    return (x - D(x, t)) / _per_sample(t, x)


def euler_step(D, x, t_cur, t_next):
    """x_next = x + (t_next - t_cur) * dx/dt(x, t_cur) (first order)."""
    h = _per_sample(t_next, x) - _per_sample(t_cur, x)
    return x + h * drift(D, x, t_cur)


def heun_step(D, x, t_cur, t_next):
    """Heun: x_e = Euler(x); x_next = x + h/2 * (dx/dt(x, t_cur) + dx/dt(x_e, t_next)) (2nd order).

    Two evaluations of D per step, as in EDM (Karras et al. 2022, Algorithm 1).
    """
    h = _per_sample(t_next, x) - _per_sample(t_cur, x)
    d_cur = drift(D, x, t_cur)
    x_e = x + h * d_cur
    return x + h * 0.5 * (d_cur + drift(D, x_e, t_next))


SOLVERS = {"euler": euler_step, "heun": heun_step}


def get_solver(name):
    """The one-step solver called ``name`` ('euler' or 'heun')."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[name]


@torch.no_grad()
def edm_sampler(D, z, num_steps=18, eps=0.002, T=80.0, rho=7.0, solver="heun"):
    """Deterministic EDM sampler: x_0 = T z, then t_0 = T > ... > t_{n-1} = eps > t_n = 0.

    Heun on every step but the last (to t = 0, Euler), so Heun-18 costs 2*18 - 1 = 35 NFE.
    """
    t_steps = karras_grid(num_steps, eps, T, rho).flip(0).tolist() + [0.0]
    x = z * T
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:], strict=True):
        if t_next == 0.0:
            x = D(x, t_cur)  # Euler to t = 0 lands exactly on the denoised estimate
        elif solver == "heun":
            x = heun_step(D, x, t_cur, t_next)
        else:
            x = euler_step(D, x, t_cur, t_next)
    return x


def edm_sampler_nfe(num_steps, solver="heun"):
    """Network evaluations of ``edm_sampler``: 2n - 1 for Heun, n for Euler."""
    return 2 * num_steps - 1 if solver == "heun" else num_steps
