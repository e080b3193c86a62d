"""Preemption and faults: a run stopped by SIGTERM/SIGUSR1 or killed with SIGKILL resumes from
``<out>.partial`` and ends bitwise where an uninterrupted run ends; foreign or broken resume
files are one-line errors; a non-finite loss never overwrites the last good resume file."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import ROOT, cm

from cmcore.config import load
from cmcore.data import load_dataset
from cmcore.methods import objectives
from cmcore.prepared import save_prepared
from cmcore.training.checkpoints import CheckpointError, Preempted, load_checkpoint
from cmcore.training.loop import train

CFG = {
    "dataset": {"name": "mixture", "num_points": 1000},
    "device": "cpu",
    "threads": 1,
    "network": {"arch": "mlp", "hidden": 32, "depth": 2},
    "teacher": {"iters": 60, "batch": 32, "lr": 0.002, "log_every": 20},
    "cd": {"iters": 2, "batch": 8, "lr": 0.001, "N": 6},
    "ct": {"iters": 800, "batch": 32, "lr": 0.001, "s0": 2, "s1": 20, "log_every": 100,
           "ckpt_every": 50},
    "pd": {"iters": 250, "batch": 32, "lr": 0.001, "start_steps": 4, "log_every": 50,
           "ckpt_every": 20},
    "sampling": {"steps": [1]},
    "evaluation": {"feature_extractor": "inception", "inception_weights": __file__},
}
QUIET = dict(echo=lambda s: None)


def write_config(path, **changes):
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in CFG.items()}
    for section, values in changes.items():
        cfg[section].update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Config, data, a teacher and the uninterrupted CT and PD runs (in this process)."""
    tmp = tmp_path_factory.mktemp("resume")
    torch.set_num_threads(1)
    config = write_config(tmp / "config.yaml")
    cfg = load(config)
    data = tmp / "data.npz"
    save_prepared(str(data), *load_dataset(cfg["dataset"], seed=0))
    teacher = tmp / "teacher" / "checkpoint.pt"
    refs = {}
    for method in ("teacher", "ct", "pd"):
        out = tmp / method / "checkpoint.pt"
        out.parent.mkdir()
        train(cfg, method, str(data), str(out), teacher_path=str(teacher), **QUIET)
        refs[method] = out
    return {"tmp": tmp, "config": config, "cfg": cfg, "data": data, "teacher": teacher,
            "refs": refs}


WALL = ("seconds", "device_hours")  # the compute record's wall-clock: differs between any runs


def assert_same(a, b, where="checkpoint"):
    """Equal checkpoints: every tensor torch.equal, every other leaf == (wall-clock times
    aside)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            if not (where.endswith("['compute']") and key in WALL):
                assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def losses(log_path):
    rows = log_path.read_text().splitlines()
    return [row.rsplit(",", 1)[0] for row in rows]  # all columns but the wall-clock seconds


def train_command(setup, method, out):
    return [sys.executable, "-m", "cmcore", "train", "--method", method, "--config",
            str(setup["config"]), "--data", str(setup["data"]), "--teacher",
            str(setup["teacher"]), "--out", str(out), "--threads", "1"]


def wait_for(condition, proc, timeout=60):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_sigterm_then_rerun_equals_uninterrupted_ct(setup, tmp_path):
    out = tmp_path / "checkpoint.pt"
    partial = tmp_path / "checkpoint.pt.partial"
    command = train_command(setup, "ct", out)
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert wait_for(partial.exists, proc), proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM at ct step" in stderr and str(partial) in stderr
    assert "run the same command again to resume" in stderr and "Traceback" not in stderr
    assert partial.exists() and not out.exists()
    k = torch.load(partial, weights_only=True)["k"]
    assert 50 <= k < 800  # the step in which the signal arrived
    r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"resuming ct from {partial} at ct step {k}" in r.stdout
    assert out.exists() and not partial.exists()
    assert_same(load_checkpoint(str(out)), load_checkpoint(str(setup["refs"]["ct"])))
    ref_log = setup["refs"]["ct"].parent / "train_log.csv"
    assert losses(tmp_path / "train_log.csv") == losses(ref_log)


@pytest.mark.parametrize("stage, step, signum", [("pd2", 150, signal.SIGUSR1),
                                                  ("pd1", 50, signal.SIGINT)])
def test_signal_then_rerun_equals_uninterrupted_pd(setup, tmp_path, stage, step, signum):
    """SIGUSR1 (Slurm's warning) or SIGINT (Ctrl-C) in the middle of the first or of the
    second PD stage saves the resume file at the end of that step."""
    out = tmp_path / "checkpoint.pt"
    args = (setup["cfg"], "pd", str(setup["data"]), str(out), str(setup["teacher"]))
    before = signal.getsignal(signum)

    def echo(line):  # a real signal, sent while a log row of (stage, step) is printed
        if line.startswith(f"stage={stage} step={step} "):
            os.kill(os.getpid(), signum)
    with pytest.raises(Preempted) as e:
        train(*args, echo=echo)
    name = signal.Signals(signum).name
    assert e.value.code == 128 + signum and f"stopped by {name} at {stage}" in str(e.value)
    assert signal.getsignal(signum) is before  # handlers restored
    state = torch.load(f"{out}.partial", weights_only=True)
    assert (state["label"], state["k"]) == (stage, step) and not out.exists()
    assert sorted(state["stages"]) == ([] if stage == "pd2" else ["2"])
    train(*args, **QUIET)
    assert not os.path.exists(f"{out}.partial")
    assert_same(load_checkpoint(str(out)), load_checkpoint(str(setup["refs"]["pd"])))


def test_sigkill_at_random_moments_pd(setup, tmp_path):
    """kill -9 five times at random moments (fixed seed): after 1 to 4 more resume writes and
    0 to 30 ms (mid-step or mid-write); the run still ends where the uninterrupted one does."""
    out = tmp_path / "checkpoint.pt"
    partial = tmp_path / "checkpoint.pt.partial"
    command = train_command(setup, "pd", out)
    rng, killed_at = random.Random(0), []

    def version():
        try:
            st = partial.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns
    for _ in range(5):
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        writes, seen = rng.randint(1, 4), version()
        for _ in range(writes):
            if not wait_for(lambda seen=seen: version() not in (None, seen), proc):
                break
            seen = version()
        time.sleep(rng.uniform(0.0, 0.03))
        proc.kill()
        if proc.wait() != -signal.SIGKILL:
            break  # finished before the kill: the run below just completes
        assert not out.exists() and partial.exists()
        state = torch.load(partial, weights_only=True)
        killed_at.append(f"{state['label']} step {state['k']}")
    assert len(killed_at) == 5 and not out.exists(), killed_at
    r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"at {killed_at[-1]}" in r.stdout and not partial.exists()
    assert_same(load_checkpoint(str(out)), load_checkpoint(str(setup["refs"]["pd"])))


def test_broken_or_foreign_resume_file_is_one_line(setup, tmp_path):
    out = tmp_path / "checkpoint.pt"
    partial = tmp_path / "checkpoint.pt.partial"

    def cm_train(config):
        return cm("train", "--method", "ct", "--config", config, "--data", setup["data"],
                  "--out", out)
    partial.write_bytes(setup["refs"]["ct"].read_bytes()[:3000])
    r = cm_train(setup["config"])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"resume file {partial} is unreadable" in r.stderr and "delete it" in r.stderr
    partial.write_bytes(setup["refs"]["ct"].read_bytes())  # a checkpoint, not a resume file
    assert "has no format tag" in cm_train(setup["config"]).stderr
    partial.unlink()
    # A real resume file of the same method under another learning rate.
    other = load(write_config(tmp_path / "other.yaml", ct={"lr": 0.002}))
    echo = lambda s: os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
    with pytest.raises(Preempted):
        train(other, "ct", str(setup["data"]), str(out), echo=echo)
    r = cm_train(setup["config"])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"resume file {partial} was written by another run (different config ct)" \
        in r.stderr and "delete it to train from scratch" in r.stderr
    assert not out.exists() and partial.exists()
    other_data = tmp_path / "other.npz"
    save_prepared(str(other_data), *load_dataset(other["dataset"], seed=1))
    with pytest.raises(CheckpointError, match=r"another run \(different data\)"):
        train(other, "ct", str(other_data), str(out), **QUIET)
    with pytest.raises(CheckpointError, match="different method"):
        train(setup["cfg"], "teacher", str(setup["data"]), str(out), **QUIET)


def test_nan_keeps_the_last_good_resume_file(setup, tmp_path, monkeypatch):
    """Non-finite losses from step 25 on: the save at step 30 is refused, step 20 is kept."""
    cfg = load(write_config(tmp_path / "c.yaml", ct={"iters": 100, "ckpt_every": 10}))
    real, calls = objectives.consistency_training_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        # Call 1 is the FLOP count's pass (cmcore.training.compute), then step 1, 2, ...
        return loss * float("nan") if len(calls) >= 26 else loss
    monkeypatch.setattr(objectives, "consistency_training_loss", poisoned)
    out = tmp_path / "checkpoint.pt"
    with pytest.raises(FloatingPointError) as e:
        train(cfg, "ct", str(setup["data"]), str(out), ckpt_every=10, **QUIET)
    partial = f"{out}.partial"
    assert str(e.value) == (
        "ct loss is nan at step 30 (first non-finite at step 25); lower the lr first, then "
        "check the target's mu, the ema and diffusion.sigma_data; the last good resume "
        f"checkpoint (ct step 20) is at {partial}")
    state = torch.load(partial, weights_only=True)
    assert state["k"] == 20 and not out.exists()
    assert all(t.isfinite().all() for t in (*state["model"].values(), *state["target"].values()))
