"""Euler is first order and Heun second order on the exact PF-ODE of a Gaussian mixture."""

import math

import torch

from cmcore.diffusion.analytic import ring_mixture
from cmcore.diffusion.schedules import karras_grid
from cmcore.diffusion.solvers import edm_sampler, euler_step, heun_step

GM = ring_mixture(K=4, std=0.2)
T_HI, EPS = 2.0, 0.002


def _final_errors(step, Ns, x, ref):
    errors = []
    for N in Ns:
        t = karras_grid(N, EPS, T_HI).flip(0).tolist()
        y = x.clone()
        for a, b in zip(t[:-1], t[1:], strict=True):
            y = step(GM.denoiser, y, a, b)
        errors.append((y - ref).norm(dim=1).max().item())
    return errors


def _slope(Ns, errors):
    """Least-squares slope of log error against log(1/N)."""
    xs = [math.log(1 / n) for n in Ns]
    ys = [math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum(
        (a - mx) ** 2 for a in xs)


def test_solver_orders():
    g = torch.Generator().manual_seed(0)
    x = GM.sample(64, g) + T_HI * torch.randn(64, 2, generator=g, dtype=torch.float64)
    ref = GM.ode_solve(x, T_HI, EPS, steps=1500)
    Ns = [32, 64, 128, 256]
    euler = _slope(Ns, _final_errors(euler_step, Ns, x, ref))
    heun = _slope(Ns, _final_errors(heun_step, Ns, x, ref))
    assert 0.85 < euler < 1.15, euler
    assert 1.8 < heun < 2.2, heun


def test_edm_sampler_with_exact_denoiser_follows_the_ode():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(32, 2, generator=g, dtype=torch.float64)
    out18 = edm_sampler(GM.denoiser, z, num_steps=18, T=80.0)
    out80 = edm_sampler(GM.denoiser, z, num_steps=80, T=80.0)
    ref = GM.ode_solve(z * 80.0, 80.0, 0.002, steps=1500)
    # The last step lands on D(x, eps), which is within eps of x_eps: more steps, less error.
    e18, e80 = (out18 - ref).norm(dim=1).max(), (out80 - ref).norm(dim=1).max()
    assert e80 < e18 < 0.1
