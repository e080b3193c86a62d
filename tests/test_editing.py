"""Zero-shot editing: the constraints each task promises hold exactly (or to rounding)."""

import pytest
import torch

from cmcore.diffusion.precond import ConsistencyFunction
from cmcore.experiments.edit_demos import TASKS, demo
from cmcore.sampling.editing import (
    BlockRotation,
    ChannelRotation,
    colorize,
    denoise,
    edit,
    inpaint,
    interpolate,
    luma,
    rotation_with_first_row,
    sdedit,
    super_resolve,
)
from cmcore.sampling.samplers import consistency_sample

EPS = 0.002
TAUS = (80.0, 2.0, 0.5)


class TinyConv(torch.nn.Module):
    """F(x, c_noise) = tanh(conv(x) + c_noise): an image backbone with the precond signature."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, c_noise, class_labels=None):
        return torch.tanh(self.conv(x) + c_noise.reshape(-1, 1, 1, 1))


@pytest.fixture
def f():
    torch.manual_seed(0)
    return ConsistencyFunction(TinyConv()).double()


def images(n=2, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g, dtype=torch.float64) * 2 - 1


def test_rotation_with_first_row_is_orthogonal():
    for v in ((0.299, 0.587, 0.114), torch.ones(16)):
        Q = rotation_with_first_row(v)
        v = torch.as_tensor(v, dtype=torch.float64)
        assert torch.allclose(Q @ Q.T, torch.eye(len(v), dtype=torch.float64), atol=1e-14)
        assert torch.allclose(Q[0], v / v.norm(), atol=1e-15)


def test_rotations_invert():
    x = images()
    for A in (
        ChannelRotation(rotation_with_first_row((1.0, 2.0, 3.0))),
        BlockRotation(rotation_with_first_row(torch.ones(4)), 2),
    ):
        assert torch.allclose(A.inverse(A(x)), x, atol=1e-14)


def test_inpainting_keeps_the_known_pixels_exactly(f):
    y = images()
    known = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)) < 0.5).double()
    torch.manual_seed(3)
    x = inpaint(f, y, known, TAUS)
    keep = known.expand_as(y).bool()
    assert torch.equal(x[keep], y[keep])
    assert not torch.allclose(x[~keep], y[~keep])


def test_edit_with_nothing_to_generate_returns_the_reference(f):
    y = images()
    A = ChannelRotation(rotation_with_first_row((0.299, 0.587, 0.114)))
    torch.manual_seed(0)
    assert torch.allclose(edit(f, y, A, torch.zeros(3, 1, 1), TAUS), y, atol=1e-14)


def test_denoising_a_clean_image_at_eps_returns_it(f):
    x = images()
    assert torch.equal(denoise(f, x, EPS), x)  # f(x, eps) = x: the boundary condition
    noisy = x + 0.5 * torch.randn_like(x)
    assert torch.equal(denoise(f, noisy, 0.5), f(noisy, 0.5))
    torch.manual_seed(0)
    assert denoise(f, noisy, 0.5, taus=(0.2,)).shape == x.shape


def test_interpolation_endpoints_are_the_endpoint_samples(f):
    torch.manual_seed(0)
    z0, z1 = (
        torch.randn(2, 3, 8, 8, dtype=torch.float64),
        torch.randn(2, 3, 8, 8, dtype=torch.float64),
    )
    xs = interpolate(f, z0, z1, [0.0, 0.5, 1.0])
    assert xs.shape == (3, 2, 3, 8, 8)
    assert torch.equal(xs[0], f(80.0 * z0, 80.0)) and torch.equal(xs[2], f(80.0 * z1, 80.0))
    assert not torch.allclose(xs[1], xs[0])
    # Multistep: the re-noising is shared, so the endpoints match seeded samples.
    torch.manual_seed(5)
    xs = interpolate(f, z0, z1, [0.0, 0.3, 1.0], taus=(0.8,))
    torch.manual_seed(5)
    x0 = consistency_sample(f, z0, (0.8,))
    torch.manual_seed(5)
    x1 = consistency_sample(f, z1, (0.8,))
    assert torch.equal(xs[0], x0) and torch.equal(xs[2], x1)


def test_colorisation_keeps_the_luma_of_the_grey_image(f):
    grey = images()[:, :1]
    torch.manual_seed(0)
    x = colorize(f, grey, TAUS)
    assert x.shape == (2, 3, 8, 8)
    assert torch.allclose(luma(x), grey, atol=1e-12)
    assert (x[:, 0] - x[:, 1]).abs().max().item() > 1e-3  # it is coloured


def test_super_resolution_keeps_the_block_means(f):
    y_low = images(size=4)
    torch.manual_seed(0)
    x = super_resolve(f, y_low, 2, TAUS)
    assert x.shape == (2, 3, 8, 8)
    assert torch.allclose(torch.nn.functional.avg_pool2d(x, 2), y_low, atol=1e-12)
    assert x.std().item() > 0 and not torch.allclose(x[..., ::2, ::2], x[..., 1::2, 1::2])


def test_sdedit_starts_from_the_strokes(f):
    strokes = images()
    torch.manual_seed(0)
    x = sdedit(f, strokes, (EPS,))  # at tau_1 = eps the edit is the noised strokes themselves
    assert (x - strokes).abs().max().item() < 10 * EPS
    torch.manual_seed(0)
    x = sdedit(f, strokes, (10.0, 1.0))
    assert x.shape == strokes.shape and x.abs().max().item() <= 1.0
    with pytest.raises(ValueError, match="tau_1"):
        sdedit(f, strokes, ())


@pytest.mark.parametrize("task", TASKS)
def test_demo_is_seeded_and_leaves_the_global_generator_alone(task):
    torch.manual_seed(0)
    f = ConsistencyFunction(TinyConv())
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    torch.manual_seed(7)
    before = torch.get_rng_state()
    rows, labels = demo(f, task, x, TAUS, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert len(rows) == len(labels) and all(r.shape[1:] == x.shape[1:] for r in rows)
    again, _ = demo(f, task, x, TAUS, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(rows, again, strict=True))
    other, _ = demo(f, task, x, TAUS, seed=4)
    assert not torch.equal(rows[-1], other[-1])  # every task draws noise
