"""cm export (cmcore.export): the safetensors file rebuilds the exported model bit for bit from
its own metadata, and the model card carries the measured scores with their protocol."""

import json

import pytest
import torch
import yaml
from conftest import cm
from test_ddp import CFG

from cmcore.export import export, load_exported
from cmcore.models import make_model, model_from_checkpoint


def checkpoint(kind, method):
    torch.manual_seed(0)
    net = {"arch": "mlp", "in_channels": 2, "hidden": 16, "depth": 2}
    diffusion = {"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}
    model = make_model(net, kind, diffusion)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)  # no zero layer: the outputs depend on every weight
    return {"method": method, "kind": kind, "net": net, "ema": model.state_dict(), "seed": 0,
            "config": {"diffusion": diffusion, "dataset": {"name": "mixture"}},
            "train_iters": 7, "code_version": "abc1234"}


METRICS = {"method": "cd", "steps": 1, "nfe": 1, "fid": 12.3456, "isc_mean": 2.5,
           "precision": 0.61, "recall": 0.52, "num_samples": 500, "seed": 0,
           "feature_extractor": "inception", "reference_set": "training set", "taus": [],
           "sampler": "consistency-onestep"}


@pytest.mark.parametrize("kind,method", [("consistency", "cd"), ("trigflow", "scd"),
                                         ("denoiser", "teacher")])
def test_the_export_rebuilds_the_model_bit_for_bit(tmp_path, kind, method):
    ckpt = checkpoint(kind, method)
    export(ckpt, [{**METRICS, "method": method}], tmp_path / "out")
    loaded, ref = load_exported(tmp_path / "out"), model_from_checkpoint(ckpt)
    x, t = torch.randn(6, 2), torch.tensor([0.01, 0.1, 0.5, 2.0, 10.0, 80.0])
    assert torch.equal(loaded(x, t), ref(x, t))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["method"], config["kind"], config["net"]) == (method, kind, ckpt["net"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| 1 | 1 | 12.35 | 2.5 | 0.61 | 0.52 | 500 | inception | training set |" in card
    assert "7 training iterations" in card and "abc1234" in card


def test_cli_export_and_its_errors(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    torch.save({**checkpoint("consistency", "cd"), "format": "cmcore-checkpoint/1"}, ckpt)
    metrics = tmp_path / "cd1.json"
    metrics.write_text(json.dumps(METRICS))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CFG))
    r = cm("export", "--config", config, "--checkpoint", ckpt, "--metrics", metrics,
           "--out", tmp_path / "export")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "README.md", "config.json", "model.safetensors"]
    metrics.write_text(json.dumps({**METRICS, "method": "ct"}))
    r = cm("export", "--config", config, "--checkpoint", ckpt, "--metrics", metrics,
           "--out", tmp_path / "other")
    assert r.returncode == 2 and r.stderr == (
        "cm export: error: metrics of 'ct' given for a cd checkpoint; pass the metrics files "
        "of this model\n")
    assert not (tmp_path / "other").exists()
    from safetensors.torch import save_file

    (tmp_path / "foreign").mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"is not a cmcore export \(no format cmcore-export/1\)"):
        load_exported(tmp_path / "foreign")
