"""iCT: curriculum, lognormal pair probabilities and weighting by hand; zero loss on a point mass.

For p_data = delta(x0) the consistency function is f(x, t) = x0 + (x - x0) eps/t.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from cmcore.diffusion.rng import same_randomness, seed_device
from cmcore.diffusion.schedules import karras_grid
from cmcore.methods.distances import l2
from cmcore.methods.ict import ict_loss, ict_N, ict_probabilities, ict_weighting

EPS = 0.002
X0 = torch.tensor([[0.3, -0.7, 0.1, 0.9]], dtype=torch.float64)


def f_exact(x, t):
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1)
    return X0 + (x - X0) * EPS / t


def f_wrong(x, t):
    return f_exact(x, t) + 0.01 * x


@pytest.mark.parametrize(
    "k, expected",
    [
        (0, 11),
        (49_999, 11),
        (50_000, 21),
        (100_000, 41),
        (349_999, 641),
        (350_000, 1281),
        (400_000, 1281),
    ],
)
def test_ict_N_doubles_every_K_prime(k, expected):
    # K = 400k, s0 = 10, s1 = 1280: K' = floor(400000 / (log2(128) + 1)) = 50000.
    assert ict_N(k, 400_000) == expected


def test_ict_N_with_a_ratio_that_is_not_a_power_of_two():
    # s0 = 2, s1 = 150: K' = floor(1000 / (log2(75) + 1)) = floor(138.33) = 138.
    assert [ict_N(k, 1000, 2, 150) for k in (137, 138, 828, 966, 1000)] == [3, 5, 129, 151, 151]
    assert ict_N(3, 5) == 81  # K' = max(floor(5 / 8), 1) = 1: tiny runs stay defined


def test_ict_probabilities_sum_to_one_and_match_erf_by_hand():
    for N in (11, 1281):
        p = ict_probabilities(N)
        assert p.shape == (N - 1,) and p.dtype == torch.float64
        assert p.sum().item() == pytest.approx(1.0, abs=1e-14) and bool((p > 0).all())
    # N = 3: two pairs (eps, t_2) and (t_2, T).
    t2 = ((EPS ** (1 / 7) + 80 ** (1 / 7)) / 2) ** 7

    def erf(t):
        return math.erf((math.log(t) + 1.1) / (math.sqrt(2) * 2.0))

    w = [erf(t2) - erf(EPS), erf(80.0) - erf(t2)]
    expected = [wi / sum(w) for wi in w]
    assert ict_probabilities(3).tolist() == pytest.approx(expected, rel=1e-13)


def test_ict_probabilities_peak_near_the_lognormal_median():
    t = karras_grid(1281)
    p = ict_probabilities(1281)
    density = p / (t[1:].log() - t[:-1].log())  # mass per unit of ln t
    peak = t[density.argmax()].item()
    assert 0.3 < peak < 0.37  # the mode of ln t is P_mean: exp(-1.1) = 0.333


def test_ict_weighting_is_one_over_the_gap():
    t = karras_grid(18)
    lam = ict_weighting(t[:-1], t[1:])
    assert torch.equal(lam, 1 / (t[1:] - t[:-1]))


def test_ict_loss_applies_the_weighting():
    # N = 2 has the single pair (eps, T): loss = lambda * d = 1 / (T - eps) for d = 1.
    def one(x, y):
        return torch.ones(x.shape[0], dtype=x.dtype)

    loss = ict_loss(f_exact, X0.expand(8, -1), 2, distance=one)
    assert loss.item() == pytest.approx(1 / (80.0 - EPS), rel=1e-15)


@pytest.mark.parametrize("N", [11, 1281])
def test_ict_loss_is_zero_for_the_exact_consistency_function(N):
    torch.manual_seed(0)
    x0 = X0.expand(256, -1)
    assert ict_loss(f_exact, x0, N).item() < 1e-12
    assert ict_loss(f_exact, x0, N, distance=l2).item() < 1e-12
    assert ict_loss(f_wrong, x0, N).item() > 1e-6


def test_ict_target_is_f_itself_without_gradient():
    calls = []

    def f_spy(x, t):
        calls.append((t.clone(), torch.is_grad_enabled()))
        return f_exact(x, t)

    torch.manual_seed(0)
    ict_loss(f_spy, X0.expand(16, -1), 11)
    (t_student, grad_student), (t_teacher, grad_teacher) = calls
    assert grad_student and not grad_teacher
    assert bool((t_student > t_teacher).all())  # student at t_{n+1}, teacher at t_n


def test_student_and_teacher_share_dropout_masks():
    def f_dropout(x, t):  # exact, plus a dropout term that cancels only with equal masks
        return f_exact(x, t) + 0.1 * F.dropout(torch.ones_like(x), 0.5, training=True)

    torch.manual_seed(0)
    a, b = f_dropout(X0, EPS), f_dropout(X0, EPS)
    assert not torch.equal(a, b)  # the masks are random
    a, b = same_randomness("cpu", lambda: f_dropout(X0, EPS), lambda: f_dropout(X0, EPS))
    assert torch.equal(a, b)
    assert ict_loss(f_dropout, X0.expand(256, -1), 11).item() < 1e-12


def test_seed_device_is_torch_manual_seed_for_the_cpu_generator():
    # TrainStep seeds the step's dropout with seed_device, not torch.manual_seed (which formats
    # tracebacks for the accelerators not in use): the same CPU generator state, the same masks.
    x = torch.ones(64, 8)
    torch.manual_seed(2**40 + 7)
    state, mask = torch.get_rng_state(), F.dropout(x, 0.5, training=True)
    torch.manual_seed(1)
    seed_device(2**40 + 7, "cpu")
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(F.dropout(x, 0.5, training=True), mask)
    seed_device(2**40 + 8, "cpu")
    assert not torch.equal(torch.get_rng_state(), state)
