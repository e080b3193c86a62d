"""Tests of cmcore.evaluation.classifier and cmcore.evaluation.metrics (torch-fidelity with the
digits classifier)."""

import numpy as np
import pytest
import scipy.linalg
import torch

from cmcore.data import load_digits
from cmcore.evaluation.classifier import (
    load_classifier,
    save_classifier,
    to_model_input,
    train_classifier,
)
from cmcore.evaluation.metrics import (
    CLASSIFIER_EXTRACTOR,
    ImagesU8Dataset,
    MetricsError,
    compute_metrics,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny networks


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def classifier(digits, tmp_path_factory):
    """(checkpoint path, training metrics): one short training run shared by the module."""
    x, y = digits
    state_dict, metrics = train_classifier(x, y, iters=300, batch=128, seed=0, holdout_fraction=0.2)
    path = tmp_path_factory.mktemp("clf") / "classifier.pt"
    save_classifier(path, state_dict, metrics)
    return str(path), metrics


def frechet_distance(f1, f2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) in float64, with scipy's sqrtm."""
    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def shuffled_pixels(x, seed=0):
    """Each image's pixels permuted independently: same histogram, no digit structure."""
    rng = np.random.default_rng(seed)
    flat = x.reshape(len(x), -1).copy()
    for row in flat:
        rng.shuffle(row)
    return flat.reshape(x.shape)


def halves(x, seed=0):
    perm = np.random.default_rng(seed).permutation(len(x))
    return x[perm[: len(x) // 2]], x[perm[len(x) // 2:]]


# ----------------------------------------------------------------------------
# Classifier.

def test_classifier_holdout_accuracy(classifier):
    _, metrics = classifier
    assert metrics["num_holdout"] == 360 and metrics["num_train"] == 1437
    assert metrics["holdout_accuracy"] >= 0.95, metrics


def test_classifier_split_is_stratified_and_seeded(digits):
    x, y = digits
    _, m1 = train_classifier(x[:400], y[:400], iters=2, seed=3)
    _, m2 = train_classifier(x[:400], y[:400], iters=2, seed=3)
    assert m1["holdout_accuracy"] == m2["holdout_accuracy"] and m1["num_holdout"] == 80


def test_classifier_training_leaves_the_global_generator_alone(digits):
    x, y = digits
    torch.manual_seed(11)
    before = torch.get_rng_state()
    s1, _ = train_classifier(x[:400], y[:400], iters=3, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    s2, _ = train_classifier(x[:400], y[:400], iters=3, seed=3)  # from its seed alone
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_checkpoint_roundtrip_and_rejects_other_files(classifier, digits, tmp_path):
    path, metrics = classifier
    net, meta = load_classifier(path)
    assert meta["holdout_accuracy"] == metrics["holdout_accuracy"]
    x = torch.from_numpy(digits[0][:5]).permute(0, 3, 1, 2)
    assert net(to_model_input(x)).shape == (5, 10)
    assert not net.training

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a cmcore classifier checkpoint"):
        load_classifier(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}, "step": 3}, other)
    with pytest.raises(ValueError, match="not a cmcore classifier checkpoint"):
        load_classifier(other)
    with pytest.raises(ValueError, match="JSON"):
        save_classifier(tmp_path / "bad.pt", {}, {"acc": np.float32(1.0)})
    assert not (tmp_path / "bad.pt").exists()


# ----------------------------------------------------------------------------
# Metrics.

def registered_features(images_u8_nhwc, weights_path):
    """The classifier's features as torch-fidelity's registered extractor computes them."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    fe = FEATURE_EXTRACTORS_REGISTRY[CLASSIFIER_EXTRACTOR](
        CLASSIFIER_EXTRACTOR, ["features"], feature_extractor_weights_path=str(weights_path))
    with torch.no_grad():
        return fe.eval()(ImagesU8Dataset(images_u8_nhwc).images)[0].numpy()

def test_fid_equals_independent_frechet_distance(classifier, digits):
    path, _ = classifier
    a, b = halves(digits[0])
    noise = shuffled_pixels(a)
    for samples, reference in ((a, b), (noise, b)):
        m = compute_metrics(samples, reference, extractor="classifier", weights_path=path)
        # Features by the classifier directly, outside torch-fidelity's loader.
        net, _ = load_classifier(path)
        with torch.no_grad():
            f1, f2 = (net.features_and_logits(to_model_input(
                torch.from_numpy(x).permute(0, 3, 1, 2)))[0].numpy() for x in (samples, reference))
        assert f1.shape[1] == 128
        np.testing.assert_allclose(
            registered_features(samples, path), f1, rtol=1e-5, atol=1e-6)
        expected = frechet_distance(f1, f2)
        assert m["fid"] == pytest.approx(expected, rel=1e-3), (m["fid"], expected)


def test_set_against_itself(classifier, digits):
    path, _ = classifier
    x = digits[0]
    m = compute_metrics(x, x, extractor="classifier", weights_path=path)
    assert abs(m["fid"]) < 1e-3
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["num_samples"] == m["num_reference"] == len(x)
    assert "cm-classifier" in m["feature_extractor"] and path in m["feature_extractor"]


def test_noise_far_from_real_and_inception_score(classifier, digits):
    path, _ = classifier
    a, b = halves(digits[0])
    real = compute_metrics(a, b, extractor="classifier", weights_path=path)
    noise = compute_metrics(shuffled_pixels(a), b, extractor="classifier", weights_path=path)
    assert noise["fid"] > 20 * max(real["fid"], 1e-6), (noise["fid"], real["fid"])
    assert real["precision"] > 0.8 and real["recall"] > 0.8
    assert noise["precision"] < real["precision"]
    # IS of real digits approaches the number of classes for a confident, accurate classifier.
    assert 5.0 < real["isc_mean"] <= 10.0 + 1e-6, real["isc_mean"]
    assert noise["isc_mean"] < real["isc_mean"]


def test_missing_weights_error_names_file_and_key(digits, tmp_path):
    x = digits[0][:50]
    missing = str(tmp_path / "nowhere" / "clf.pt")
    with pytest.raises(MetricsError) as e:
        compute_metrics(x, x, extractor="classifier", weights_path=missing)
    assert missing in str(e.value) and "evaluation.classifier" in str(e.value)
    assert "\n" not in str(e.value)
    missing = str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(MetricsError) as e:
        compute_metrics(x, x, extractor="inception", weights_path=missing)
    msg = str(e.value)
    assert missing in msg and "evaluation.inception_weights" in msg and "6726825d" in msg
    assert "\n" not in msg


def test_mismatched_sets_rejected_before_work(classifier, digits):
    path, _ = classifier
    x = digits[0][:50]
    with pytest.raises(MetricsError, match="differ"):
        compute_metrics(np.repeat(x, 3, axis=-1), x, weights_path=path)
    with pytest.raises(MetricsError, match="differ"):
        compute_metrics(x[:, :4, :4], x, weights_path=path)
    with pytest.raises(MetricsError, match="uint8"):
        compute_metrics(x.astype(np.float32), x, weights_path=path)
    # Right shapes for each other, wrong resolution for the classifier.
    big = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 1), dtype=np.uint8)
    with pytest.raises(MetricsError, match="8x8"):
        compute_metrics(big, big, weights_path=path)


def test_dataset_yields_uint8_chw_and_repeats_gray_for_inception(digits):
    x = digits[0][:3]
    gray, rgb = ImagesU8Dataset(x), ImagesU8Dataset(x, channels=3)
    assert gray[1].dtype == torch.uint8 and gray[1].shape == (1, 8, 8)
    assert rgb[1].shape == (3, 8, 8)
    assert torch.equal(rgb[1][0], torch.from_numpy(x[1, :, :, 0]))
    assert torch.equal(rgb[1][2], rgb[1][0])


@pytest.mark.slow
def test_inception_path_with_random_weights(digits, tmp_path, monkeypatch):
    """The Inception branch end to end (gray -> RGB, 8x8 -> 299x299) on random weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with monkeypatch.context() as m:  # build the module without its weights file
        m.setattr(torch, "load", lambda *a, **k: {})
        m.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            fe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], "unused.pth")
    weights = tmp_path / "weights-inception-random.pth"
    torch.save(fe.state_dict(), weights)
    a, b = halves(digits[0][:24])
    m = compute_metrics(a, b, extractor="inception", weights_path=str(weights), isc_splits=2)
    assert np.isfinite(m["fid"]) and m["fid"] >= 0
    assert "inception-v3-compat" in m["feature_extractor"]
    assert 1.0 <= m["isc_mean"] and 0.0 <= m["precision"] <= 1.0
