"""`cm bench`: JSON lines per timed step, FLOP counts against NVlabs/edm's. No timing asserts."""

import json
import math
import os

import pytest
import torch
from conftest import cm, tiny_config

from cmcore.experiments.bench import FIGURES, NETS, Bench, peak_tflops
from cmcore.networks import build_network
from cmcore.training.compute import count_flops

TIMED = {"teacher_step", "cd_step_l2", "ct_step", "pd_step", "sample_1step", "sample_2step",
         "sample_heun18", "fid_features"}


def _lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def forward_flops(net_cfg, device="meta", batch=1):
    """FLOPs of one forward of the backbone ``net_cfg`` per image (meta device: no compute)."""
    with torch.device(device):
        net = build_network(net_cfg).eval()
        x = torch.zeros(batch, net_cfg["in_channels"], *[net_cfg["img_resolution"]] * 2)
        sigma = torch.ones(batch)
    with torch.no_grad():
        return count_flops(lambda: net(x, sigma))[1] / batch


def test_bench_embedded_smoke(tmp_path):
    out = tmp_path / "bench.jsonl"
    r = cm("bench", "--config", tiny_config(tmp_path), "--out", out, "--net", "embedded",
           "--device", "cpu", "--batch", "4", "--repeats", "2", "--warmup", "1")
    assert r.returncode == 0, r.stderr
    records = _lines(out.read_text())
    assert records == _lines(r.stdout)  # the same lines on stdout and in --out
    by_name = {rec["name"]: rec for rec in records}
    assert set(by_name) == set(FIGURES) | {"compare_edm"}
    for name in TIMED:
        rec = by_name[name]
        assert math.isfinite(rec["img_per_s"]) and rec["img_per_s"] > 0, rec
        assert rec["batch"] == 4 and rec["repeats"] == 2 and rec["device"] == "cpu"
        assert rec["gflop_per_step"] > 0 and rec["peak_mem_kind"] == "process_rss"
        assert rec["frac_of_peak"] is None and rec["precision"] == "fp32"
    # Skipped, each with a reason: LPIPS without --lpips, the EDM comparison without a path.
    assert "--lpips" in by_name["cd_step_lpips"]["skipped"]
    assert "--reference-edm" in by_name["compare_edm"]["skipped"]
    assert "random weights" in by_name["fid_features"]["detail"]
    assert by_name["sample_heun18"]["nfe_per_image"] == 35
    # FLOPs scale with network evaluations: Heun-18 is 35 forwards, a 2-step sample 2.
    one = by_name["sample_1step"]["gflop_per_step"]
    assert by_name["sample_heun18"]["gflop_per_step"] == pytest.approx(35 * one, rel=1e-3)
    assert by_name["sample_2step"]["gflop_per_step"] == pytest.approx(2 * one, rel=1e-3)


def test_bench_dry_run_and_bad_figure(tmp_path):
    cfg, out = tiny_config(tmp_path), tmp_path / "b.jsonl"
    r = cm("bench", "--config", cfg, "--out", out, "--dry-run", "--net", "cifar10")
    assert r.returncode == 0 and "batch 512" in r.stdout and not out.exists()
    r = cm("bench", "--config", cfg, "--out", out, "--only", "teacher_step,warp_drive")
    assert r.returncode == 2 and "warp_drive" in r.stderr


def test_cifar10_forward_flops_match_reference():
    # NVlabs/edm's DDPM++ CIFAR-10 config: 42.4 GFLOP per forward image, counting 2 FLOPs per
    # multiply-add (the counter's convention).
    per_image = forward_flops(NETS["cifar10"]["net"], device="meta")
    assert per_image == pytest.approx(42.4e9, rel=0.02)


def test_training_step_counts_backward_flops(tmp_path):
    # fwd + bwd of the whole step is 3x one forward (backward: grads of inputs and of weights),
    # attention included; the Adam update itself counts nothing.
    from cmcore import config

    b = Bench(config.load(tiny_config(tmp_path)), "embedded", batch=2, device="cpu")
    fwd = forward_flops(b.net_cfg, device="cpu", batch=2) * 2
    step = count_flops(b.training("teacher").fn)[1]
    assert step == pytest.approx(3 * fwd, rel=0.01)


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.0)
    assert peak_tflops("NVIDIA H200", "tf32") == pytest.approx(494.7)
    assert peak_tflops("cpu", "fp32") is None


@pytest.mark.skipif(not os.environ.get("CM_EDM_CHECKOUT"),
                    reason="set CM_EDM_CHECKOUT to an NVlabs/edm checkout")
def test_bench_against_edm(tmp_path):
    out = tmp_path / "bench.jsonl"
    r = cm("bench", "--config", tiny_config(tmp_path), "--out", out, "--device", "cpu",
           "--batch", "4", "--repeats", "2", "--only", "teacher_step",
           "--reference-edm", os.environ["CM_EDM_CHECKOUT"])
    assert r.returncode == 0, r.stderr
    by_name = {rec["name"]: rec for rec in _lines(out.read_text())}
    for what in ("teacher_step", "forward"):
        assert by_name[f"ratio_{what}"]["ratio_ours_over_edm_img_per_s"] > 0
        ours, theirs = by_name[f"ours_{what}"], by_name[f"edm_{what}"]
        # Same architecture: the FLOP counts agree (EDM's FIR resampling adds a little).
        assert ours["gflop_per_step"] == pytest.approx(theirs["gflop_per_step"], rel=0.01)


def test_bench_leaves_the_global_generator_alone(tmp_path):
    from cmcore import config
    from cmcore.experiments.bench import run_bench

    torch.manual_seed(123)
    before = torch.get_rng_state()
    records = run_bench(config.load(tiny_config(tmp_path)), batch=2, device="cpu", repeats=1,
                        warmup=0, only=["ct_step", "sample_2step"], echo=lambda line: None)
    assert torch.equal(torch.get_rng_state(), before)
    assert [r["name"] for r in records] == ["ct_step", "sample_2step", "compare_edm"]
