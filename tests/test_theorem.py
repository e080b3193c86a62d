"""Theorem 1 (zero-loss CD error = O(dt^p)) and Theorem 2 (L_CD = L_CT + o(dt)), measured."""

import math

import pandas as pd
import pytest
import torch
from conftest import tiny_config

from cmcore import config
from cmcore.diffusion.analytic import ring_mixture
from cmcore.diffusion.precond import ConsistencyFunction
from cmcore.diffusion.schedules import karras_grid
from cmcore.diffusion.solvers import euler_step, heun_step
from cmcore.experiments.theorem import (
    ct_cd_gap,
    fit_slope,
    grid_reference,
    pair_distances,
    run_theorem1,
    zero_loss_cd_error,
    zero_loss_consistency,
)
from cmcore.methods.distances import l2
from cmcore.methods.objectives import consistency_distillation_loss, consistency_training_loss
from cmcore.networks import build_network

GM = ring_mixture(K=8, radius=1.0, std=0.3)
GRID = dict(eps=0.002, T=80.0, rho=7.0)  # the paper's Karras grid


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny networks


def _random_f(seed=0):
    """A smooth, fixed consistency function: an MLP with a random (not zero) output layer."""
    torch.manual_seed(seed)
    net = build_network({"arch": "mlp", "in_channels": 2, "hidden": 32, "depth": 2})
    torch.nn.init.normal_(net.out.weight, std=0.3)
    return ConsistencyFunction(net).double().requires_grad_(False)


def test_zero_loss_orders_are_those_of_the_solvers():
    Ns = [32, 64, 128]
    refs = [grid_reference(GM, N, num_points=8, ref_steps=300, seed=0, **GRID) for N in Ns]
    slopes = {}
    for name in ("euler", "heun"):
        errs = [zero_loss_cd_error(GM, name, r) for r in refs]
        assert all(e.error >= e.error_mean > 0 for e in errs)
        slopes[name] = fit_slope([e.delta_t for e in errs], [e.error for e in errs])
    assert 0.8 < slopes["euler"] < 1.2, slopes
    assert 1.7 < slopes["heun"] < 2.3, slopes


@pytest.mark.parametrize("solver", [euler_step, heun_step])
def test_zero_loss_solution_has_zero_cd_loss(solver):
    N = 12
    f = zero_loss_consistency(GM.denoiser, solver, karras_grid(N))
    x0 = GM.sample(512, torch.Generator().manual_seed(0))
    loss = consistency_distillation_loss(f, f, GM.denoiser, x0, N, solver, l2)
    assert loss.item() < 1e-24, loss.item()
    # Not vacuous: the zero-loss f of the other solver does not have zero loss.
    other = zero_loss_consistency(GM.denoiser, heun_step if solver is euler_step else euler_step,
                                  karras_grid(N))
    assert consistency_distillation_loss(other, other, GM.denoiser, x0, N, solver, l2) > 1e-6
    # Boundary condition, and only grid times are accepted.
    x = torch.randn(4, 2, dtype=torch.float64)
    assert torch.equal(f(x, 0.002), x)
    with pytest.raises(ValueError):
        f(x, 1.2345)


def test_pair_distances_are_the_integrands_of_the_library_losses():
    f, N, x0 = _random_f(), 10, GM.sample(256, torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    n, z = torch.randint(0, N - 1, (256,)), torch.randn_like(x0)
    d_cd, d_ct = pair_distances(f, GM.denoiser, x0, n, z, karras_grid(N))
    # The library draws n, then z, from the global generator: same seed, same pairs.
    torch.manual_seed(3)
    L_cd = consistency_distillation_loss(f, f, GM.denoiser, x0, N, euler_step, l2)
    torch.manual_seed(3)
    L_ct = consistency_training_loss(f, f, x0, N, l2)
    assert torch.allclose(d_cd.mean(), L_cd, rtol=1e-12)
    assert torch.allclose(d_ct.mean(), L_ct, rtol=1e-12)


def test_ct_cd_gap_shrinks_faster_than_dt():
    gap = ct_cd_gap(_random_f(), GM, [8, 16, 32, 64], num_samples=20_000, seed=0, **GRID)
    assert list(gap.columns[:5]) == ["N", "delta_t", "L_cd", "L_ct", "gap"]
    # Common random numbers resolve the gap: several standard errors from zero.
    assert (gap["gap"].abs() > 5 * gap["gap_se"]).all(), gap
    ratio = gap["gap_over_dt"].to_numpy()
    assert (ratio[1:] < ratio[:-1]).all(), gap
    assert ratio[-1] < ratio[0] / 4, gap
    assert fit_slope(gap["delta_t"], gap["gap"].abs()) > 1.5, gap


def test_fit_slope_recovers_a_power_law():
    dt = [3.0, 1.5, 0.7, 0.2, 0.01]
    assert fit_slope(dt, [4.2 * d**1.7 for d in dt]) == pytest.approx(1.7, abs=1e-12)
    assert fit_slope(dt, [0.5 * d**-0.5 for d in dt]) == pytest.approx(-0.5, abs=1e-12)
    with pytest.raises(ValueError):
        fit_slope([1.0, 2.0], [0.0, 1.0])


def _settings(tmp_path, **changes):
    """The theorem1 settings the CLI passes: the validated section, updated by ``changes``."""
    cfg = config.load(tiny_config(tmp_path))
    s = {k: v for k, v in cfg["theorem1"].items() if k != "enabled"}
    s.update(eps=0.002, T=80.0, rho=7.0, seed=0, threads=1)
    for key, value in changes.items():
        s[key] = {**s[key], **value} if isinstance(value, dict) else value
    return s


def test_run_theorem1_tiny(tmp_path):
    settings = _settings(tmp_path, N_zero_loss=[32, 64, 128], N_trained=[6, 9, 12],
                         N_gap=[8, 16, 32], num_points=4, ref_steps=200, gap_samples=4000,
                         train={"iters": 40, "batch": 64, "hidden": 16, "depth": 1})
    out = tmp_path / "out"
    torch.manual_seed(5)
    before = torch.get_rng_state()
    summary = run_theorem1(settings, out)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is left alone
    orders = pd.read_csv(out / "orders.csv")
    assert {"solver", "kind", "slope", "n_points", "N_min", "N_max"} <= set(orders.columns)
    assert len(orders) == 4 and orders["slope"].map(math.isfinite).all()
    row = orders.set_index(["solver", "kind"])
    assert 0.8 < row.loc[("euler", "zero_loss"), "slope"] < 1.2, orders
    assert 1.7 < row.loc[("heun", "zero_loss"), "slope"] < 2.3, orders
    assert row.loc[("heun", "trained"), "n_points"] == 3
    assert (row["N_min"] <= row["N_max"]).all()
    errors = pd.read_csv(out / "errors.csv")
    assert len(errors) == 2 * (6 + 3)  # zero-loss at N_zero_loss + N_trained; trained at N_trained
    assert (errors["error_sup"] >= errors["error_mean"]).all() and (errors["error_mean"] > 0).all()
    gap = pd.read_csv(out / "ct_cd_gap.csv")
    assert list(gap["N"]) == [8, 16, 32] and gap[["L_cd", "L_ct"]].gt(0).all().all()
    assert (out / "orders.png").stat().st_size > 1000
    assert (out / "ct_cd_gap.png").stat().st_size > 1000
    assert summary["slopes"]["euler/zero_loss"] == pytest.approx(row.loc[("euler", "zero_loss"),
                                                                         "slope"])
