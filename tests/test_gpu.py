"""The fast-step options on a CUDA device (marked gpu; skipped without one; scripts/gpu_check.sh):
bf16 + TF32 + fused optimizer train the teacher and CD like fp32 does; torch.compile's step
equals the eager one; between log rows no step synchronises the host with the device.

``CM_GPU_TEST_DEVICE=cpu pytest -m gpu tests/test_gpu.py`` runs the first two on the CPU (slow),
which is how their tolerances were set (CPU bf16 autocast rounds like CUDA's).
"""

import copy
import csv
import math
import os

import pytest
import torch
from conftest import TINY

from cmcore.config import validate
from cmcore.data import load_dataset
from cmcore.prepared import save_prepared
from cmcore.training import loop
from cmcore.training.checkpoints import load_checkpoint
from cmcore.training.loop import train

DEVICE = os.environ.get("CM_GPU_TEST_DEVICE", "cuda")
CUDA = DEVICE.startswith("cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(CUDA and not torch.cuda.is_available(), reason="needs CUDA")]
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA only")
FAST = {"precision": "bf16", "tf32": True, "fused": True}
PLAIN = {"precision": "fp32", "tf32": False, "fused": False}
QUIET = dict(echo=lambda s: None)
REAL_FIT = loop.fit


def config(**sections):
    """Digits, a small DDPM++ with attention; 300 teacher and 150 CD steps at batch 128."""
    cfg = copy.deepcopy(TINY)
    cfg["device"] = DEVICE
    cfg["network"].update(model_channels=32, attn_resolutions=[4])
    cfg["teacher"].update(iters=300, batch=128, lr=0.002, log_every=20)
    cfg["cd"].update(iters=150, batch=128, log_every=10)
    cfg["ct"].update(iters=12, log_every=4)
    cfg["pd"].update(iters=12, log_every=4)
    for name, values in sections.items():
        cfg[name].update(values)
    return validate(cfg)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Data and the fp32 teacher (also the teacher of every CD run)."""
    tmp = tmp_path_factory.mktemp("gpu")
    data = str(tmp / "data.npz")
    save_prepared(data, *load_dataset(config()["dataset"], seed=0))
    return {"data": data, "teacher": str(tmp / "teacher.pt"), "tmp": tmp}


def run(prepared, monkeypatch, method, name, **options):
    """Train ``method``: (logged losses, parameter update of its first fit as one vector)."""
    out = prepared["tmp"] / name / "checkpoint.pt"
    if method == "teacher" and name == "plain":
        out = prepared["teacher"]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    first = []

    def fit(model, *args, **kwargs):
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        result = REAL_FIT(model, *args, **kwargs)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        first.append((after - before).double().cpu())
        return result
    monkeypatch.setattr(loop, "fit", fit)
    train(config(**{method: options}), method, prepared["data"], str(out),
          teacher_path=prepared["teacher"], **QUIET)
    with open(os.path.join(os.path.dirname(out), "train_log.csv")) as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    load_checkpoint(str(out))  # readable, fp32 state dicts
    return losses, first[0]


@pytest.mark.parametrize("method", ["teacher", "cd"])
def test_bf16_tf32_fused_train_like_fp32(prepared, monkeypatch, method):
    if method == "teacher" or not os.path.exists(prepared["teacher"]):
        ref_losses, ref = run(prepared, monkeypatch, "teacher", "plain", **PLAIN)
    if method == "cd":
        ref_losses, ref = run(prepared, monkeypatch, "cd", "cd-plain", **PLAIN)
    losses, update = run(prepared, monkeypatch, method, f"{method}-fast", **FAST)
    assert all(map(math.isfinite, losses)), losses
    # The loss falls: the mean of the last three logged losses against the first three.
    for got in (losses, ref_losses):
        assert sum(got[-3:]) < 0.8 * sum(got[:3]), got
    assert sum(losses[-3:]) == pytest.approx(sum(ref_losses[-3:]), rel=0.25)
    # The parameters move as in fp32 (chaos over many steps allows some drift). CPU bf16:
    # teacher cosine 0.976, relative 0.22; CD 1.000, 0.007.
    cosine = torch.nn.functional.cosine_similarity(update, ref, dim=0).item()
    relative = ((update - ref).norm() / ref.norm()).item()
    print(f"{method}: update cosine {cosine:.4f}, relative difference {relative:.4f}")
    assert cosine > 0.9 and relative < 0.5


@needs_cuda
def test_compiled_step_equals_eager_step(prepared, monkeypatch):
    steps = {"iters": 5, "log_every": 1, **PLAIN}
    eager_losses, eager = run(prepared, monkeypatch, "teacher", "eager", **steps)
    losses, update = run(prepared, monkeypatch, "teacher", "compiled", compile=True, **steps)
    assert losses[0] == pytest.approx(eager_losses[0], rel=1e-4)  # same weights, same noise
    assert losses == pytest.approx(eager_losses, rel=1e-3)
    cosine = torch.nn.functional.cosine_similarity(update, eager, dim=0).item()
    assert cosine > 0.99 and (update - eager).norm() < 0.1 * eager.norm()


@needs_cuda
@pytest.mark.parametrize("method", ["teacher", "cd", "ct", "pd"])
def test_no_device_sync_between_log_rows(prepared, monkeypatch, method):
    # torch.cuda.set_sync_debug_mode("error") raises on any synchronising call (.item(), a
    # blocking copy, nonzero, ...) in every step but the first (lazy state) and the log rows.
    if not os.path.exists(prepared["teacher"]):
        run(prepared, monkeypatch, "teacher", "plain", **PLAIN)
    def fit(model, loss_fn, opt, *args, **kwargs):
        def strict(k, rng):
            log_row = (k + 1) % opt["log_every"] == 0 or k + 1 == opt["iters"]
            torch.cuda.set_sync_debug_mode(0 if k == 0 or log_row else "error")
            return loss_fn(k, rng)
        try:
            return REAL_FIT(model, strict, opt, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    monkeypatch.setattr(loop, "fit", fit)
    options = {**FAST, "grad_clip": 1.0, "warmup": 3}
    out = prepared["tmp"] / f"sync-{method}" / "checkpoint.pt"
    out.parent.mkdir()
    train(config(**{method: {**options, "iters": 12, "log_every": 4}}), method,
          prepared["data"], str(out), teacher_path=prepared["teacher"], **QUIET)
