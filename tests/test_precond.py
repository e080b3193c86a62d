"""Preconditioning: the boundary condition f(x, eps) = x holds exactly; EDM scalings."""

import pytest
import torch

from cmcore.diffusion.precond import ConsistencyFunction, Denoiser
from cmcore.networks import build_network

SMALL_UNET = dict(arch="ddpmpp", img_resolution=8, in_channels=1, model_channels=16,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])


@pytest.mark.parametrize("eps_as", ["float", "tensor"])
def test_boundary_condition_is_exact(eps_as):
    torch.manual_seed(0)
    f = ConsistencyFunction(build_network(SMALL_UNET), sigma_data=0.5, eps=0.002).eval()
    x = torch.randn(4, 1, 8, 8) * 3
    t = 0.002 if eps_as == "float" else torch.full((4,), 0.002)
    assert torch.equal(f(x, t), x)


def test_boundary_condition_mlp():
    f = ConsistencyFunction(build_network(dict(arch="mlp", in_channels=2, hidden=32, depth=2)))
    x = torch.randn(16, 2)
    assert torch.equal(f(x, 0.002), x)


class Echo(torch.nn.Module):
    """A backbone that returns its input: exposes c_in, c_skip and c_out."""

    def forward(self, x, noise_labels, class_labels=None):
        return x


def test_edm_scalings_by_hand():
    # With F(y) = y: D(x, s) = (c_skip + c_out c_in) x = (sd^2 + s sd) / (s^2 + sd^2) x.
    D, x = Denoiser(Echo(), sigma_data=0.5), torch.ones(1, 1, 2, 2)
    for s in (0.002, 0.5, 80.0):
        expected = (0.25 + s * 0.5) / (s**2 + 0.25)
        assert D(x, s).flatten()[0].item() == pytest.approx(expected, rel=1e-6)


def test_consistency_scalings_by_hand():
    f, x, eps = ConsistencyFunction(Echo(), 0.5, 0.002), torch.ones(1, 2), 0.002
    s = 1.0
    c_skip = 0.25 / ((s - eps) ** 2 + 0.25)
    c_out = (s - eps) * 0.5 / (s**2 + 0.25) ** 0.5
    c_in = 1 / (s**2 + 0.25) ** 0.5
    assert f(x, s)[0, 0].item() == pytest.approx(c_skip + c_out * c_in, rel=1e-6)
