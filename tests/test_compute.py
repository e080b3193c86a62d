"""Compute on every row (cmcore.training.compute): a run records its steps, images, wall time
and the FLOPs counted over one step; the record reaches Table 1 and the FID-against-compute
plot. Two data-parallel ranks record what one process records: tests/test_ddp.py."""

import copy
import json

import pandas as pd
import torch
from test_ddp import CFG

from cmcore.config import validate
from cmcore.data import load_dataset
from cmcore.evaluation.reports import gather, markdown, write_table
from cmcore.prepared import save_prepared
from cmcore.training import step
from cmcore.training.compute import count_flops
from cmcore.training.loop import train


def test_a_run_records_its_compute(tmp_path, monkeypatch):
    cfg = validate(copy.deepcopy(CFG))
    data = str(tmp_path / "data.npz")
    save_prepared(data, *load_dataset(cfg["dataset"], seed=0))
    steps = []  # every training step, FLOPs counted independently

    real = step.TrainStep.__call__

    def counted(self, k):
        out, flops = count_flops(lambda: real(self, k))
        steps.append(flops)
        return out
    monkeypatch.setattr(step.TrainStep, "__call__", counted)
    torch.set_num_threads(1)
    payload = train(cfg, "pd", data, str(tmp_path / "pd.pt"), echo=lambda s: None,
                    teacher_path=str(_teacher(cfg, data, tmp_path)))
    c = payload["compute"]
    iters, batch, stages = cfg["pd"]["iters"], cfg["pd"]["batch"], len(payload["stages"])
    assert (c["steps"], c["images"], c["devices"], c["device"]) == (
        iters * stages, iters * batch * stages, 1, "cpu")
    assert c["tflop"] * 1e12 == sum(steps[-iters * stages:]) > 0  # every step counts alike
    assert 0 < c["seconds"] and c["device_hours"] == round(c["seconds"] / 3600, 6)


def _teacher(cfg, data, tmp_path):
    path = tmp_path / "teacher.pt"
    train(cfg, "teacher", data, str(path), echo=lambda s: None)
    return path


def test_table_shows_compute_and_plots_it(tmp_path):
    base = {"steps": 1, "nfe": 1, "fid": 10.0, "isc_mean": 2.0, "precision": 0.5,
            "recall": 0.5, "num_samples": 100, "seed": 0, "dataset": "digits",
            "reference_set": "training set", "feature_extractor": "classifier",
            "code_version": "abc", "taus": []}
    rows = {"cd": {"images": 192000, "seconds": 300.0, "devices": 1, "device": "cpu",
                   "device_hours": 0.0833, "tflop": 12.5, "steps": 1500},
            "ct": None}
    paths = []
    for method, compute in rows.items():
        path = tmp_path / f"{method}.json"
        path.write_text(json.dumps({**base, "method": method, "compute": compute}))
        paths.append(str(path))
    df = gather(paths)
    assert df.set_index("method").loc["cd", "train_tflop"] == 12.5
    assert pd.isna(df.set_index("method").loc["ct", "images"])
    text = markdown(df)
    assert "| 192,000 " in text and "| 0.0833 " in text and "| 12.5 " in text
    assert "on 1 x cpu" in text
    assert "code version abc." in text
    # Rows from runs of two code versions: the note says which row came from which.
    mixed = markdown(df.assign(code_version=["abc", "def"]))
    assert "code version abc (CD); def (CT)." in mixed
    # So does every provenance note: rows scored with other sample counts or extractors.
    mixed = markdown(df.assign(num_samples=[100, 500], feature_extractor=["classifier", "x"]))
    assert "; 100 (CD); 500 (CT) samples per row" in mixed
    assert "Feature extractor: classifier (CD); x (CT)." in mixed
    png = tmp_path / "compute.png"
    write_table(paths, str(tmp_path / "t.csv"), str(tmp_path / "t.md"), str(tmp_path / "t.html"),
                compute_png=str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
