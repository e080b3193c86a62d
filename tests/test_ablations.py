"""Fig. 3 ablations: run naming and configs, EMA snapshots equal to shorter runs, the fixed CT
curriculum, and means and spreads over seeds."""

import copy
import csv

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY

from cmcore import dag
from cmcore.config import validate
from cmcore.data import load_dataset
from cmcore.experiments import ablations
from cmcore.prepared import save_prepared
from cmcore.training.checkpoints import load_checkpoint
from cmcore.training.loop import train

MIXTURE = {
    "dataset": {"name": "mixture", "num_points": 500},
    "device": "cpu",
    "network": {"arch": "mlp", "hidden": 32, "depth": 2},
    "teacher": {"iters": 20, "batch": 32, "lr": 0.002},
    "cd": {"iters": 12, "batch": 32, "lr": 0.001, "N": 8, "target_mu": 0.5, "warmup": 4},
    "ct": {"iters": 9, "batch": 32, "lr": 0.001, "curriculum": "fixed", "N": 7, "mu": 0.8,
           "log_every": 3},
    "pd": {"iters": 1, "batch": 8, "lr": 0.001, "start_steps": 2},
    "sampling": {"steps": [1]},
    "evaluation": {"feature_extractor": "inception", "inception_weights": __file__},
}


def test_panels_name_each_run_once_and_share_the_common_one():
    cfg = validate({**copy.deepcopy(TINY), "ablations": {
        "distances": ["l1", "l2", "lpips"], "solvers": ["euler", "heun"], "solver_N": [4, 6],
        "heun_N": [4, 6, 9], "ct_fixed": [{"N": 41, "mu": 0.99}]}})
    p = dag.panels(cfg)
    assert [r for r, _, _ in p["a"]] == ["cd-heun-N6-l1", "cd-heun-N6-l2", "cd-heun-N6-lpips"]
    assert [r for r, _, _ in p["b"]] == ["cd-euler-N4-l2", "cd-euler-N6-l2", "cd-heun-N4-l2",
                                         "cd-heun-N6-l2"]
    assert [r for r, _, _ in p["d"]] == ["ct-adaptive", "ct-fixed-N41-mu0.99"]
    # cd-heun-N6-l2 sits in (a), (b) and (c) but is one run: 3 + 3 + 1 + 2 distinct runs.
    assert len(dag.runs(cfg)) == 9


def test_run_config_changes_only_the_named_settings():
    cfg = validate({**copy.deepcopy(TINY), "ablations": {"cd": {"iters": 50, "batch": 8},
                                                          "ct": {"snapshot_every": 5}}})
    method, out = dag.run_config(cfg, "cd-euler-N12-pseudo_huber", 7)
    assert method == "cd" and out["seed"] == 7
    changed = {k: v for k, v in out["cd"].items() if cfg["cd"][k] != v}
    assert changed == {"solver": "euler", "N": 12, "distance": "pseudo_huber", "iters": 50,
                       "batch": 8}
    assert {k: v for k, v in out.items() if k not in ("cd", "seed")} == \
        {k: v for k, v in cfg.items() if k not in ("cd", "seed")}
    method, out = dag.run_config(cfg, "ct-fixed-N41-mu0.99", 0)
    assert (out["ct"]["curriculum"], out["ct"]["N"], out["ct"]["mu"]) == ("fixed", 41, 0.99)
    assert out["ct"]["snapshot_every"] == 5 and out["ct"]["iters"] == cfg["ct"]["iters"]
    with pytest.raises(ValueError, match="not an ablation run"):
        dag.parse_run("cd-rk4-N18-l2")


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablation")
    cfg = validate(copy.deepcopy(MIXTURE))
    data = str(tmp / "data.npz")
    save_prepared(data, *load_dataset(cfg["dataset"], seed=0))
    torch.set_num_threads(1)
    train(cfg, "teacher", data, str(tmp / "teacher.pt"), echo=lambda s: None)
    return cfg, data, tmp


def test_snapshot_equals_the_final_ema_of_a_shorter_run(mixture):
    # CD's loss does not depend on the run's length K, so the EMA after k of K steps is the
    # final EMA of a k-step run with the same seed: two code paths, one state.
    cfg, data, tmp = mixture
    teacher = str(tmp / "teacher.pt")
    long = copy.deepcopy(cfg)
    long["cd"]["snapshot_every"] = 4
    ckpt = train(long, "cd", data, str(tmp / "long.pt"), teacher, echo=lambda s: None)
    assert sorted(ckpt["snapshots"], key=int) == ["4", "8", "12"]
    short = copy.deepcopy(cfg)
    short["cd"]["iters"] = 8
    ema8 = train(short, "cd", data, str(tmp / "short.pt"), teacher, echo=lambda s: None)["ema"]
    for name, value in ema8.items():
        assert torch.equal(ckpt["snapshots"]["8"][name], value), name
    for name, value in ckpt["ema"].items():
        assert torch.equal(ckpt["snapshots"]["12"][name], value), name
    assert load_checkpoint(str(tmp / "long.pt"))["snapshots"].keys() == ckpt["snapshots"].keys()


def test_fixed_curriculum_holds_N_and_mu(mixture):
    cfg, data, tmp = mixture
    (tmp / "ct").mkdir()
    train(cfg, "ct", data, str(tmp / "ct" / "ct.pt"), echo=lambda s: None)
    with open(tmp / "ct" / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["N"], r["mu"]) for r in rows] == [
        ("3", "7", "0.8"), ("6", "7", "0.8"), ("9", "7", "0.8")]


def test_summary_is_the_mean_and_sample_std_over_seeds(tmp_path):
    cfg = validate({**copy.deepcopy(TINY), "ablations": {
        "enabled": True, "distances": ["l2"], "solvers": [], "heun_N": [6], "ct_fixed": []}})
    fids = {0: [30.0, 20.0], 1: [34.0, 22.0], 2: [26.0, 27.0]}
    paths = []
    for seed, (f100, f200) in fids.items():
        path = tmp_path / f"seed{seed}.csv"
        pd.DataFrame({"iters": [100, 200], "fid": [f100, f200], "run": "cd-heun-N6-l2",
                      "seed": seed, "distance": "l2"}).to_csv(path, index=False)
        paths.append(path)
    summary = ablations.summarize(ablations.gather(paths, cfg))
    assert set(summary["panel"]) == {"a", "c"}  # heun N6 l2 is also the (c) run at N = 6
    a = summary[summary["panel"] == "a"].set_index("iters")
    assert a.loc[100, "fid_mean"] == pytest.approx(30.0)
    assert a.loc[100, "fid_std"] == pytest.approx(np.std([30, 34, 26], ddof=1))  # 4.0
    assert a.loc[200, "fid_std"] == pytest.approx(np.std([20, 22, 27], ddof=1))
    assert (a["seeds"] == 3).all()
    (tmp_path / "tables").mkdir(), (tmp_path / "plots").mkdir()
    written = ablations.write_reports(paths, cfg, tmp_path / "tables", tmp_path / "plots")
    assert written == ["fig3a", "fig3c"]  # no CT scores: no panel (d)
    assert "30.00 ± 4.00" in (tmp_path / "tables" / "fig3a.md").read_text()


def test_ict_curve_runs_on_the_ct_budget_but_keeps_its_own_s1():
    cfg = validate({**copy.deepcopy(TINY), "ict": {"iters": 9, "batch": 4, "lr": 0.1, "s1": 80},
                    "ablations": {"ict": True, "ct": {"iters": 50, "lr": 0.001, "s1": 10}}})
    assert dag.panels(cfg)["d"][-1] == ("ict", "iCT (2023)", None)
    method, out = dag.run_config(cfg, "ict", 3)
    assert method == "ict" and (out["ict"]["iters"], out["ict"]["lr"]) == (50, 0.001)
    assert out["ict"]["s1"] == 80 and out["ict"]["batch"] == 4 and out["seed"] == 3
    with pytest.raises(Exception, match="an iCT curve needs an ict section"):
        validate({**copy.deepcopy(TINY), "ablations": {"ict": True}})
