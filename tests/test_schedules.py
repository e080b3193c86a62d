"""Karras grid, CT curricula and PD grids against hand-computed values."""

import math

import pytest
import torch

from cmcore.diffusion.schedules import ct_mu, ct_N, ema_warmup_decay, karras_grid, pd_grid


def test_karras_grid_endpoints_are_exact():
    t = karras_grid(18)
    assert t[0].item() == 0.002 and t[-1].item() == 80.0
    assert bool((t[1:] > t[:-1]).all())


def test_karras_grid_midpoint_by_hand():
    # N = 3: t_2 = ((eps^(1/7) + T^(1/7)) / 2)^7
    mid = ((0.002 ** (1 / 7) + 80 ** (1 / 7)) / 2) ** 7
    assert karras_grid(3)[1].item() == pytest.approx(mid, rel=1e-12)
    assert karras_grid(2).tolist() == [0.002, 80.0]


def test_karras_grid_rejects_one_point():
    with pytest.raises(ValueError, match="N >= 2"):
        karras_grid(1)


@pytest.mark.parametrize("k, expected", [(0, 2), (400_000, 107), (800_000, 151)])
def test_ct_N_paper_values(k, expected):
    # s0 = 2, s1 = 150, K = 800k (CIFAR-10). k = K/2: ceil(sqrt(11402.5) - 1) + 1 = 107.
    assert ct_N(k, 800_000, 2, 150) == expected


def test_ct_mu_at_start_and_end():
    K, s0, s1, mu0 = 800_000, 2, 150, 0.9
    assert ct_mu(0, K, s0, s1, mu0) == pytest.approx(0.9, abs=1e-15)  # exp(2 ln 0.9 / 2)
    assert ct_mu(0, K, s0, s1, mu0, "official") == pytest.approx(0.81, abs=1e-15)
    assert ct_mu(K, K, s0, s1, mu0) == pytest.approx(math.exp(2 * math.log(0.9) / 151), abs=1e-15)
    assert ct_mu(K, K, s0, s1, mu0, "official") == pytest.approx(0.9 ** (2 / 150), abs=1e-15)
    with pytest.raises(ValueError, match="schedule_variant"):
        ct_mu(0, K, s0, s1, mu0, "other")


def test_ct_N_is_monotone():
    values = [ct_N(k, 1000, 2, 150) for k in range(0, 1001, 10)]
    assert values == sorted(values)


def test_ema_warmup():
    assert ema_warmup_decay(0.999, 0) == pytest.approx(0.1)
    assert ema_warmup_decay(0.999, 10**6) == 0.999


def test_pd_grids_are_nested():
    fine, coarse = pd_grid(8), pd_grid(4)
    assert torch.equal(fine[::2], coarse)
    assert fine[0].item() == 80.0 and fine[-1].item() == 0.002
