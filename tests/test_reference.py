"""FID against published reference batches (ADM's arr_0 + mu + sigma, EDM's mu + sigma): the
same FID as against the images the statistics come from, precision/recall against the batch's
images, and broken files refused in one line. Reference files are written in the published
layouts, with the digits classifier's features standing in for Inception's."""

import json

import numpy as np
import pytest
import torch
from conftest import cm, tiny_config

from cmcore.data import load_digits
from cmcore.evaluation.classifier import load_classifier, to_model_input
from cmcore.evaluation.metrics import compute_metrics
from cmcore.evaluation.reference import (
    ReferenceBatchError,
    frechet_distance,
    load_reference_batch,
)


def _features(classifier, images):
    """The classifier's FID features (n, 128) of uint8 NHWC images."""
    net, _ = load_classifier(classifier)
    x = to_model_input(torch.from_numpy(images).permute(0, 3, 1, 2))
    with torch.no_grad():
        return net.features_and_logits(x)[0]


def _statistics(classifier, images):
    """(mu, sigma) of the classifier's FID features of uint8 NHWC images."""
    phi = _features(classifier, images).double().numpy()
    return phi.mean(0), np.cov(phi, rowvar=False)


@pytest.fixture(scope="module")
def halves():
    images, _ = load_digits()
    return images[::2], images[1::2]  # "samples" and "reference"


def test_fid_against_statistics_is_fid_against_their_images(tmp_path, classifier, halves):
    samples, reference = halves
    mu, sigma = _statistics(classifier, reference)
    path = tmp_path / "edm-ref.npz"
    np.savez(path, mu=mu, sigma=sigma)  # EDM's layout: statistics only
    batch = load_reference_batch(path)
    assert batch.images is None
    kw = dict(extractor="classifier", weights_path=classifier)
    direct = compute_metrics(samples, reference, **kw)
    via_stats = compute_metrics(samples, samples, reference_stats=(batch.mu, batch.sigma), **kw)
    assert via_stats["fid"] == pytest.approx(direct["fid"], rel=1e-4)
    assert direct["fid"] > 1  # two halves of the digits differ measurably
    # IS is the samples' alone; fid_only against statistics extracts the samples once.
    assert via_stats["isc_mean"] == pytest.approx(direct["isc_mean"], rel=1e-6)
    only = compute_metrics(samples, samples, reference_stats=(batch.mu, batch.sigma),
                           fid_only=True, **kw)
    assert only["fid"] == via_stats["fid"] and np.isnan(only["precision"])


def test_evaluate_with_an_adm_batch(tmp_path, classifier, halves):
    """cm evaluate --reference-batch: FID against the batch's mu and sigma (not the training
    set), precision/recall against its images, and the record names the file."""
    samples, reference = halves
    mu, sigma = _statistics(classifier, reference)
    shift = np.full_like(mu, 0.05)  # statistics that are not those of arr_0: FID must use them
    path = tmp_path / "VIRTUAL_digits.npz"
    np.savez(path, arr_0=reference, mu=mu + shift, sigma=sigma, mu_s=mu[:4],
             sigma_s=sigma[:4, :4])
    cfg = tiny_config(tmp_path)
    data, out = tmp_path / "data.npz", tmp_path / "m.json"
    assert cm("prepare-data", "--config", cfg, "--out", data).returncode == 0
    np.savez(tmp_path / "s.npz", arr_0=samples)
    (tmp_path / "s.json").write_text(json.dumps({"method": "cd", "steps": 1}))
    r = cm("evaluate", "--config", cfg, "--samples", tmp_path / "s.npz", "--reference", data,
           "--reference-batch", path, "--classifier", classifier, "--out", out)
    assert r.returncode == 0, r.stderr
    record = json.loads(out.read_text())
    kw = dict(extractor="classifier", weights_path=classifier)
    direct = compute_metrics(samples, reference, **kw)
    phi = _features(classifier, samples)
    assert record["fid"] == pytest.approx(frechet_distance(phi, mu + shift, sigma), rel=1e-4)
    assert abs(record["fid"] - direct["fid"]) > 0.01  # the shifted mu changed it
    assert (record["precision"], record["recall"]) == (direct["precision"], direct["recall"])
    assert record["reference_set"].startswith("VIRTUAL_digits.npz (FID: its mu, sigma")
    assert f"its {len(reference)} images" in record["reference_set"]


@pytest.mark.parametrize("arrays, words", [
    ({"sigma": np.eye(3)}, "has no mu"),
    ({"mu": np.zeros(3), "sigma": np.eye(4)}, r"expected \(d,\) and \(d, d\)"),
    ({"mu": np.array([0.0, np.nan]), "sigma": np.eye(2)}, "non-finite"),
    ({"mu": np.zeros(2), "sigma": np.eye(2), "arr_0": np.zeros((2, 4, 4, 3))}, "uint8 NHWC"),
])
def test_broken_reference_batches_are_one_line(tmp_path, arrays, words):
    path = tmp_path / "ref.npz"
    np.savez(path, **arrays)
    with pytest.raises(ReferenceBatchError, match=words) as e:
        load_reference_batch(path)
    assert "\n" not in str(e.value) and "evaluation.reference" in str(e.value)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ReferenceBatchError, match="not a readable npz"):
        load_reference_batch(tmp_path / "junk.npz")


def test_statistics_of_another_extractor_are_refused(classifier, halves):
    """Inception's 2048-d statistics against the classifier's 128-d features: one line."""
    with pytest.raises(ReferenceBatchError, match="2048-d features, but the feature extractor"):
        compute_metrics(halves[0], halves[0], extractor="classifier", weights_path=classifier,
                        reference_stats=(np.zeros(2048), np.eye(2048)))
