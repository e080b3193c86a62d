"""Data parallel (cmcore.training.distributed): per-example draws do not depend on the world
size, so ``torchrun --nproc_per_node=2`` on CPU (gloo) trains what one process trains, up to
float noise; only rank 0 writes; a resume file of one process resumes under two; an indivisible
batch is a one-line error."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import ROOT, cm, run

from cmcore.config import load
from cmcore.data import load_dataset, save_prepared
from cmcore.diffusion.solvers import get_solver
from cmcore.methods import continuous, ect, ict, objectives
from cmcore.methods.distances import l2
from cmcore.models import make_model
from cmcore.training.checkpoints import Preempted, load_checkpoint
from cmcore.training.distributed import World
from cmcore.training.loop import train

CFG = {
    "dataset": {"name": "mixture", "num_points": 1000, "xflip": True},
    "device": "cpu",
    "threads": 1,
    "network": {"arch": "mlp", "hidden": 64, "depth": 2},
    "teacher": {"iters": 40, "batch": 32, "lr": 0.002, "warmup": 5, "grad_clip": 1.0,
                "log_every": 10, "ckpt_every": 20},
    "cd": {"iters": 2, "batch": 8, "lr": 0.001, "N": 6},
    "ct": {"iters": 40, "batch": 32, "lr": 0.001, "s0": 2, "s1": 20, "log_every": 10,
           "ckpt_every": 20},
    "pd": {"iters": 2, "batch": 8, "lr": 0.001, "start_steps": 2},
    "sampling": {"steps": [1]},
    "evaluation": {"feature_extractor": "inception", "inception_weights": __file__},
}
TOL = dict(rtol=1e-5, atol=1e-5)


def draws(world, B):
    """Per-example draws as the objectives make them, at this rank's B/P rows."""
    b = B // world.size
    x = torch.zeros(b, 3, 2)
    nhwc = torch.ones(b, 5, 4, 3).to(memory_format=torch.channels_last)  # filled as laid out
    with world.global_draws(B):
        return [torch.randn_like(x), torch.randn(b), torch.randint(0, 7, (b,)),
                torch.rand([b, 1]), torch.randn(b, 2), torch.randint(5, size=(b, 2)),
                F.dropout(torch.ones(b, 4, 3), p=0.3), torch.randn_like(nhwc),
                F.dropout(nhwc, p=0.2, training=True),
                torch.multinomial(torch.tensor([0.1, 0.2, 0.3, 0.4]), b, replacement=True),
                torch.randn(3)]  # last: not per example


@pytest.mark.parametrize("P", [2, 4])
def test_draws_are_slices_of_the_one_process_draws(P):
    B = 8
    torch.manual_seed(0)
    ref, ref_state = draws(World(), B), torch.get_rng_state()
    for r in range(P):
        torch.manual_seed(0)
        mine = draws(World(P, r), B)
        for i, (a, full) in enumerate(zip(mine, ref, strict=True)):
            want = full if i == len(ref) - 1 else full[r * B // P:(r + 1) * B // P]
            assert torch.equal(a, want), (r, i)
        assert torch.equal(torch.get_rng_state(), ref_state)  # the generators stay in step


@pytest.mark.parametrize("P", [2, 4])
def test_rank_mean_of_every_objective_is_the_global_loss(P):
    torch.manual_seed(0)
    net = {"arch": "mlp", "in_channels": 2, "hidden": 16, "depth": 2}
    diffusion = {"sigma_data": 0.5, "sigma_min": 0.002}
    D, D2 = (make_model(net, "denoiser", diffusion) for _ in range(2))
    f, f_target = (make_model(net, "consistency", diffusion) for _ in range(2))
    B, x = 16, torch.randn(16, 2)

    def losses(world):
        torch.manual_seed(1)
        x0 = world.local(x)
        with world.global_draws(B):
            return torch.stack([
                objectives.edm_loss(D, x0),
                objectives.consistency_training_loss(f, f_target, x0, 10, l2),
                objectives.consistency_distillation_loss(f, f_target, D, x0, 10,
                                                         get_solver("heun"), l2),
                objectives.progressive_distillation_loss(D2, D, x0, 4),
                ict.ict_loss(f, x0, 20),  # its noise index: torch.multinomial
                ect.ect_loss(f, x0, 3, 10),
                continuous.continuous_cd_loss(f, D, x0),
                continuous.continuous_ct_loss(f, x0)])
    ref = losses(World())
    mean = torch.stack([losses(World(P, r)) for r in range(P)]).mean(0)
    torch.testing.assert_close(mean, ref, rtol=1e-5, atol=1e-6)


def torchrun_command(*args):
    return [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
            "-m", "cmcore", "train", *map(str, args), "--threads", "1"]


def torchrun(*args):
    return run(torchrun_command(*args), timeout=120)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One process in this process: the teacher, CT, and CT stopped by SIGTERM at step 10.
    Two processes under torchrun: the teacher, and CT resumed from that resume file."""
    tmp = tmp_path_factory.mktemp("ddp")
    torch.set_num_threads(1)
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(CFG))
    cfg = load(config)
    data = tmp / "data.npz"
    save_prepared(str(data), *load_dataset(cfg["dataset"], seed=0))
    out = {(P, m): tmp / f"{m}{P}" / "checkpoint.pt" for P in (1, 2) for m in ("teacher", "ct")}
    for path in out.values():
        path.parent.mkdir()
    for method in ("teacher", "ct"):
        train(cfg, method, str(data), str(out[1, method]), echo=lambda s: None)

    def stop_at_10(line):
        if line.startswith("stage=ct step=10 "):
            os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(Preempted):
        train(cfg, "ct", str(data), str(out[2, "ct"]), echo=stop_at_10)
    runs = {m: torchrun("--method", m, "--config", config, "--data", data, "--out", out[2, m])
            for m in ("teacher", "ct")}
    return {"out": out, "runs": runs, "config": config, "data": data}


def max_abs_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("method", ["teacher", "ct"])
def test_two_processes_train_what_one_trains(setup, method):
    r = setup["runs"][method]
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (load_checkpoint(str(setup["out"][P, method])) for P in (1, 2))
    for weights in ("model", "ema") + (("target",) if method == "ct" else ()):
        diff = max_abs_diff(one[weights], two[weights])
        print(f"{method} {weights}: max abs diff {diff:.3g}")
        for key in one[weights]:
            torch.testing.assert_close(two[weights][key], one[weights][key], **TOL)
    assert one["step"] == two["step"] == 40
    # Only rank 0 wrote: the checkpoint and one log, its rows printed once; no resume file left.
    folder = setup["out"][2, method].parent
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint.pt", "loss.png", "train_log.csv"]
    rows = [line.split(",") for line in (folder / "train_log.csv").read_text().splitlines()]
    ref = [line.split(",") for line in
           (setup["out"][1, method].parent / "train_log.csv").read_text().splitlines()]
    assert [row[:2] for row in rows] == [row[:2] for row in ref] and len(rows) == 5
    for row, want in zip(rows[1:], ref[1:], strict=True):  # the logged loss: the global mean
        assert float(row[2]) == pytest.approx(float(want[2]), rel=1e-4)
    printed = [line for line in r.stdout.splitlines() if line.startswith("stage=")]
    resumed = method == "ct"
    assert len(printed) == (3 if resumed else 4), r.stdout
    assert r.stdout.count("resuming ct from") == resumed


def test_batch_not_divisible_by_the_world_size(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = dict(CFG, ct={**CFG["ct"], "batch": 33})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    r = cm("train", "--method", "ct", "--config", config, "--data", setup["data"], "--out",
           tmp_path / "checkpoint.pt")
    assert r.returncode == 2 and r.stderr == (
        "cm train: error: ct.batch 33 is not divisible by the world size 2 (torchrun "
        "--nproc_per_node x nodes); the batch is global\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_sigterm_to_torchrun_then_rerun_equals_one_process(setup, tmp_path):
    """torchrun passes SIGTERM to both ranks; they stop after the same step, rank 0 writes the
    resume file, and the rerun under torchrun ends where one uninterrupted process ends."""
    cfg = dict(CFG, ct={**CFG["ct"], "iters": 300, "ckpt_every": 20, "log_every": 100})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    ref, out = tmp_path / "ref" / "checkpoint.pt", tmp_path / "two" / "checkpoint.pt"
    ref.parent.mkdir(), out.parent.mkdir()
    train(load(config), "ct", str(setup["data"]), str(ref), echo=lambda s: None)
    command = torchrun_command("--method", "ct", "--config", config, "--data", setup["data"],
                               "--out", out)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    partial = Path(f"{out}.partial")
    deadline = time.time() + 60
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0 and partial.exists() and not out.exists(), stderr[-3000:]
    # Both ranks report the same step (their lines may interleave on the shared stderr).
    stops = re.findall(r"stopped by SIGTERM at ct step (\d+);", stderr)
    assert len(stops) == 2 and stops[0] == stops[1], stderr[-3000:]
    k = torch.load(partial, weights_only=True)["k"]
    assert stops[0] == str(k)
    r = run(command, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(f"resuming ct from {partial} at ct step {k}") == 1
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "checkpoint.pt", "loss.png", "train_log.csv"]
    one, two = load_checkpoint(str(ref)), load_checkpoint(str(out))
    for weights in ("model", "ema", "target"):
        print(f"ct after SIGTERM at {k}, {weights}: max abs diff "
              f"{max_abs_diff(one[weights], two[weights]):.3g}")
        for key in one[weights]:
            torch.testing.assert_close(two[weights][key], one[weights][key], **TOL)
