"""Continuous-time CD / CT: the JVP against finite differences, the pseudo-objective's gradient
against the discrete loss as dt -> 0, and zero residual for exact consistency functions.
"""

import pytest
import torch

from cmcore.diffusion.analytic import ring_mixture
from cmcore.diffusion.precond import ConsistencyFunction
from cmcore.diffusion.schedules import karras_grid
from cmcore.diffusion.solvers import drift
from cmcore.methods.continuous import (
    continuous_cd_loss,
    continuous_consistency_loss,
    continuous_ct_loss,
    karras_warp,
    metric_hessian_product,
    total_derivative,
)
from cmcore.methods.distances import l1, l2, pseudo_huber
from cmcore.networks.mlp import MLP

EPS = 0.002
X0 = torch.tensor([[0.3, -0.7, 0.1, 0.9]], dtype=torch.float64)


def f_exact(x, t):  # consistency function of delta(X0)
    return X0 + (x - X0) * EPS / t.reshape(-1, 1)


def random_f(seed=0):
    """A consistency function of a random 2-D MLP, float64, with a non-zero output layer."""
    torch.manual_seed(seed)
    net = MLP(2, hidden=32, depth=2).double()
    torch.nn.init.normal_(net.out.weight, std=0.3)
    return ConsistencyFunction(net)


def trajectory_points(n=8, seed=1):
    """x0 from the ring mixture, z, t log-uniform in [0.05, 20], x_t = x0 + t z."""
    torch.manual_seed(seed)
    gm = ring_mixture()
    x0 = gm.sample(n)
    z = torch.randn_like(x0)
    t = torch.empty(n, dtype=torch.float64).uniform_(-3, 3).exp()
    return gm, x0, z, t, x0 + t[:, None] * z


def test_karras_warp_matches_the_grid_and_its_derivative():
    u = torch.linspace(0, 1, 18, dtype=torch.float64)
    t, dt_du = karras_warp(u)
    assert torch.allclose(t, karras_grid(18), rtol=1e-12)
    h = 1e-6
    fd = (karras_warp(u[1:-1] + h)[0] - karras_warp(u[1:-1] - h)[0]) / (2 * h)
    assert torch.allclose(dt_du[1:-1], fd, rtol=1e-7)


def test_jvp_equals_central_difference_along_the_ct_path():
    f = random_f()
    _, x0, z, t, x_t = trajectory_points()
    f_t, df_dt = total_derivative(f, x_t, t, z)
    h = 1e-5 * t
    fd = (f(x0 + (t + h)[:, None] * z, t + h) - f(x0 + (t - h)[:, None] * z, t - h)) / (2 * h)[
        :, None
    ]
    assert torch.equal(f_t, f(x_t, t))
    assert df_dt.abs().max().item() > 0.1
    assert torch.allclose(df_dt, fd, rtol=1e-7, atol=1e-9)


def test_jvp_equals_central_difference_along_the_pf_ode():
    f = random_f()
    gm, _, _, t, x_t = trajectory_points()
    v = drift(gm.denoiser, x_t, t)
    _, df_dt = total_derivative(f, x_t, t, v)
    # Follow the exact PF-ODE of the mixture a step h either way.
    h = 1e-5 * t
    x_plus, x_minus = gm.ode_solve(x_t, t, t + h, steps=10), gm.ode_solve(x_t, t, t - h, steps=10)
    fd = (f(x_plus, t + h) - f(x_minus, t - h)) / (2 * h)[:, None]
    assert torch.allclose(df_dt, fd, rtol=1e-7, atol=1e-9)


def test_metric_hessian_products_in_closed_form():
    torch.manual_seed(0)
    y, v = (
        torch.randn(4, 3, 2, 2, dtype=torch.float64),
        torch.randn(4, 3, 2, 2, dtype=torch.float64),
    )
    assert torch.allclose(metric_hessian_product(l2, y, v), 2 * v / 12, rtol=1e-12)
    c = 0.00054 * 12**0.5
    assert torch.allclose(metric_hessian_product(pseudo_huber, y, v), v / c, rtol=1e-10)


@pytest.mark.parametrize("distance, dt_rel", [(l2, 1e-6), (pseudo_huber, 1e-8)])
def test_pseudo_objective_gradient_is_the_limit_of_the_discrete_one(distance, dt_rel):
    # grad d(f(x + (t + dt) z, t + dt), sg f(x + t z, t)) / dt  ->  grad f^T G sg(df/dt).
    f = random_f()
    _, x0, z, t, x_t = trajectory_points()

    def gradient(loss):
        f.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in f.parameters()])

    g = gradient(continuous_consistency_loss(f, x_t, t, z, distance))
    dt = dt_rel * t
    with torch.no_grad():
        target = f(x_t, t)
    discrete = distance(f(x0 + (t + dt)[:, None] * z, t + dt), target) / dt
    g_discrete = gradient(discrete.mean())
    assert ((g - g_discrete).norm() / g.norm()).item() < 1e-5


@torch.no_grad()
def consistency_residual(f, x_t, t, dx_dt):
    """||df/dt||_2 per sample: how far f is from constant along the trajectory through (x_t, t)."""
    return total_derivative(f, x_t, t, dx_dt)[1].flatten(1).norm(dim=1)


def test_exact_consistency_function_of_the_mixture_has_zero_cd_residual():
    gm, _, _, t, x_t = trajectory_points()
    v = drift(gm.denoiser, x_t, t)

    def f_exact_gm(x, s):
        return gm.consistency(x, s, EPS, steps=100)

    assert consistency_residual(f_exact_gm, x_t, t, v).max().item() < 1e-6
    assert consistency_residual(gm.denoiser, x_t, t, v).max().item() > 1e-2  # D is not f
    torch.manual_seed(0)
    loss = continuous_cd_loss(f_exact_gm, gm.denoiser, gm.sample(8))
    assert abs(loss.item()) < 1e-6


def test_continuous_ct_loss_is_zero_for_the_exact_consistency_function():
    torch.manual_seed(0)
    x0 = X0.expand(64, -1)
    assert abs(continuous_ct_loss(f_exact, x0).item()) < 1e-12
    assert abs(continuous_ct_loss(f_exact, x0, pseudo_huber).item()) < 1e-12

    def f_wrong(x, t):
        return f_exact(x, t) + 0.01 * x * t.reshape(-1, 1)

    assert abs(continuous_ct_loss(f_wrong, x0).item()) > 1e-8


def test_continuous_losses_train_a_network_and_refuse_l1():
    f = random_f()
    gm = ring_mixture()
    torch.manual_seed(0)
    x0 = gm.sample(16)
    for loss in (continuous_cd_loss(f, gm.denoiser, x0), continuous_ct_loss(f, x0)):
        f.zero_grad()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in f.parameters()])
        assert bool(grads.isfinite().all()) and grads.abs().sum().item() > 0
    with pytest.raises(ValueError, match="l1"):
        continuous_ct_loss(f, x0, l1)
