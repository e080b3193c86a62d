"""The Snakemake DAG: dry run and lint are clean, bad configs stop before any job, and the real
DAG runs end to end on a tiny config and writes a table of finite numbers."""

import math

import pandas as pd
import pytest
from conftest import ROOT, snakemake, tiny_config

RULES = ["resolved_config", "prepare_data", "train_classifier", "train_teacher", "train_cd",
         "train_ct", "train_pd", "train_untrained", "sample", "evaluate", "table1", "theorem1",
         "figure4"]


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


def test_tiny_pipeline_end_to_end(tmp_path):
    config = tiny_config(tmp_path)
    r = snakemake("reproduce_table", "--cores", "2", "--configfile", config)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "results"
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
    assert set(fig4.loc[fig4["method"] == "cd", "taus"]) == {"-", "0.8", "2 0.8 0.3"}
    assert (out / "plots" / "fig4_steps.png").stat().st_size > 0
    # Provenance: the resolved config lies beside the results.
    assert "code version" in (out / "config.yaml").read_text()
    # A second run has nothing to do.
    again = snakemake("reproduce_table", "-n", "--configfile", config)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_root_snakefile_is_where_the_readme_says():
    assert (ROOT / "Snakefile").is_file()
    assert (ROOT / "workflow/schemas/config.schema.yaml").is_file()
