"""Released consistency models: `cm convert --openai --method cd|ct` makes openai's f of a state
dict in the official layout, and the evaluate_published target samples and scores it beside the
paper's Table 2 (small random ADM weights on the digits stand in for the released files; the
scoring runs in tests/test_tiny_run.py, on the tiny run's results)."""

import torch
import yaml
from conftest import TINY, cm, openai_release, snakemake

from cmcore.models import model_from_checkpoint
from cmcore.training.checkpoints import load_checkpoint


def test_converted_cd_is_openais_consistency_function(tmp_path):
    net = openai_release(tmp_path, "cd_digits.pt")
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


def test_evaluate_published_without_models_says_where_to_list_them(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**TINY, "outdir": str(tmp_path / "r")}))
    r = snakemake("evaluate_published", "-n", "--configfile", path)
    assert r.returncode != 0
    assert "lists no released models under `published`" in r.stdout + r.stderr
