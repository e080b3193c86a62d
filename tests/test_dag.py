"""Rerun scope: after a complete run of the tiny DAG, an edit reruns the steps whose settings it
changes and what reads their outputs, nothing else; the DAG is built without torch."""

import copy
import re
import sys

import pytest
import yaml
from conftest import ROOT, TINY, run, snakemake

from cmcore import dag
from cmcore.config import validate

# The tests of the tiny run share one worker under pytest-xdist (one tiny run per session).
TINY_RUN = pytest.mark.xdist_group("tiny_run")


def planned_jobs(config):
    """{rule: [outputs of each job]} that a dry run of reproduce_table plans for ``config``."""
    r = snakemake("reproduce_table", "-n", "--configfile", config)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    text = r.stdout + r.stderr
    if "Nothing to be done" in text:
        return {}
    jobs = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", text)[1:]:
        rule = re.match(r"(?:local)?rule (\w+):", block)[1]
        outputs = re.search(r"\n\s+output: (.*)", block)
        jobs.setdefault(rule, []).append(outputs[1].split(", ") if outputs else [])
    return jobs


@pytest.fixture
def edited(tiny_run):
    """Write the tiny run's config with one edit (section -> dict, or key -> value) to a new
    file; the tiny run's own config file is left as it was."""
    config, out = tiny_run
    original = yaml.safe_load(config.read_text())
    paths = []

    def write(**changes):
        cfg = copy.deepcopy(original)
        for key, value in changes.items():
            if isinstance(value, dict):
                cfg[key] = {**cfg.get(key, {}), **value}
            else:
                cfg[key] = value
        path = config.parent / f"edited{len(paths)}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        paths.append(path)
        return path

    yield write, out


@TINY_RUN
def test_theorem1_edit_reruns_theorem1_only(edited):
    write, out = edited
    jobs = planned_jobs(write(theorem1={"N_gap": [8, 32]}))
    assert set(jobs) == {"theorem1", "reproduce_table"}, jobs
    assert len(jobs["theorem1"]) == 1


@TINY_RUN
@pytest.mark.parametrize("changes", [
    {"resources": {"train": {"mem_mb": 9999, "runtime": 600}, "light": {"mem_mb": 123}}},
    {"threads": 2},
    {"cd": {"ckpt_every": 7}},
])
def test_resources_threads_and_resume_cadence_rerun_nothing(edited, changes):
    write, out = edited
    assert planned_jobs(write(**changes)) == {}


@TINY_RUN
def test_cd_edit_reruns_cd_and_its_downstream_only(edited):
    write, out = edited
    jobs = planned_jobs(write(cd={"iters": 5}))
    assert set(jobs) == {"train", "search_tau", "sample", "evaluate", "table1", "figure4",
                         "reproduce_table"}, jobs
    trained = [o for outputs in jobs["train"] for o in outputs]
    assert trained and all("/runs/cd/" in o for o in trained), trained
    assert jobs["search_tau"] == [[f"{out}/taus/cd.json"]]
    for rule in ("sample", "evaluate"):
        for outputs in jobs[rule]:
            assert all(re.search(r"/(samples|metrics|plots)/(cd/|samples_cd_)", o)
                       for o in outputs), outputs
    assert not any("teacher" in o for outputs in jobs["train"] for o in outputs)


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


def test_resume_identity_is_the_training_settings():
    from cmcore.training.checkpoints import run_identity

    cfg = validate(copy.deepcopy(TINY))
    for method in ("teacher", "cd", "pd", "untrained"):
        identity = run_identity(cfg, method, data=None)
        assert identity["config"] == dag.settings(cfg, "train", method=method)


def test_settings_views():
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
