"""Published reference batches: FID the way the papers' numbers were computed.

    FID = |mu_g - mu_r|^2 + tr(S_g + S_r - 2 (S_g S_r)^(1/2)),  (mu_r, S_r) read from the file

Two layouts, both npz:
- openai's ADM evaluator batches (``VIRTUAL_imagenet64_labeled.npz``,
  ``VIRTUAL_lsun_bedroom256.npz``, ...): reference images under ``arr_0`` (uint8 NHWC) and
  their Inception pool statistics ``mu`` (2048,) and ``sigma`` (2048, 2048); ``mu_s`` /
  ``sigma_s`` are spatial statistics for sFID.
- NVlabs/edm's FID references (``cifar10-32x32.npz``): ``mu`` and ``sigma`` only.
FID uses the file's statistics; precision and recall use its images when it has them (else the
training set). sFID is not computed: torch-fidelity's Inception exposes no mixed_6 spatial
features, so ``mu_s`` / ``sigma_s`` are read past. The statistics were computed by the
evaluators' TensorFlow Inception; torch-fidelity's ``inception-v3-compat`` is its port, so FIDs
agree closely, not to the last digit.
"""

import os
import zipfile
from dataclasses import dataclass

import numpy as np


class ReferenceBatchError(ValueError):
    """A reference batch that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class ReferenceBatch:
    path: str
    mu: np.ndarray  # (d,) float64
    sigma: np.ndarray  # (d, d) float64
    images: object  # uint8 NHWC array, or None (statistics only)

    def describe(self):
        """The reference set as the metric records name it."""
        name = os.path.basename(self.path)
        images = f"its {len(self.images)} images" if self.images is not None else \
            "the training set"
        return (f"{name} (FID: its mu, sigma of {self.mu.shape[0]}-d features; precision/recall: "
                f"{images})")


def load_reference_batch(path):
    """The ReferenceBatch in ``path`` (layouts: module docstring); ReferenceBatchError otherwise."""
    hint = ("an ADM evaluator batch (arr_0, mu, sigma) or an EDM FID reference (mu, sigma); "
            "set evaluation.reference to such a file or to null")
    if not path or not os.path.isfile(path):
        raise ReferenceBatchError(f"evaluation.reference: {path!r} not found; {hint}")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.files)
            arrays = {k: f[k] for k in ("mu", "sigma", "arr_0") if k in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ReferenceBatchError(f"evaluation.reference: {path} is not a readable npz file "
                                  f"({type(e).__name__}: {e})") from None
    missing = [k for k in ("mu", "sigma") if k not in arrays]
    if missing:
        raise ReferenceBatchError(f"evaluation.reference: {path} has no {missing[0]} (keys: "
                                  f"{', '.join(keys)}); it must be {hint.split('; ')[0]}")
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    images = arrays.get("arr_0")
    d = mu.shape[0] if mu.ndim == 1 else None
    if d is None or sigma.shape != (d, d):
        raise ReferenceBatchError(f"evaluation.reference: {path} holds mu {mu.shape} and "
                                  f"sigma {sigma.shape}; expected (d,) and (d, d)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ReferenceBatchError(f"evaluation.reference: {path} holds non-finite statistics")
    if images is not None and (images.dtype != np.uint8 or images.ndim != 4
                               or images.shape[-1] not in (1, 3)):
        raise ReferenceBatchError(f"evaluation.reference: arr_0 in {path} must be uint8 NHWC "
                                  f"images, got {images.dtype} {images.shape}")
    return ReferenceBatch(os.fspath(path), mu, sigma, images)


def frechet_distance(features, mu_r, sigma_r):
    """FID between features (n, d) and the statistics (mu_r, sigma_r), by torch-fidelity's
    formula (mu and sigma of the features as it computes them, in float64)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    own = fid_features_to_statistics(features)
    if own["mu"].shape != mu_r.shape:
        raise ReferenceBatchError(
            f"evaluation.reference: statistics of {mu_r.shape[0]}-d features, but the feature "
            f"extractor gives {own['mu'].shape[0]}-d ones; use the reference of this extractor")
    stat_g = {"mu": own["mu"].astype(np.float64), "sigma": own["sigma"].astype(np.float64)}
    out = fid_statistics_to_metric(stat_g, {"mu": mu_r, "sigma": sigma_r}, verbose=False)
    return float(next(iter(out.values())))
