"""cm export (cmcore.export): the safetensors file rebuilds the exported model bit for bit from
its own metadata, and the model card carries the measured scores with their protocol."""

import json

import pytest
import torch
import yaml
from conftest import cm
from test_ddp import CFG

from cmcore.diffusers_export import NotExportable, export_diffusers
from cmcore.export import export, load_exported
from cmcore.models import make_model, model_from_checkpoint
from cmcore.sampling.samplers import consistency_sample


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


# ----------------------------------------------------------------------------
# The diffusers folder, checked by diffusers' own pipeline (the `peers` extra).

ADM = dict(arch="adm", img_resolution=16, in_channels=3, model_channels=32, channel_mult=[1, 2],
           num_blocks=1, attn_resolutions=[8], num_head_channels=16, label_dim=10)
DIFFUSION = {"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}


def adm_checkpoint(**net):
    """A class-conditional ADM consistency model with every weight random (no zero layer)."""
    net = {**ADM, **net}
    model = make_model(net, "consistency", DIFFUSION)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return {"method": "cd", "kind": "consistency", "net": net, "ema": model.state_dict(),
            "seed": 0, "config": {"diffusion": DIFFUSION, "dataset": {"name": "digits"}},
            "train_iters": 7, "code_version": "abc1234"}


@pytest.mark.parametrize("updown", [True, False], ids=["resblock-updown-scale-shift",
                                                       "conv-updown-additive"])
@pytest.mark.parametrize("steps", [1, 2])
def test_diffusers_pipeline_samples_what_cm_sample_samples(tmp_path, updown, steps):
    """diffusers' ConsistencyModelPipeline on the exported folder and our sampler (the one
    `cm sample` runs), from the same initial noise, labels and re-noising draws."""
    from diffusers import ConsistencyModelPipeline

    from cmcore.sampling.samplers import sample_checkpoint  # what `cm sample` runs

    ckpt = adm_checkpoint(resblock_updown=updown, use_scale_shift_norm=updown)
    export(ckpt, [{**METRICS, "steps": 2, "taus": [3.3]}], tmp_path / "out")
    assert "`timesteps=[" in (tmp_path / "out" / "README.md").read_text()
    pipe = ConsistencyModelPipeline.from_pretrained(tmp_path / "out" / "diffusers")
    pipe.set_progress_bar_config(disable=True)
    timesteps = [22, 0][:steps] if steps == 2 else None  # openai's ImageNet 64 pair
    pipe.scheduler.set_timesteps(timesteps=timesteps) if timesteps else None
    taus = [float(pipe.scheduler.sigmas[1])] if steps == 2 else []

    ours, meta, labels = sample_checkpoint(ckpt, steps, 8, 8, seed=3, device="cpu", taus=taus)
    g = torch.Generator().manual_seed(3)  # cm sample's stream: balanced labels, z, then xi
    z = torch.randn(8, 3, 16, 16, generator=g)
    theirs = pipe(batch_size=8, class_labels=torch.tensor(labels), latents=z, generator=g,
                  timesteps=timesteps, output_type="pt").images
    theirs = theirs.permute(0, 2, 3, 1).numpy() * 255
    assert meta["nfe"] == steps and ours.std() > 10  # images, not a constant
    assert abs(ours.astype(float) - theirs).max() <= 0.5 + 1e-3  # equal up to uint8 rounding

    # In float: the pipeline's images equal Algorithm 1's on the exported weights.
    f = model_from_checkpoint(ckpt)
    y = torch.tensor(labels)
    x = consistency_sample(lambda x, t: f(x, torch.full((8,), float(t)), class_labels=y), z,
                           taus, generator=torch.Generator().manual_seed(5))
    theirs = pipe(batch_size=8, class_labels=y, latents=z, timesteps=timesteps,
                  generator=torch.Generator().manual_seed(5), output_type="pt").images
    assert torch.allclose((x / 2 + 0.5).clamp(0, 1), theirs, atol=1e-5, rtol=0)


def test_diffusers_export_only_for_adm_consistency_models(tmp_path):
    export(checkpoint("consistency", "cd"), [], tmp_path / "mlp")
    assert not (tmp_path / "mlp" / "diffusers").exists()
    assert "No diffusers export: network 'mlp'" in (tmp_path / "mlp" / "README.md").read_text()
    ckpt = adm_checkpoint(channel_mult=[2, 2])
    with pytest.raises(NotExportable, match="channel_mult\\[0\\] must be 1"):
        export_diffusers(ckpt, tmp_path / "wide")
