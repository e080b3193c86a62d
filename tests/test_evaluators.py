"""Evaluators side by side (cmcore.evaluation.evaluators, cmcore.evaluation.dinov2, cm evaluators):
torch-fidelity and clean-fid agree on the same features, clean-fid's own path is right on its
own, KID uses the same subsets in both, FD-DINOv2 is the Frechet distance of the loaded ViT's
CLS features, and every missing weights file fails in one line before any work."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import cm, tiny_config

from cmcore import dag
from cmcore.config import validate
from cmcore.data import load_digits
from cmcore.evaluation import dinov2
from cmcore.evaluation.evaluators import (
    CleanFID,
    SideBySide,
    check_cleanfid_weights,
    seeded_kernel_distance,
)
from cmcore.evaluation.metrics import MetricsError, compute_metrics

# Measured on this data (2 CPU cores, torch 2.14, clean-fid 0.1.35, torch-fidelity 0.4.0): the
# same classifier features in both, FIDs 1e-14 to 1e-13 apart (relative), KIDs about 1e-7.
FID_RTOL, KID_RTOL = 1e-9, 1e-5
TINY_VIT = "vit_test_patch14_dinov2"  # a DINOv2-shaped ViT small enough for a test


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny networks


@pytest.fixture(scope="module")
def data():
    """(reference, samples): 500 digits, and 300 other digits with noise (a generated set)."""
    x, _ = load_digits()
    rng = np.random.default_rng(0)
    noisy = x[500:800].astype(np.int16) + rng.integers(-40, 41, x[500:800].shape)
    return x[:500], np.clip(noisy, 0, 255).astype(np.uint8)


def frechet(f1, mu2, s2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), with scipy's sqrtm, in float64."""
    f1 = f1.astype(np.float64)
    mu1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_torch_fidelity_and_clean_fid_agree_on_the_classifier(classifier, data):
    reference, samples = data
    side = SideBySide(reference, extractor="classifier", weights_path=classifier)
    row = side(samples)
    assert row["fid_torch_fidelity"] > 1  # a real difference to measure, not two zeros
    assert row["fid_clean_fid"] == pytest.approx(row["fid_torch_fidelity"], rel=FID_RTOL)
    assert row["fid_rel_diff"] == pytest.approx(
        (row["fid_clean_fid"] - row["fid_torch_fidelity"]) / row["fid_torch_fidelity"])
    assert row["kid_clean_fid"] == pytest.approx(row["kid_torch_fidelity"], rel=KID_RTOL)
    # Adding KID changed nothing of evaluate's numbers.
    plain = compute_metrics(samples, reference, weights_path=classifier)
    assert (plain["fid"], plain["isc_mean"], plain["precision"]) == (
        row["fid_torch_fidelity"], row["isc"], row["precision"])


def test_clean_fid_of_a_set_against_itself_is_zero(classifier, data):
    reference, samples = data
    cleanfid = CleanFID(reference, "classifier", classifier)
    assert abs(cleanfid(reference)["fid"]) < 1e-6
    assert cleanfid(samples)["fid"] > 1


def test_kid_draws_the_same_subsets_as_torch_fidelity():
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

    rng = np.random.default_rng(1)
    g = rng.normal(0.3, 1.0, (50, 16)).astype(np.float32)  # m = 50: every subset differs
    r = rng.normal(0.0, 1.2, (70, 16)).astype(np.float32)
    theirs = kid_features_to_metric(torch.from_numpy(g), torch.from_numpy(r), kid_subsets=100,
                                    kid_subset_size=50, rng_seed=7, verbose=False)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    ours = seeded_kernel_distance(r, g, seed=7)
    assert np.array_equal(np.random.get_state()[1], before)  # the caller's RNG is untouched
    assert ours == pytest.approx(theirs[KEY_METRIC_KID_MEAN], rel=KID_RTOL)
    assert seeded_kernel_distance(r, g, seed=8) != pytest.approx(ours, rel=1e-3)  # subsets matter


class StandIn(torch.nn.Module):
    """A TorchScript stand-in for clean-fid's Inception file: the interface InceptionV3W calls
    (``layers``; forward(x, return_features)), 2048 features of a 1x1 convolution."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, 2048, 1),
                                          torch.nn.AdaptiveAvgPool2d(1))

    def forward(self, x, return_features: bool = False):
        return self.layers(x / 128 - 1).flatten(1)


def test_clean_fid_inception_path_reads_the_local_file_only(tmp_path, data, monkeypatch):
    import urllib.request

    def no_download(*args, **kwargs):
        raise AssertionError("clean-fid tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_download)
    net = StandIn().eval()
    path = tmp_path / "my-inception.pt"  # not clean-fid's file name: linked under it
    torch.jit.script(net).save(str(path))
    reference, samples = data[0][:200], data[1][:150]
    cleanfid = CleanFID(reference, "inception", None, cleanfid_inception=str(path))
    # Its features of the PNG-read images are the file's network on the pixels (as RGB); the
    # 2048-d Frechet distance itself is left out (scipy's sqrtm at 2048-d takes seconds).
    with torch.no_grad():
        direct = net(torch.from_numpy(samples).permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1))
    np.testing.assert_allclose(cleanfid.features(samples), direct.numpy(), rtol=1e-5, atol=1e-6)
    assert cleanfid.mu_r.shape == (2048,)


def register_tiny_vit():
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    if TINY_VIT not in timm.list_models(TINY_VIT):
        @register_model
        def vit_test_patch14_dinov2(pretrained=False, **kwargs):
            args = dict(patch_size=14, embed_dim=48, depth=2, num_heads=3, init_values=1e-5,
                        img_size=518)
            return _create_vision_transformer(TINY_VIT, pretrained=pretrained,
                                              **dict(args, **kwargs))


def test_fd_dinov2_is_the_frechet_distance_of_the_models_cls_features(tmp_path, data):
    import timm
    import torchvision.transforms as T
    from PIL import Image

    register_tiny_vit()
    torch.manual_seed(0)
    net = timm.create_model(TINY_VIT, num_classes=0, dynamic_img_size=True).eval()
    official = {**net.state_dict(), "mask_token": torch.zeros(1, 48)}  # facebookresearch keys
    path = tmp_path / "dinov2_test_pretrain.pth"
    torch.save(official, path)
    reference, samples = data[0][:40], data[1][:30]
    fd = dinov2.FDDINOv2(str(path), reference, arch=TINY_VIT)
    # dgm-eval's transform, then the CLS token of the final norm.
    transform = T.Compose([T.Resize((224, 224), T.InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with torch.no_grad():
        def phi(x):
            batch = torch.stack([transform(Image.fromarray(i[..., 0]).convert("RGB")) for i in x])
            return net.forward_features(batch)[:, 0].double().numpy()
        ref = phi(reference)
        direct = frechet(phi(samples), ref.mean(0), np.cov(ref, rowvar=False))
    assert fd(samples) == pytest.approx(direct, rel=1e-5)
    # A checkpoint of another shape is an error, never a randomly initialised network.
    torch.save({k: v[..., :1] for k, v in official.items()}, tmp_path / "bad.pth")
    with pytest.raises(MetricsError, match="does not fit") as e:
        dinov2.load_dinov2(str(tmp_path / "bad.pth"), TINY_VIT)
    assert "\n" not in str(e.value)


def test_missing_weights_files_fail_in_one_line(tmp_path):
    for call, key in ((lambda: dinov2.check_weights(str(tmp_path / "no.pth")), "dinov2_weights"),
                      (lambda: check_cleanfid_weights("inception", None), "cleanfid_inception")):
        with pytest.raises(MetricsError, match=f"evaluation.{key}") as e:
            call()
        assert "\n" not in str(e.value)
    dinov2.check_weights(None)  # null: not asked for
    check_cleanfid_weights("classifier", None)  # the classifier needs no Inception


def test_cli_fails_before_any_work_when_weights_are_missing(tmp_path):
    absent = tmp_path / "absent.npz"  # never read: the weights are checked first
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")
    cases = {
        "evaluation.dinov2_weights": {"dinov2_weights": str(tmp_path / "dinov2.pth")},
        "evaluation.cleanfid_inception": {"feature_extractor": "inception",
                                          "inception_weights": str(weights)},
    }
    for key, evaluation in cases.items():
        config = tiny_config(tmp_path, evaluation={**evaluation, "classifier": {"iters": 30}})
        r = cm("evaluators", "--config", config, "--samples", absent, "--reference", absent,
               "--out", tmp_path / "t.csv")
        assert r.returncode == 2 and key in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1, r.stderr


def test_cli_writes_the_table(tmp_path, classifier, data):
    reference, samples = data
    config = tiny_config(tmp_path)
    paths, metas = [], []  # the sidecars elsewhere: read from --meta, not derived
    (tmp_path / "meta").mkdir()
    for method, steps in (("cd", 1), ("teacher", 4)):
        path = tmp_path / f"{method}{steps}.npz"
        np.savez(path, arr_0=samples if method == "cd" else reference[:300])
        meta = tmp_path / "meta" / f"{method}{steps}.json"
        meta.write_text(json.dumps(
            {"method": method, "steps": steps, "nfe": steps, "seed": int(method == "teacher"),
             "code_version": "x"}))
        paths.append(path)
        metas.append(meta)
    data_path = tmp_path / "train.npz"
    assert cm("prepare-data", "--config", config, "--out", data_path).returncode == 0
    out = tmp_path / "evaluators.csv"
    args = ("evaluators", "--config", config, "--samples", *paths, "--reference", data_path,
            "--classifier", classifier, "--out", out)
    r = cm(*args, "--meta", metas[0])
    assert r.returncode != 0 and "--meta: 1 files for 2 samples files" in r.stderr
    assert not out.exists()
    r = cm(*args, "--meta", *metas)
    assert r.returncode == 0, r.stderr
    import pandas as pd

    table = pd.read_csv(out)
    assert list(table["method"]) == ["teacher", "cd"]  # Table 1's order
    assert (table["fid_rel_diff"].abs() < FID_RTOL).all()
    assert table["fd_dinov2"].isna().all() and "clean-fid 0.1.35" in table["versions"][0]
    md = out.with_suffix(".md").read_text()
    assert "| CD" in md and "not computed (evaluation.dinov2_weights is null)" in md
    assert "seed 1 (EDM teacher (Heun)); 0 (CD)." in md  # rows of two seeds say which is which
    assert out.with_suffix(".html").stat().st_size > 0


def test_only_the_evaluators_step_depends_on_the_new_keys():
    cfg = validate(yaml_tiny())
    view = dag.settings(cfg, "evaluators")["evaluation"]
    assert {"cleanfid_inception", "dinov2_weights", "dinov2_arch"} <= set(view)
    for step in ("evaluate", "search-tau", "train-classifier", "ablation-report"):
        assert not {"cleanfid_inception", "dinov2_weights", "dinov2_arch"} & set(
            dag.settings(cfg, step).get("evaluation", {})), step


def yaml_tiny():
    from conftest import TINY

    return {**TINY, "outdir": "unused"}
