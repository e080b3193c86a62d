"""The settings each DAG step depends on (cmcore.dag): the views themselves, the resume identity
that uses them, a DAG built without torch, and the benchmarks' memory sampling the workflow sets.
What an edit reruns on a complete run: tests/test_tiny_run.py."""

import copy
import sys

import pytest
from conftest import ROOT, TINY, run

from cmcore import dag
from cmcore.config import validate


def test_the_dag_is_built_without_torch(tiny):
    # torch poisoned: any `import torch` while the DAG is built raises ImportError.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from snakemake.cli import main\n"
        "try:\n"
        f"    main(['-n', 'reproduce_table', '--configfile', {str(tiny)!r}])\n"
        "finally:\n"
        "    print('torch modules:', sorted(m for m in sys.modules if m.startswith('torch')))\n"
    )
    r = run([sys.executable, "-c", code], cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "torch modules: ['torch']" in r.stdout, r.stdout[-500:]  # only the poison entry
    assert "train" in r.stdout + r.stderr


def test_benchmarks_sample_memory_every_two_seconds(tiny):
    # Snakemake's timer, as the workflow leaves it, arms its next memory sample 2 s on (0.5 s
    # by default: peaks after a job's first 15 s missed, three times the psutil smaps walks;
    # workflow/rules/common.smk).
    code = (
        "import snakemake.benchmark as B\n"
        "from snakemake.cli import main\n"
        "try:\n"
        f"    main(['-n', 'reproduce_table', '--configfile', {str(tiny)!r}])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "timer = B.ScheduledPeriodicTimer(B.BENCHMARK_INTERVAL)\n"
        "timer.work = lambda: None\n"
        "timer.start()\n"
        "print('next sample in', timer._timer.interval, 's')\n"
        "timer.cancel()\n"
    )
    r = run([sys.executable, "-c", code], cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "next sample in 2 s" in r.stdout, r.stdout[-500:]


def test_resume_identity_is_the_training_settings():
    from cmcore.training.checkpoints import run_identity

    cfg = validate(copy.deepcopy(TINY))
    for method in ("teacher", "cd", "pd", "untrained"):
        identity = run_identity(cfg, method, data_sha256=None)
        assert identity["config"] == dag.settings(cfg, "train", method=method)


def test_settings_views(lpips_hub):
    cfg = validate(copy.deepcopy(TINY))
    cd = dag.settings(cfg, "train", method="cd")
    assert set(cd) == {"dataset", "seed", "device", "diffusion", "network", "cd"}
    assert "ckpt_every" not in cd["cd"] and cd["cd"]["iters"] == TINY["cd"]["iters"]
    # LPIPS options join the view only of a method that trains with LPIPS.
    lpips = validate({**copy.deepcopy(TINY), "cd": {**TINY["cd"], "distance": "lpips"}})
    assert "distance_options" in dag.settings(lpips, "train", method="cd")
    # Sampling: the configured taus of the step count, unless a search supplies them.
    assert dag.settings(cfg, "sample", method="cd", steps=2)["sampling"]["tau"] == {"2": [0.8]}
    assert "tau" not in dag.settings(cfg, "sample", method="pd", steps=2)["sampling"]
    searched = validate({**copy.deepcopy(TINY), "sampling": {
        **TINY["sampling"], "tau_search": {"enabled": True}}})
    assert "tau" not in dag.settings(searched, "sample", method="cd", steps=2)["sampling"]
    # An ablation run's view is its run config: the budget applied, the grid not included.
    ab = validate({**copy.deepcopy(TINY), "ablations": {"enabled": True, "cd": {"iters": 3}}})
    view = dag.settings(ab, "ablate", run="cd-euler-N4-l1", seed=2)
    assert view["seed"] == 2 and view["cd"]["iters"] == 3
    assert (view["cd"]["solver"], view["cd"]["N"], view["cd"]["distance"]) == ("euler", 4, "l1")
    assert set(view["ablations"]) == {"num_samples"}
    with pytest.raises(ValueError, match="no settings"):
        dag.settings(cfg, "nonsense")
