"""The shipped `slurm` profile: it resolves from the repository root and dry-runs without Slurm;
on a real single-node Slurm (tests/slurm_harness.py, root only) the tiny DAG runs through it end
to end, one Slurm job per step, and a failing job is reported while the others finish."""

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT, snakemake, tiny_config
from slurm_harness import LocalSlurm, unavailable_reason

PROFILE = ROOT / "slurm" / "config.yaml"
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
# Test-only overrides: the squeue status command (no slurmdbd here; MinJobAge 600 s) and a
# short first status check, so that each level of the DAG does not wait the profile's 40 s.
FAST = ["--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1"]
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+)")


def test_profile_dry_run_from_the_repository_root():
    # --forceall: the whole DAG, whatever a `make reproduce` in this checkout left in results/
    r = snakemake("--profile", "slurm", "-n", "--forceall", "reproduce_table")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Using profile slurm" in r.stdout + r.stderr
    assert "reproduce_table" in r.stdout


def test_profile_settings():
    profile = yaml.safe_load(PROFILE.read_text())
    assert profile["executor"] == "slurm"
    assert profile["retries"] == 0
    assert profile["jobs"] >= 1 and profile["latency-wait"] >= 5
    assert profile["slurm-logdir"].startswith("logs/")
    # Partition and account are the user's: documented in the profile, not set there.
    assert not {"slurm_partition", "slurm_account"} & set(profile["default-resources"])
    text = PROFILE.read_text()
    assert "# slurm_partition:" in text and "# slurm_account:" in text


@pytest.fixture(scope="module")
def slurm():
    reason = unavailable_reason(install=True)
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm(fake_gpus=1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def snakemake_on(cluster, *args, cwd=ROOT, timeout=300):
    """Run snakemake against the local cluster; a hung run gets SIGINT (snakemake then scancels
    its jobs), SIGKILL only if that does not end it."""
    env = dict(cluster.env,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{cluster.env['PATH']}")
    with subprocess.Popen([SNAKEMAKE, *map(str, args)], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGINT)
            try:
                out, err = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            pytest.fail(f"snakemake timed out after {timeout}s:\n{err[-3000:]}\n"
                        f"{cluster.logs()}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def submitted(result):
    """Snakemake job id -> Slurm job id, from snakemake's log."""
    return dict(SUBMITTED.findall(result.stdout + result.stderr))


@pytest.mark.slurm
def test_tiny_dag_through_the_slurm_profile(slurm, tmp_path):
    config = tiny_config(
        tmp_path, sampling={"steps": [1], "curve_steps": []},
        resources={kind: {"gpu": 0, "mem_mb": 1000, "runtime": 10}
                   for kind in ("train", "sample", "evaluate", "light")})
    logdir = tmp_path / "slurm_logs"
    t0 = time.monotonic()
    r = snakemake_on(slurm, "reproduce_table", "--profile", "slurm", "--configfile", config,
                     *FAST, "--slurm-logdir", logdir, "--slurm-keep-successful-logs")
    seconds = time.monotonic() - t0
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:] + slurm.logs()
    print(f"tiny DAG through Slurm: {seconds:.0f}s (cluster up in {slurm.startup_seconds:.1f}s)")

    # Every job but the instant local ones (the table, the target) went through Slurm and
    # completed there.
    total = int(re.search(r"^total\s+(\d+)", log, re.M).group(1))
    local = re.findall(r"^localrule (\w+):", log, re.M)
    assert sorted(local) == ["reproduce_table", "table1"], local
    ids = submitted(r)
    assert len(ids) == total - len(local), log[-4000:]
    jobs = slurm.jobs()
    assert {jobs[i][2] for i in ids.values()} == {"COMPLETED"}, jobs
    rules = {re.match(r"rule_(.+?)(_wildcards_.*)?$", jobs[i][1]).group(1) for i in ids.values()}
    assert rules == {"prepare_data", "train_classifier", "train", "untrained", "sample",
                     "evaluate"}
    # Slurm's log of each job landed in the log folder.
    assert {p.stem for p in logdir.rglob("*.log")} == set(ids.values())

    table = pd.read_csv(tmp_path / "results" / "tables" / "table1.csv")
    assert set(zip(table["method"], table["steps"], strict=True)) == {
        ("teacher", 4), ("cd", 1), ("ct", 1), ("pd", 1), ("untrained", 1)}
    for column in ("fid", "isc", "precision", "recall"):
        assert all(math.isfinite(v) for v in table[column]), column


FAILING_WORKFLOW = """
rule all:
    input:
        "ok.txt",
        "gpu.txt",
        "fail.txt",


rule ok:
    output:
        "ok.txt",
    resources:
        mem_mb=100,
        runtime=5,
    shell:
        "echo ok > {output}"


rule gpu:
    output:
        "gpu.txt",
    resources:
        gpu=1,
        mem_mb=100,
        runtime=5,
    shell:
        "echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES > {output}"


rule fail:
    output:
        "fail.txt",
    resources:
        mem_mb=100,
        runtime=5,
    shell:
        "echo this step fails >&2; exit 3"
"""


@pytest.mark.slurm
def test_a_failing_job_is_reported_and_the_others_finish(slurm, tmp_path):
    (tmp_path / "Snakefile").write_text(FAILING_WORKFLOW)
    r = snakemake_on(slurm, "--profile", ROOT / "slurm", "--keep-going", *FAST, cwd=tmp_path,
                     timeout=120)
    log = r.stdout + r.stderr
    assert r.returncode != 0, log
    assert "Error in rule fail" in log
    assert (tmp_path / "ok.txt").read_text() == "ok\n"
    # The `gpu` resource became a GPU request: Slurm gave the job its (fake) GPU.
    assert (tmp_path / "gpu.txt").read_text() == "CUDA_VISIBLE_DEVICES=0\n"
    assert not (tmp_path / "fail.txt").exists()
    jobs = slurm.jobs()
    states = {jobs[i][1]: jobs[i][2] for i in submitted(r).values()}
    assert states == {"rule_ok": "COMPLETED", "rule_gpu": "COMPLETED", "rule_fail": "FAILED"}
    # The profile's log folder (relative to the working directory) keeps the failed job's log.
    (fail_log,) = (tmp_path / "logs" / "slurm" / "rule_fail").rglob("*.log")
    assert "this step fails" in fail_log.read_text()
