"""Shared fixtures: a tiny, complete config that runs the real DAG in about a minute."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "dataset": {"name": "digits"},
    "seed": 0,
    "device": "cpu",
    "threads": 1,
    "network": {"arch": "ddpmpp", "model_channels": 16, "channel_mult": [1, 2],
                "num_blocks": 1, "attn_resolutions": []},
    "teacher": {"iters": 6, "batch": 32, "lr": 0.001, "log_every": 3, "sampler_steps": 4},
    "cd": {"iters": 4, "batch": 32, "lr": 0.0004, "optimizer": "radam", "N": 6,
           "log_every": 2},
    "ct": {"iters": 4, "batch": 32, "lr": 0.0004, "optimizer": "radam", "s0": 2, "s1": 10,
           "log_every": 2},
    "pd": {"iters": 2, "batch": 32, "lr": 0.0002, "start_steps": 8, "log_every": 2},
    "sampling": {"num_samples": 120, "batch": 120, "steps": [1, 2], "curve_steps": [1, 2, 4],
                 "tau": {"2": [0.8], "4": [2.0, 0.8, 0.3]}},
    "evaluation": {"classifier": {"iters": 30}},
    "theorem1": {"enabled": False},
}


def tiny_config(tmp_path, **changes):
    """Write the tiny config (deep-updated by ``changes``: section -> dict) and return its path."""
    cfg = copy.deepcopy(TINY)
    cfg["outdir"] = str(tmp_path / "results")
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def tiny(tmp_path):
    return tiny_config(tmp_path)


def run(args, cwd=ROOT, timeout=600):
    """Run a command with the project's interpreter first on PATH; return CompletedProcess."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def cm(*args):
    """Run ``cm ARGS`` in this process (fast); returns an object like CompletedProcess."""
    import contextlib
    import io
    import types

    from cmcore.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def cm_process(*args):
    """Run ``python -m cmcore ARGS`` as a separate process."""
    return run([sys.executable, "-m", "cmcore", *map(str, args)])


def snakemake(*args):
    return run([str(Path(sys.executable).parent / "snakemake"), *map(str, args)])


TINY_ABLATIONS = {"enabled": True, "seeds": [0, 1], "num_samples": 60,
                  "cd": {"iters": 4, "snapshot_every": 2}, "ct": {"iters": 4, "snapshot_every": 2},
                  "distances": ["l1", "l2"], "solvers": ["euler"], "solver_N": [4],
                  "heun_N": [6], "ct_fixed": [{"N": 5, "mu": 0.9}]}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """reproduce_table of the tiny config with tiny ablations, run once: (config, outdir)."""
    tmp = tmp_path_factory.mktemp("tiny")
    config = tiny_config(tmp, ablations=TINY_ABLATIONS)
    r = snakemake("reproduce_table", "--cores", "2", "--configfile", config)
    assert r.returncode == 0, r.stderr[-3000:]
    return config, tmp / "results"
