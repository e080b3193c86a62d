"""ECT: the mapping t -> r and its stages by hand; zero loss on a point mass.

For p_data = delta(x0) the consistency function is f(x, t) = x0 + (x - x0) eps/t.
"""

import math

import pytest
import torch

from cmcore.diffusion.precond import ConsistencyFunction, Denoiser
from cmcore.methods.ect import (
    ect_loss,
    ect_r,
    ect_sample_t,
    ect_stage,
)
from cmcore.models import init_from_teacher
from cmcore.networks.mlp import MLP

EPS = 0.002
X0 = torch.tensor([[0.3, -0.7, 0.1, 0.9]], dtype=torch.float64)


def f_exact(x, t):
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1)
    return X0 + (x - X0) * EPS / t


def f_wrong(x, t):
    return f_exact(x, t) + 0.01 * x


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("k, a", [(0, 1), (1, 1), (100, 1), (101, 2), (250, 3), (1000, 10)])
def test_ect_stage_is_ceil_k_over_d(k, a):
    assert ect_stage(k, 100) == a


def test_ect_r_by_hand():
    # t = 1, k = 150, d = 100: a = 2, r = t (1 - n(t) / 4), n(1) = 1 + 8 sigmoid(-1).
    r = ect_r(1.0, 150, 100).item()
    assert r == pytest.approx(1 - (1 + 8 * sigmoid(-1)) / 4, rel=1e-14)
    # t = 10, a = 10: the gap is about t / 1024.
    r = ect_r(10.0, 1000, 100).item()
    assert r == pytest.approx(10 * (1 - (1 + 8 * sigmoid(-10)) / 2**10), rel=1e-14)
    # Small t at the first stage: 1 - n(t)/2 < 0, so r is clamped at eps.
    assert ect_r(0.01, 0, 100).item() == EPS
    # q and kappa, b enter as written.
    r = ect_r(2.0, 1, 100, q=4.0, kappa=2.0, b=0.5).item()
    assert r == pytest.approx(2 * (1 - (1 + 2 * sigmoid(-1)) / 4), rel=1e-14)


def test_ect_r_shrinks_the_gap_stage_by_stage():
    t = torch.logspace(-2.5, 1.9, 200, dtype=torch.float64)
    prev = torch.full_like(t, EPS)
    for k in range(0, 2001, 100):
        r = ect_r(t, k, 100)
        assert bool((r < t).all()) and bool((r >= EPS).all()) and bool((r >= prev).all())
        prev = r
    assert bool((t - prev <= t * 9 / 2**20).all())  # a = 20 and n(t) <= 9


def test_ect_sample_t_is_a_truncated_lognormal():
    torch.manual_seed(0)
    t = ect_sample_t(50_000)
    assert bool((t > EPS).all()) and bool((t <= 80.0).all())
    wide = ect_sample_t(50_000, eps=1e-30, T=1e30).log()
    assert wide.mean().item() == pytest.approx(-1.1, abs=0.05)
    assert wide.std().item() == pytest.approx(2.0, abs=0.05)


@pytest.mark.parametrize("k", [0, 500, 1000])
def test_ect_loss_is_zero_for_the_exact_consistency_function(k):
    torch.manual_seed(0)
    x0 = X0.expand(256, -1)
    assert ect_loss(f_exact, x0, k, 100).item() < 1e-10
    assert ect_loss(f_wrong, x0, k, 100).item() > 1e-6


def test_ect_target_at_the_boundary_is_exact_and_without_gradient():
    calls = []

    def f_spy(x, t):  # wrong wherever it is asked at t = eps: the boundary must not ask it
        calls.append(torch.is_grad_enabled())
        t_ = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1)
        return torch.where(t_ <= EPS, x + 5.0, f_exact(x, t))

    torch.manual_seed(0)
    loss = ect_loss(f_spy, X0.expand(256, -1), 0, 100)  # first stage: many r clamp to eps
    assert loss.item() < 1e-10
    assert calls == [True, False]


def test_init_from_teacher_copies_the_backbone():
    """ECT's (and CD's) start, as training builds it: f's own backbone, the teacher's weights."""
    torch.manual_seed(0)
    D = Denoiser(MLP(4, hidden=16, depth=1)).double()
    torch.nn.init.normal_(D.model.out.weight)
    f = ConsistencyFunction(MLP(4, hidden=16, depth=1), eps=EPS).double()
    assert init_from_teacher(f, D) is f
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(f(x, EPS), x)  # boundary condition
    big = torch.tensor(80.0, dtype=torch.float64)
    assert torch.allclose(f(x, big), D(x, big), atol=1e-3)  # scalings agree away from eps
    f.model.out.bias.data += 1
    assert D.model.out.bias.abs().sum().item() == 0  # a copy, not a view of D's weights
