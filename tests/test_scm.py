"""sCM (cmcore.methods.scm): on the Gaussian mixture the sCD objective vanishes at the exact
consistency function with the exact velocity (and not at a wrong one); the TrigFlow view of
the model and of an EDM teacher equals its VE view to float precision (sCT and sCD learn the
mixture: tests/test_training.py)."""

import copy

import pytest
import torch

from cmcore.diffusion.analytic import ring_mixture
from cmcore.diffusion.precond import Denoiser, TrigFlowConsistency
from cmcore.diffusion.rng import Draws
from cmcore.methods.scm import ct_velocity, scm_loss, trigflow_velocity
from cmcore.networks.mlp import MLP

SD = 0.5


class ExactTrigFlow:
    """f(x, t, trig=True) = (F_trig, 0) of the mixture's exact consistency function, which maps
    (x, s) on the VE path to the ODE solution at s -> 0 (1e-9 here); ``error`` adds error * x_in
    to F_trig (f then moves along the trajectories)."""

    def __init__(self, gm, error=0.0):
        self.gm, self.error = gm, error

    def __call__(self, x_in, t, trig=True):
        x_t = SD * x_in
        c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
        f = self.gm.ode_solve(x_t / c, SD * torch.tan(t), 1e-9, steps=100)
        return (c * x_t - f) / (SD * s) + self.error * x_in, torch.zeros_like(t)


@pytest.mark.parametrize("normalised", [False, True])
def test_scd_loss_vanishes_at_the_exact_consistency_function(normalised):
    gm = ring_mixture()
    x0 = gm.sample(8, torch.Generator().manual_seed(0))

    def velocity(x_t, t, x0, z):  # the exact PF-ODE in TrigFlow
        return trigflow_velocity(gm.denoiser, x_t, t, SD)
    c = 0.1 if normalised else None
    torch.manual_seed(1)
    exact = scm_loss(ExactTrigFlow(gm), x0, velocity, 1.0, SD, P_mean=-0.5, P_std=1.0, c=c,
                     adaptive=False, rng=Draws())
    torch.manual_seed(1)
    wrong = scm_loss(ExactTrigFlow(gm, 0.1), x0, velocity, 1.0, SD, P_mean=-0.5, P_std=1.0,
                     c=c, adaptive=False, rng=Draws())
    assert abs(exact.item()) < 1e-9, exact
    assert wrong.item() > 1e-4, wrong


def test_the_trigflow_view_equals_the_ve_view():
    torch.manual_seed(0)
    F = MLP(in_channels=2, hidden=16, depth=2)
    torch.nn.init.normal_(F.out.weight)
    f = TrigFlowConsistency(F, SD).double()
    x, sigma = torch.randn(5, 2, dtype=torch.float64), torch.tensor([1e-3, 0.1, 0.5, 2.0, 80.0])
    t = torch.atan(sigma.double() / SD)
    c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
    x_t = c * x  # the TrigFlow point of the VE point x at noise level sigma
    F_trig, w = f(x_t / SD, t, trig=True)
    torch.testing.assert_close(f(x, sigma.double()), c * x_t - s * SD * F_trig)
    assert torch.equal(w, torch.zeros_like(t))  # the adaptive weight starts at 0
    torch.testing.assert_close(f(x, torch.full((5,), 1e-12, dtype=torch.float64)), x)
    # An EDM teacher on the same backbone has the velocity sd F_trig: converted exactly.
    D = Denoiser(copy.deepcopy(F), SD).double()
    torch.testing.assert_close(trigflow_velocity(D, x_t, t, SD), SD * F_trig)


def test_ct_velocity_is_the_derivative_of_the_trigflow_path():
    x0, z, t = torch.randn(4, 3), torch.randn(4, 3), torch.rand(4)
    h = 1e-3
    path = [torch.cos(t + d)[:, None] * x0 + torch.sin(t + d)[:, None] * z for d in (-h, h)]
    torch.testing.assert_close(ct_velocity(None, t, x0, z), (path[1] - path[0]) / (2 * h),
                               rtol=1e-3, atol=1e-4)
