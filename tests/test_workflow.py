"""The Snakemake DAG: dry run and lint are clean, bad configs stop before any job, and the real
DAG runs end to end on a tiny config and writes a table of finite numbers."""

import json
import math
import sys

import pandas as pd
import pytest
from conftest import ROOT, snakemake, tiny_config

from cmcore.cli import torchrun_command

RULES = ["prepare_data", "train_classifier", "train", "untrained", "search_tau", "sample",
         "evaluate", "ablate", "ablation_report", "table1", "theorem1", "figure4"]


def test_dry_run_of_the_default_config_lists_every_rule():
    r = snakemake("-n", "reproduce_table")
    assert r.returncode == 0, r.stderr
    for rule in RULES:
        assert f"\n{rule} " in r.stdout, rule


def test_lint_is_clean():
    r = snakemake("--lint")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Lints for" not in r.stdout + r.stderr


@pytest.mark.parametrize("change, words", [
    ({"cd": {"N": 0}}, "cd.N: 0 is less than the minimum of 2"),
    ({"ct": {"s0": 10, "s1": 5}}, "ct.s1 = 5 must be greater than ct.s0 = 10"),
    ({"ct": {"distance": "l3"}}, "ct.distance: 'l3' is not one of"),
    ({"pd": {"warmups": 3}}, "'warmups' was unexpected"),
    ({"dataset": {"name": "cifar10", "path": "/no/such/cifar-10-python.tar.gz"},
      "evaluation": {"feature_extractor": "inception"}}, "/no/such/cifar-10-python.tar.gz"),
])
def test_bad_config_stops_before_any_job(tmp_path, change, words):
    r = snakemake("--cores", "1", "--configfile", tiny_config(tmp_path, **change))
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert words in err and "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line.lower()] == [
        f"config error: {err.split('config error: ')[1].splitlines()[0]}"]
    assert not (tmp_path / "results").exists()


@pytest.mark.xdist_group("tiny_run")
def test_tiny_pipeline_end_to_end(tiny_run):
    config, out = tiny_run
    table = pd.read_csv(out / "tables" / "table1.csv")
    expected = {("teacher", 4), ("cd", 1), ("cd", 2), ("ct", 1), ("ct", 2), ("pd", 1),
                ("pd", 2), ("untrained", 1)}
    assert set(zip(table["method"], table["steps"], strict=True)) == expected
    for column in ("fid", "isc", "precision", "recall"):
        assert all(math.isfinite(v) for v in table[column]), column
    assert table.set_index("method").loc["teacher", "nfe"] == 7  # Heun: 2 * 4 - 1
    assert (table["feature_extractor"].str.contains("classifier")).all()
    assert "| CD" in (out / "tables" / "table1.md").read_text()
    paper = (out / "tables" / "table1_paper.md").read_text()
    assert "not comparable" in paper and "3.55" in paper and "2.04" in paper
    # Fig. 4: every (method, steps) of the curve, with the taus that were used.
    fig4 = pd.read_csv(out / "tables" / "fig4_steps.csv")
    assert sorted(zip(fig4["method"], fig4["steps"], strict=True)) == sorted(
        (m, n) for m in ("cd", "ct", "pd") for n in (1, 2, 4))
    # ... the searched ones: tau_1 for 2 steps, tau_1..tau_3 for 4 (a greedy prefix).
    taus = json.loads((out / "taus" / "cd.json").read_text())["taus"]
    assert set(fig4.loc[fig4["method"] == "cd", "taus"]) == {
        "-", f"{taus[0]:g}", " ".join(f"{t:g}" for t in taus)}
    assert (out / "plots" / "fig4_steps.png").stat().st_size > 0
    # Fig. 3: each panel's mean and spread are those of the per-seed score files.
    fig3a = pd.read_csv(out / "tables" / "fig3a.csv").set_index(["run", "iters"])
    seeds = pd.concat(pd.read_csv(out / "ablations" / "cd-heun-N6-l1" / f"seed{s}" / "scores.csv")
                      for s in (0, 1)).groupby("iters")["fid"]
    assert list(seeds.count()) == [2, 2]  # snapshots at 2 and 4 iterations
    for it, fids in seeds:
        assert fig3a.loc[("cd-heun-N6-l1", it), "fid_mean"] == pytest.approx(fids.mean())
        assert fig3a.loc[("cd-heun-N6-l1", it), "fid_std"] == pytest.approx(fids.std())
    assert sorted(pd.read_csv(out / "tables" / "fig3b.csv")["run"].unique()) == [
        "cd-euler-N4-l2"]
    assert "fixed N=5, mu=0.9" in (out / "tables" / "fig3d.md").read_text()
    # Provenance: the resolved config lies beside the results.
    assert "code version" in (out / "config.yaml").read_text()
    # A second run has nothing to do.
    again = snakemake("reproduce_table", "-n", "--configfile", config)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_root_snakefile_is_where_the_readme_says():
    assert (ROOT / "Snakefile").is_file()
    assert (ROOT / "workflow/schemas/config.schema.yaml").is_file()


@pytest.mark.xdist_group("tiny_run")
def test_tiny_extras_end_to_end(tiny_run):
    # iCT, ECT, continuous-time CD / CT rows, searched taus and the editing grids.
    config, out = tiny_run
    table = pd.read_csv(out / "tables" / "table1_extended.csv")
    for method in ("ict", "ect", "cd_cont", "ct_cont", "cd", "teacher"):
        rows = table[table["method"] == method]
        assert len(rows) == (1 if method == "teacher" else 2), method
        assert rows["fid"].map(math.isfinite).all(), method
    # The multistep samplers used the searched taus, not the configured ones; the search kept
    # the best of its last round.
    search = json.loads((out / "taus" / "cd.json").read_text())
    assert len(search["taus"]) == 3 and search["taus"][0] != 0.8
    last = [t for t in search["trace"] if len(t["taus"]) == 3]
    assert search["trace"][-1] == {"taus": search["taus"], "fid": min(t["fid"] for t in last)}
    meta = json.loads((out / "samples" / "cd" / "steps2.json").read_text())
    assert meta["taus"] == search["taus"][:1]
    assert table.set_index(["method", "steps"]).loc[("ict", 2), "taus"] == \
        f"{json.loads((out / 'taus' / 'ict.json').read_text())['taus'][0]:g}"
    for task in ("inpaint", "interpolate"):
        assert (out / "plots" / f"edit_{task}.png").stat().st_size > 1000, task


def test_training_with_several_gpus_launches_torchrun(tmp_path):
    config = tiny_config(tmp_path, resources={"train": {"gpu": 4}})
    r = snakemake("reproduce_table", "-n", "-p", "--configfile", config)
    assert r.returncode == 0, r.stderr[-2000:]
    commands = [line.strip().removeprefix("Shell command: ") for line in r.stdout.splitlines()
                if " train --method " in line]
    assert {c.split(" train --method ")[1].split()[0] for c in commands} == {
        "teacher", "cd", "ct", "pd", "untrained"}
    for c in commands:  # cm train --gpus N reruns itself under torchrun (cmcore.cli)
        assert ("--gpus" not in c) if "--method untrained" in c else c.endswith(
            "--gpus 4 --threads 1 > " + c.split(" > ")[1]), c
    argv = ["train", "--method", "cd", "--gpus", "4"]
    assert torchrun_command(argv, 4) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
        "-m", "cmcore", *argv]
