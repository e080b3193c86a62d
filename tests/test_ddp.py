"""Data parallel (cmcore.training.distributed): per-example draws (cmcore.diffusion.rng.Draws)
do not depend on the world size, so ``torchrun --nproc_per_node=2`` on CPU (gloo) trains what
one process trains, up to float noise; only rank 0 writes; a resume file of one process resumes
under two; an indivisible batch is a one-line error."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, cm, run

from cmcore import cli
from cmcore.config import ConfigError, load
from cmcore.data import load_dataset
from cmcore.diffusion.rng import Draws, step_seed
from cmcore.diffusion.solvers import get_solver
from cmcore.methods import continuous, ect, ict, objectives
from cmcore.methods.distances import l2
from cmcore.models import make_model
from cmcore.prepared import save_prepared
from cmcore.training.checkpoints import Preempted, load_checkpoint
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


def draws(rng, b):
    """Per-example draws as the objectives make them, for b rows."""
    x = torch.zeros(b, 3, 2)
    nhwc = torch.ones(b, 5, 4, 3).to(memory_format=torch.channels_last)
    return [rng.randn_like(x), rng.randn(b), rng.randint(7, b), rng.rand(b, "cpu", torch.float64),
            rng.randn_like(nhwc), rng.multinomial(torch.tensor([0.1, 0.2, 0.3, 0.4]), b)]


@pytest.mark.parametrize("pieces", [2, 4, 8])
def test_draws_are_rows_of_the_global_draws(pieces):
    """Any rank or micro-batch (rows [a, a + B/pieces)) gets its rows of the one-pass draws."""
    B, seed = 8, step_seed(0, "ct", 3)
    ref = draws(Draws(seed, B), B)
    b = B // pieces
    for r in range(pieces):
        mine = draws(Draws(seed, B, slice(r * b, (r + 1) * b)), b)
        for i, (a, full) in enumerate(zip(mine, ref, strict=True)):
            assert torch.equal(a, full[r * b:(r + 1) * b]), (r, i)
    assert draws(Draws(seed, B), B)[4].is_contiguous(memory_format=torch.channels_last)
    other = draws(Draws(step_seed(0, "ct", 4), B), B)  # the next step: other numbers
    assert not torch.equal(other[0], ref[0])
    with pytest.raises(ValueError, match="a per-example draw of 3 rows where this process has 4"):
        Draws(seed, B, slice(0, 4)).randn(3)


@pytest.mark.parametrize("P", [2, 4])
def test_rank_mean_of_every_objective_is_the_global_loss(P):
    torch.manual_seed(0)
    net = {"arch": "mlp", "in_channels": 2, "hidden": 16, "depth": 2}
    diffusion = {"sigma_data": 0.5, "sigma_min": 0.002}
    D, D2 = (make_model(net, "denoiser", diffusion) for _ in range(2))
    f, f_target = (make_model(net, "consistency", diffusion) for _ in range(2))
    B, x, seed = 16, torch.randn(16, 2), step_seed(1, "all", 0)

    def losses(rows):
        x0, rng = x[rows], Draws(seed, B, rows)
        return torch.stack([
            objectives.edm_loss(D, x0, rng=rng),
            objectives.consistency_training_loss(f, f_target, x0, 10, l2, rng=rng),
            objectives.consistency_distillation_loss(f, f_target, D, x0, 10,
                                                     get_solver("heun"), l2, rng=rng),
            objectives.progressive_distillation_loss(D2, D, x0, 4, rng=rng),
            ict.ict_loss(f, x0, 20, rng=rng),
            ect.ect_loss(f, x0, 3, 10, rng=rng),
            continuous.continuous_cd_loss(f, D, x0, rng=rng),
            continuous.continuous_ct_loss(f, x0, rng=rng)])
    ref = losses(slice(0, B))
    b = B // P
    mean = torch.stack([losses(slice(r * b, (r + 1) * b)) for r in range(P)]).mean(0)
    torch.testing.assert_close(mean, ref, rtol=1e-5, atol=1e-6)


def torchrun_command(*args):
    return [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
            "-m", "cmcore", "train", *map(str, args), "--threads", "1"]


def torchrun(*args):
    return run(torchrun_command(*args), timeout=120)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One process in this process: the teacher, CT, and CT stopped by SIGTERM at step 10.
    Two processes under torchrun, each in two micro-batches of 8 (batch_gpu): the teacher, and
    CT resumed from that resume file (a micro-batch size of its own: not part of the run)."""
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
    split = tmp / "split.yaml"
    split.write_text(yaml.safe_dump({**CFG, **{m: {**CFG[m], "batch_gpu": 8}
                                                for m in ("teacher", "ct")}}))
    runs = {m: torchrun("--method", m, "--config", split, "--data", data, "--out", out[2, m])
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
    # Compute: the same steps, images and FLOPs of the global batch, on two devices.
    c1, c2 = one["compute"], two["compute"]
    assert (c2["steps"], c2["images"], c2["devices"]) == (c1["steps"], c1["images"], 2)
    assert c2["tflop"] == c1["tflop"] > 0
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_meeting_at_the_rendezvous_train_what_one_process_trains(setup, tmp_path):
    """resources.train.nodes = 2: the torchrun that cm train's srun starts on each node
    (cmcore.cli.slurm_command), here two "nodes" of one process on this host meeting at the
    same c10d rendezvous, train what one process trains."""
    out = tmp_path / "checkpoint.pt"
    argv = ["train", "--method", "teacher", "--config", str(setup["config"]), "--data",
            str(setup["data"]), "--out", str(out), "--threads", "1"]
    command = cli.torchrun_command(argv, 2, 2, f"127.0.0.1:{free_port()}", "test-two-nodes")
    assert command[3:8] == ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                            command[6], "--rdzv_id=test-two-nodes"]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    nodes = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [node.communicate(timeout=180) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-2000:] for _, err in results]
    one, two = (load_checkpoint(str(p)) for p in (setup["out"][1, "teacher"], out))
    for weights in ("model", "ema"):
        for key in one[weights]:
            torch.testing.assert_close(two[weights][key], one[weights][key], **TOL)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.pt", "loss.png", "train_log.csv"]


def test_the_slurm_launch_of_several_nodes(monkeypatch):
    argv = ["train", "--method", "cd", "--gpus", "16"]
    command = cli.slurm_command(argv, 16, 2, {"SLURM_JOB_ID": "4321"})
    host = socket.gethostname()
    assert command == [
        "srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        "--gpus-per-task=8", sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
        "--nproc_per_node=8", "--rdzv_backend=c10d", f"--rdzv_endpoint={host}:33821",
        "--rdzv_id=cm-4321", "-m", "cmcore", *argv]
    with pytest.raises(ValueError, match=r"^resources.train.nodes is 2: training on several "
                       r"nodes runs inside a Slurm job of 2 nodes \(snakemake --profile slurm, "
                       r"or salloc --nodes=2\); SLURM_JOB_ID is not set here$"):
        cli.slurm_command(argv, 16, 2, {})
    with pytest.raises(ValueError, match=r"^--gpus 3 does not split over 2 nodes"):
        cli.slurm_command(argv, 3, 2, {"SLURM_JOB_ID": "1"})


def test_node_settings_that_cannot_run_are_one_line(setup, tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(dict(CFG, resources={"train": {"gpu": 2, "nodes": 2}})))
    r = cm("train", "--method", "teacher", "--config", config, "--data", setup["data"],
           "--out", tmp_path / "checkpoint.pt", "--gpus", "2")
    assert r.returncode == 2 and r.stderr.startswith(
        "cm train: error: resources.train.nodes is 2: training on several nodes runs inside a "
        "Slurm job of 2 nodes") and r.stderr.count("\n") == 1, r.stderr
    for resources, message in [
            ({"sample": {"nodes": 2}}, "resources.sample.nodes: only training jobs run on "
                                       "several nodes; set it to 1"),
            ({"train": {"gpu": 3, "nodes": 2}}, "resources.train.nodes = 2 needs "
             "resources.train.gpu (the job's GPUs, all nodes together) to be a multiple of 2, "
             "not 3")]:
        config.write_text(yaml.safe_dump(dict(CFG, resources=resources)))
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            load(config)


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


def test_sct_under_torchrun_trains_what_one_process_trains(tmp_path):
    """sCM under DistributedDataParallel: the JVP of the target through the wrapped model, the
    adaptive weighting w_phi trained and synchronised beside theta, in micro-batches."""
    torch.set_num_threads(1)
    sct = {"iters": 20, "batch": 32, "lr": 0.001, "tangent_warmup": 5, "log_every": 10,
           "ckpt_every": 20}
    config, split = tmp_path / "config.yaml", tmp_path / "split.yaml"
    config.write_text(yaml.safe_dump({**CFG, "sct": sct}))
    split.write_text(yaml.safe_dump({**CFG, "sct": {**sct, "batch_gpu": 8}}))
    cfg = load(config)
    data = tmp_path / "data.npz"
    save_prepared(str(data), *load_dataset(cfg["dataset"], seed=0))
    one, two = tmp_path / "one" / "checkpoint.pt", tmp_path / "two" / "checkpoint.pt"
    train(cfg, "sct", str(data), str(one), echo=lambda s: None)
    r = torchrun("--method", "sct", "--config", split, "--data", data, "--out", two)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_checkpoint(str(one)), load_checkpoint(str(two))
    assert a["model"]["weight.weight"].abs().sum() > 0  # w_phi trained, and is compared
    for weights in ("model", "ema"):
        print(f"sct {weights}: max abs diff {max_abs_diff(a[weights], b[weights]):.3g}")
        for key in a[weights]:
            torch.testing.assert_close(b[weights][key], a[weights][key], **TOL)
