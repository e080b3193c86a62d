"""Shared fixtures: a tiny, complete config that runs the real DAG in about a minute."""

import copy
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import snakemake_fork
import yaml

ROOT = Path(__file__).resolve().parents[1]

# pytest-xdist's workers share the machine's cores: each worker, and each process it starts,
# gets its share of OpenMP (torch) threads. More threads than cores spin while they wait: on 2
# cores with 2 workers, one thread each took the suite from 299-303 s to 284 s (measured).
# Set before torch is imported; a value of the user's own is kept.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (_CORES or 1) // _WORKERS)))

# The test modules' imports (torch's million objects among them) run with the garbage collector
# paused; pytest_collection_finish freezes them out of its later passes (as `cm` does).
gc.disable()


def pytest_collection_finish(session):
    gc.freeze()
    gc.enable()


@pytest.fixture(scope="session", autouse=True)
def _temporary_folder(tmp_path_factory):
    """The processes the tests start keep their temporary files under pytest's base folder,
    which pytest rotates, not in the system's: each torchrun leaves a torchelastic_* folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
        yield


# The tiny config of .test/config/config.yaml (FULL): the session's tiny run builds all of it;
# TINY, for the other tests, leaves out the ablations, Theorem 1, the later recipes, the tau
# search and the edits.
FULL = yaml.safe_load((ROOT / ".test" / "config" / "config.yaml").read_text())
OPTIONAL = ("ablations", "theorem1", "ict", "ect", "cd_cont", "ct_cont", "sct", "scd",
            "editing")
TINY = {k: v for k, v in copy.deepcopy(FULL).items() if k not in OPTIONAL}
del TINY["sampling"]["tau_search"]
TINY["theorem1"] = {"enabled": False}


# A results folder that breaks any unquoted path in a shell command (and, unquoted, would run
# `touch PWNED`).
HOSTILE_OUTDIR = "tiny results ü $(touch PWNED); x'&"


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


@pytest.fixture
def lpips_hub(tmp_path, monkeypatch):
    """A torch hub cache (TORCH_HOME) that names LPIPS's AlexNet weights (an empty stand-in:
    validation checks the file is there, dry runs never read it)."""
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "alexnet-owt-7be5be79.pth").write_bytes(b"")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return checkpoints


def _environment():
    """This process's environment with the project's interpreter first on PATH."""
    return dict(os.environ,
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def run(args, cwd=ROOT, timeout=600):
    """Run a command with the project's interpreter first on PATH; return CompletedProcess."""
    return subprocess.run(args, cwd=cwd, env=_environment(), capture_output=True, text=True,
                          timeout=timeout)


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


def snakemake(*args, cwd=ROOT, timeout=600):
    """Run ``snakemake ARGS`` (its command line, in a process forked from one that has imported
    Snakemake: tests/snakemake_fork.py) with the project's interpreter first on PATH."""
    return snakemake_fork.snakemake([str(a) for a in args], cwd, _environment(), timeout)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """reproduce_table and reproduce_extras of .test/config/config.yaml, run once in one DAG:
    (config, outdir). The outdir holds a space, a non-ASCII letter and shell metacharacters:
    every path must reach the shell quoted (tests/test_tiny_run.py looks for PWNED)."""
    tmp = tmp_path_factory.mktemp("tiny")
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({**FULL, "outdir": str(tmp / HOSTILE_OUTDIR)}))
    r = snakemake("reproduce_table", "reproduce_extras", "--cores", "2", "--configfile", config)
    assert r.returncode == 0, r.stderr[-3000:]
    return config, tmp / HOSTILE_OUTDIR


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny networks (``pytestmark = usefixtures``): as fast
    as two there, and far faster on a busy 2-core machine."""
    from cmcore.threads import torch_threads

    with torch_threads(1):
        yield


# A small ADM for 8x8 grey digits, in the official key layout.
DIGITS_ADM = {"arch": "adm", "img_resolution": 8, "in_channels": 1, "out_channels": 1,
              "label_dim": 0, "model_channels": 32, "channel_mult": [1, 2], "num_blocks": 1,
              "attn_resolutions": [4], "num_head_channels": 16, "use_scale_shift_norm": True,
              "resblock_updown": True, "dropout": 0.0}


def openai_release(folder, name):
    """Save DIGITS_ADM with random weights as openai saves its released files (a plain state
    dict) to folder/name, its arguments to folder/adm.yaml (--arch-config); return the network.
    """
    import torch

    from cmcore.networks import build_network

    torch.manual_seed(0)
    net = build_network(DIGITS_ADM)
    for p in net.parameters():  # the output layers start at zero: make every weight count
        torch.nn.init.normal_(p, std=0.05)
    torch.save(net.state_dict(), folder / name)
    (folder / "adm.yaml").write_text(yaml.safe_dump(DIGITS_ADM))
    return net


@pytest.fixture(scope="session")
def classifier(tmp_path_factory):
    """A digits classifier (150 iterations: about 97% held-out accuracy), trained once."""
    from cmcore.data import load_digits
    from cmcore.evaluation.classifier import save_classifier, train_classifier

    images, labels = load_digits()
    state, meta = train_classifier(images, labels, iters=150, batch=128, seed=0)
    path = tmp_path_factory.mktemp("classifier") / "classifier.pt"
    save_classifier(path, state, meta)
    return path
