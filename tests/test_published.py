"""Released consistency models: `cm convert --openai --method cd|ct` makes openai's f of a state
dict in the official layout, and the evaluate_published target samples and scores it beside the
paper's Table 2 (small random ADM weights on the digits stand in for the released files)."""

import json
import math

import torch
import yaml
from conftest import TINY, cm, snakemake

from cmcore.models import model_from_checkpoint
from cmcore.networks import build_network
from cmcore.training.checkpoints import load_checkpoint

# A small ADM for 8x8 grey digits, in the official key layout.
ADM = {"arch": "adm", "img_resolution": 8, "in_channels": 1, "out_channels": 1, "label_dim": 0,
       "model_channels": 32, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4],
       "num_head_channels": 16, "use_scale_shift_norm": True, "resblock_updown": True,
       "dropout": 0.0}


def _release(tmp_path, name):
    """A state dict saved as openai's files are (plain tensors), with random weights, and the
    ADM arguments as an --arch-config YAML file."""
    torch.manual_seed(0)
    net = build_network(ADM)
    for p in net.parameters():  # the output layers start at zero: make every weight count
        torch.nn.init.normal_(p, std=0.05)
    torch.save(net.state_dict(), tmp_path / name)
    (tmp_path / "adm.yaml").write_text(yaml.safe_dump(ADM))
    return net


def test_converted_cd_is_openais_consistency_function(tmp_path):
    net = _release(tmp_path, "cd_digits.pt")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "outdir": str(tmp_path / "r")}))
    out = tmp_path / "cd.pt"
    r = cm("convert", "--openai", tmp_path / "cd_digits.pt", "--method", "cd", "--arch-config",
           tmp_path / "adm.yaml", "--config", cfg, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "as a adm CD model" in r.stdout
    ckpt = load_checkpoint(out)
    assert (ckpt["method"], ckpt["kind"]) == ("cd", "consistency")
    f = model_from_checkpoint(ckpt)
    # openai's denoise(): scalings for the boundary condition, time input 1000 * ln(sigma) / 4.
    x, sd, eps = torch.randn(3, 1, 8, 8), 0.5, 0.002
    sigma = torch.tensor([0.002, 0.7, 80.0])
    s = sigma.view(-1, 1, 1, 1)
    c_skip = sd**2 / ((s - eps) ** 2 + sd**2)
    c_out = (s - eps) * sd / (s**2 + sd**2).sqrt()
    c_in = 1 / (s**2 + sd**2).sqrt()
    with torch.no_grad():
        expected = c_skip * x + c_out * net.eval()(c_in * x, torch.log(sigma + 1e-44) / 4)
        got = f(x, sigma)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(got[0], x[0])  # f(x, eps) = x exactly
    assert (got[1:] - x[1:]).abs().max() > 1e-2  # the network contributes elsewhere


def test_evaluate_published_scores_the_release_beside_the_paper(tmp_path):
    # Named like the released ImageNet 64 file: the table puts the paper's 6.20 beside it.
    _release(tmp_path, "cd_imagenet64_lpips.pt")
    cfg = {**TINY, "outdir": str(tmp_path / "r"),
           "published": {"cd_lpips": {"path": str(tmp_path / "cd_imagenet64_lpips.pt"),
                                      "method": "cd",
                                      "arch_config": str(tmp_path / "adm.yaml"),
                                      "taus": [0.5, 0.1]}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = snakemake("evaluate_published", "--cores", "2", "--configfile", path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "r"
    md = (out / "tables" / "table2_published.md").read_text()
    for steps, paper in ((1, "6.20"), (2, "4.70")):
        record = json.loads((out / "metrics" / "published_cd_lpips" / f"steps{steps}.json")
                            .read_text())
        assert record["source"] == "cd_imagenet64_lpips.pt" and math.isfinite(record["fid"])
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
                if line.startswith("| cd_imagenet64_lpips.pt")]
        row = next(r for r in rows if r[2] == str(steps))  # model, method, steps, taus, ...
        assert row[4:6] == [f"{record['fid']:.2f}", paper], (row, md)
    # The 2-step sample used the model's own tau (the paper's choice), not a search.
    meta = json.loads((out / "samples" / "published_cd_lpips" / "steps2.json").read_text())
    assert meta["taus"] == [0.5] and meta["tau_source"] == "published.cd_lpips.taus"
    assert not (out / "taus").exists()


def test_evaluate_published_without_models_says_where_to_list_them(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**TINY, "outdir": str(tmp_path / "r")}))
    r = snakemake("evaluate_published", "-n", "--configfile", path)
    assert r.returncode != 0
    assert "lists no released models under `published`" in r.stdout + r.stderr
