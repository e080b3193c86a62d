"""The CLI: dry runs validate and write nothing; bad input is one line on stderr, exit 2."""

import gc
import sys

import numpy as np
import pytest
from conftest import cm, cm_process, run, tiny_config


def test_dry_runs_write_nothing(tiny, tmp_path):
    out = tmp_path / "out.npz"
    r = cm("prepare-data", "--config", tiny, "--out", out, "--dry-run")
    assert r.returncode == 0 and "[dry run]" in r.stdout and not out.exists()
    data = tmp_path / "data.npz"
    assert cm("prepare-data", "--config", tiny, "--out", data).returncode == 0
    with np.load(data) as f:
        assert f["arr_0"].shape == (1797, 8, 8, 1) and f["arr_0"].dtype == np.uint8
        assert f["arr_0"].max() == 255 and f["labels"].max() == 9
    for method in ("teacher", "ct", "untrained"):
        r = cm("train", "--method", method, "--config", tiny, "--data", data, "--out",
               tmp_path / "ckpt.pt", "--dry-run")
        assert r.returncode == 0, r.stderr
    r = cm("train-classifier", "--config", tiny, "--data", data, "--out", tmp_path / "c.pt",
           "--dry-run")
    assert r.returncode == 0, r.stderr
    r = cm("theorem1", "--config", tiny, "--out", tmp_path / "theorem1", "--dry-run")
    assert r.returncode == 0 and "['euler', 'heun']" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "data.npz"]


@pytest.mark.parametrize("change, words", [
    ({"cd": {"N": 0}}, "cd.N"),
    ({"ct": {"s0": 10, "s1": 5}}, "ct.s1"),
    ({"cd": {"distance": "l3"}}, "cd.distance"),
    ({"colour": "red"}, "colour: unknown key; remove or rename it"),
    ({"dataset": {"name": "cifar10", "path": "/no/such/cifar-10-python.tar.gz"},
      "evaluation": {"feature_extractor": "inception"}}, "/no/such/cifar-10-python.tar.gz"),
])
def test_bad_config_is_one_line(tmp_path, change, words):
    path = tiny_config(tmp_path, **change)
    r = cm("prepare-data", "--config", path, "--out", tmp_path / "d.npz")
    assert r.returncode == 2
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_missing_teacher_and_foreign_checkpoint(tiny, tmp_path):
    data = tmp_path / "data.npz"
    cm("prepare-data", "--config", tiny, "--out", data)
    r = cm("train", "--method", "cd", "--config", tiny, "--data", data, "--out",
           tmp_path / "cd.pt", "--teacher", tmp_path / "nope.pt")
    assert r.returncode == 2 and "nope.pt not found" in r.stderr
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(b"not a checkpoint")
    r = cm("sample", "--config", tiny, "--checkpoint", foreign, "--steps", "1", "--out",
           tmp_path / "s.npz")
    assert r.returncode == 2 and "not a readable cmcore checkpoint" in r.stderr
    assert "Traceback" not in r.stderr


def test_module_entry_point_reports_one_line(tmp_path):
    r = cm_process("prepare-data", "--config", tiny_config(tmp_path, cd={"N": 1}), "--out",
                   tmp_path / "d.npz")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "cm prepare-data: error: cd.N: 1 is less than the minimum of 2"


def test_only_a_process_of_its_own_freezes_torch_out_of_the_collector(tiny, tmp_path):
    # `cm` (python -m cmcore) imports torch and a step's heavy modules with the collector
    # paused, then freezes them; main() called by another program leaves its collector alone.
    code = ("import gc, sys\nfrom cmcore.cli import main\ncode = main()\n"
            "print('frozen', gc.get_freeze_count(), gc.isenabled(), "
            "'torch._dynamo' in sys.modules)\nsys.exit(code)\n")
    data = tmp_path / "d.npz"
    r = run([sys.executable, "-c", code, "prepare-data", "--config", tiny, "--out", data])
    assert r.returncode == 0, r.stderr
    count, enabled, dynamo = r.stdout.split("frozen ")[1].split()
    assert int(count) > 100_000 and enabled == "True" and dynamo == "False"
    train = ("train", "--method", "teacher", "--config", tiny, "--data", data, "--out",
             tmp_path / "teacher.pt", "--dry-run")
    r = run([sys.executable, "-c", code, *train])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("frozen ")[1].split()[1:] == ["True", "True"]  # train: FIT preloaded
    frozen = gc.get_freeze_count()
    assert cm(*train).returncode == 0
    assert gc.get_freeze_count() <= frozen and gc.isenabled()  # (frozen objects can die)


def test_cifar10_reader_and_paper_config(tmp_path, lpips_hub):
    """A tarball in the official format reads as uint8 NHWC; the paper config validates."""
    import io
    import pickle
    import tarfile

    import yaml

    from cmcore.config import ROOT, validate
    from cmcore.data import load_cifar10

    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for i in range(1, 6):
            # Row-major CHW planes: pixel (c, y, x) of image n holds n*10 + c.
            data = np.zeros((2, 3, 32, 32), np.uint8)
            for n in range(2):
                for c in range(3):
                    data[n, c] = i * 20 + n * 10 + c
            blob = pickle.dumps({b"data": data.reshape(2, -1), b"labels": [i, 9 - i]})
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{i}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    images, labels = load_cifar10(str(tar_path))
    assert images.shape == (10, 32, 32, 3) and labels.tolist()[:2] == [1, 8]
    assert images[1, 5, 7].tolist() == [30, 31, 32]  # batch 1, image 1: HWC order
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")
    cfg = yaml.safe_load((ROOT / "config/cifar10.yaml").read_text())
    cfg["dataset"]["path"], cfg["evaluation"]["inception_weights"] = str(tar_path), str(weights)
    cfg["evaluation"]["reference"] = str(weights)  # a stand-in: validation checks it is there
    resolved = validate(cfg)
    assert resolved["cd"]["distance"] == "lpips" and resolved["network"]["model_channels"] == 128


def test_pretrained_teacher_is_checked_and_adopted(tmp_path):
    # A teacher from elsewhere (cm convert writes the same format) replaces training when the
    # config names it; one with another network is refused in one line.
    import torch

    from cmcore.training.checkpoints import load_checkpoint

    tiny = tiny_config(tmp_path)
    data, source = tmp_path / "data.npz", tmp_path / "elsewhere" / "teacher.pt"
    assert cm("prepare-data", "--config", tiny, "--out", data).returncode == 0
    assert cm("train", "--method", "teacher", "--config", tiny, "--data", data,
              "--out", source).returncode == 0
    adopted = tmp_path / "runs" / "teacher" / "checkpoint.pt"
    config = tiny_config(tmp_path, teacher={"pretrained": str(source)})
    r = cm("train", "--method", "teacher", "--config", config, "--data", data, "--out", adopted)
    assert r.returncode == 0 and "pretrained teacher" in r.stdout, r.stderr
    ckpt, original = load_checkpoint(str(adopted)), load_checkpoint(str(source))
    assert ckpt["pretrained_from"] == str(source)
    assert all(torch.equal(v, original["ema"][k]) for k, v in ckpt["ema"].items())
    other = tiny_config(tmp_path, teacher={"pretrained": str(source)},
                        network={"arch": "ddpmpp", "model_channels": 8, "channel_mult": [1]})
    r = cm("train", "--method", "teacher", "--config", other, "--data", data, "--out", adopted)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "teacher.pretrained" in r.stderr and "model_channels': 8" in r.stderr
