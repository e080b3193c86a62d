"""Evaluators side by side: one set of samples scored by torch-fidelity and by clean-fid
(Parmar et al. 2022), an independent implementation, so that their differences are measured.

    FID = |mu_g - mu_r|^2 + tr(S_g + S_r - 2 (S_g S_r)^(1/2))
          torch-fidelity: tr(.)^(1/2) as sum sqrt(eigvals(S_g S_r));  clean-fid: tr sqrtm(S_g S_r)
    KID = 1/s sum_{subsets} MMD^2_u(X_i, Y_i),  k(x, y) = (x.y / d + 1)^3,  s = 100 subsets of
          m = min(1000, n_g, n_r) rows, drawn from np.random.RandomState(seed) (samples' rows
          first) by both: the same subsets, so the KIDs differ by arithmetic only
    MMD^2_u(X, Y) = sum_{i!=j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1))
                    - 2 sum_{i,j} k(x_i, y_j) / m^2
    FD_DINOv2 (cmcore.evaluation.dinov2) when a DINOv2 weights file is configured.

torch-fidelity is the pipeline's own path (cmcore.evaluation.metrics: FID, IS, precision/recall,
here with KID). clean-fid takes its own image path: the samples are written as PNG files into a
temporary folder, read back by its loader (PIL, converted to RGB, [0, 255] float tensors), and
pass through its resizer; features, statistics, Frechet distance and kernel distance are its own
functions. The extractor follows ``evaluation.feature_extractor``:
- ``inception``: clean-fid's ``legacy_tensorflow`` mode, NVIDIA's TorchScript port of the
  TensorFlow Inception (``inception-2015-12-05.pt``, config key ``evaluation.cleanfid_inception``)
  resizing inside the network; never downloaded (clean-fid would: the file is checked first).
- ``classifier``: the digits classifier as clean-fid's ``custom_feat_extractor`` with an
  identity ``custom_fn_resize`` (it needs its training resolution); the features are the same
  function as torch-fidelity's, so the FID difference is that of the image path and arithmetic.
FID is against the reference images, or against a published batch's (mu, sigma) when
``reference_stats`` is given (KID then uses the reference images, as precision/recall do).
clean-fid's ``kernel_distance`` draws from numpy's global RNG: it runs under
``np.random.seed(seed)`` and the caller's global state is restored afterwards.
"""

import contextlib
import os
import tempfile

import numpy as np
import torch
from torch import nn

from cmcore.evaluation.classifier import load_classifier, to_model_input
from cmcore.evaluation.dinov2 import statistics
from cmcore.evaluation.metrics import (
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    MetricsError,
    compute_metrics,
)

CLEANFID_KEY = "evaluation.cleanfid_inception"
CLEANFID_FILE = "inception-2015-12-05.pt"  # the name clean-fid's InceptionV3W loads
CLEANFID_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                f"{CLEANFID_FILE}")
SEED = 2020  # compute_metrics's default rng_seed: IS splits and KID subsets


def check_cleanfid_weights(extractor, path):
    """Raise MetricsError (one line: the key, the file, where to get it) when clean-fid needs its
    Inception file and ``path`` is not one; the classifier needs none."""
    if extractor == "inception" and not (path and os.path.isfile(path)):
        raise MetricsError(f"{CLEANFID_KEY}: clean-fid's TorchScript Inception not found "
                           f"({path!r}); get {CLEANFID_FILE} from {CLEANFID_URL} and set the key "
                           "to its path")


# ----------------------------------------------------------------------------
# clean-fid's feature extractors.

class ClassifierFeatures(nn.Module):
    """phi(x) of the digits classifier for clean-fid's batches: float N x 3 x H x W in [0, 255]
    (PNG -> RGB -> ToTensor * 255), rounded back to the uint8 pixels, first C channels (a grey
    PNG read as RGB has three equal ones)."""

    def __init__(self, weights_path):
        super().__init__()
        self.net, self.meta = load_classifier(weights_path)
        self.net.requires_grad_(False).eval()

    def forward(self, x):
        x_u8 = x.round().clamp(0, 255).to(torch.uint8)[:, :self.net.in_channels]
        phi, _ = self.net.features_and_logits(to_model_input(x_u8))
        return phi.to(torch.float32)


def inception_model(path, device):
    """clean-fid's InceptionV3W (legacy_tensorflow: resize inside the net) from ``path``,
    without its download: it reads ``<folder>/inception-2015-12-05.pt``, so a file of another
    name is linked under that name in a temporary folder."""
    from cleanfid.inception_torchscript import InceptionV3W

    check_cleanfid_weights("inception", path)
    path = os.path.abspath(path)
    with contextlib.ExitStack() as stack:
        folder = os.path.dirname(path)
        if os.path.basename(path) != CLEANFID_FILE:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="cmcore-cleanfid-"))
            os.symlink(path, os.path.join(folder, CLEANFID_FILE))
        return InceptionV3W(folder, download=False, resize_inside=True).eval().to(device)


def write_pngs(images_u8, folder):
    """One PNG per image of a uint8 NHWC array (grey for C = 1), named by index."""
    from PIL import Image

    for i, x in enumerate(images_u8):
        Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).save(
            os.path.join(folder, f"{i:06d}.png"))


def _identity(x):
    return x


# ----------------------------------------------------------------------------
# clean-fid's scores.

def seeded_kernel_distance(features_r, features_g, seed=SEED):
    """clean-fid's KID of two feature sets, its subsets drawn under np.random.seed(seed); the
    global numpy RNG is restored after. Argument order makes it draw the samples' rows first."""
    from cleanfid.fid import kernel_distance

    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return float(kernel_distance(features_r, features_g, num_subsets=KID_SUBSETS,
                                     max_subset_size=KID_SUBSET_SIZE))
    finally:
        np.random.set_state(state)


class CleanFID:
    """clean-fid's FID and KID of sample sets against one reference set (features once)."""

    def __init__(self, reference_u8, extractor, weights_path, cleanfid_inception=None,
                 reference_stats=None, device="cpu", batch=500):
        check_cleanfid_weights(extractor, cleanfid_inception)
        self.extractor, self.device, self.batch = extractor, torch.device(device), batch
        if extractor == "classifier":
            self.model = ClassifierFeatures(weights_path).to(self.device)
            self.resize = _identity
            self.name = (f"clean-fid custom_feat_extractor: cm-classifier features, identity "
                         f"resize, weights={os.path.abspath(weights_path)}")
        else:
            self.model = inception_model(cleanfid_inception, self.device)
            self.resize = None  # legacy_tensorflow's own: none outside the network
            self.name = (f"clean-fid legacy_tensorflow: {CLEANFID_FILE} "
                         f"weights={os.path.abspath(cleanfid_inception)}")
        self.features_r = self.features(reference_u8)
        if reference_stats is None:
            self.mu_r, self.sigma_r = statistics(self.features_r)
        else:
            self.mu_r, self.sigma_r = reference_stats
            if self.mu_r.shape[0] != self.features_r.shape[1]:
                raise MetricsError(
                    f"evaluation.reference: statistics of {self.mu_r.shape[0]}-d features, but "
                    f"clean-fid's extractor gives {self.features_r.shape[1]}-d ones")

    def features(self, images_u8):
        """clean-fid's features of images written as PNG files and read by its loader."""
        from cleanfid.fid import get_folder_features

        with tempfile.TemporaryDirectory(prefix="cmcore-cleanfid-") as folder:
            write_pngs(images_u8, folder)
            return get_folder_features(folder, self.model, num_workers=0,
                                       batch_size=self.batch, device=self.device,
                                       mode="legacy_tensorflow", custom_fn_resize=self.resize,
                                       verbose=False)

    def __call__(self, samples_u8, seed=SEED):
        """{"fid", "kid"} of the samples against the reference."""
        from cleanfid.fid import frechet_distance

        features_g = self.features(samples_u8)
        mu_g, sigma_g = statistics(features_g)
        return {"fid": float(frechet_distance(mu_g, sigma_g, self.mu_r, self.sigma_r)),
                "kid": seeded_kernel_distance(self.features_r, features_g, seed)}


# ----------------------------------------------------------------------------
# Both, and FD-DINOv2.

class SideBySide:
    """Scores sample sets with torch-fidelity, clean-fid and (``dinov2``: an FDDINOv2 or None)
    FD-DINOv2, all against one reference set."""

    def __init__(self, reference_u8, *, extractor, weights_path, cleanfid_inception=None,
                 reference_stats=None, prc_neighborhood=3, device="cpu", dinov2=None):
        self.reference, self.stats, self.dinov2 = reference_u8, reference_stats, dinov2
        self.extractor, self.weights_path = extractor, weights_path
        self.prc_neighborhood, self.device = prc_neighborhood, device
        self.cleanfid = CleanFID(reference_u8, extractor, weights_path, cleanfid_inception,
                                 reference_stats, device)

    def __call__(self, samples_u8):
        tf = compute_metrics(samples_u8, self.reference, extractor=self.extractor,
                             weights_path=self.weights_path, device=self.device,
                             prc_neighborhood=self.prc_neighborhood, seed=SEED,
                             reference_stats=self.stats, kid=True)
        cf = self.cleanfid(samples_u8)
        fd = self.dinov2(samples_u8) if self.dinov2 is not None else float("nan")
        return {
            "fid_torch_fidelity": tf["fid"], "fid_clean_fid": cf["fid"],
            "fid_diff": cf["fid"] - tf["fid"],
            "fid_rel_diff": (cf["fid"] - tf["fid"]) / abs(tf["fid"]) if tf["fid"] else 0.0,
            "kid_torch_fidelity": tf["kid_mean"], "kid_clean_fid": cf["kid"],
            "kid_diff": cf["kid"] - tf["kid_mean"],
            "isc": tf["isc_mean"], "precision": tf["precision"], "recall": tf["recall"],
            "fd_dinov2": fd, "num_samples": tf["num_samples"],
            "num_reference": tf["num_reference"],
            "torch_fidelity_extractor": tf["feature_extractor"],
            "clean_fid_extractor": self.cleanfid.name,
            "dinov2": self.dinov2.describe() if self.dinov2 is not None else "-",
        }


def versions():
    """The evaluators' package versions, for the table's provenance."""
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("torch-fidelity", "clean-fid",
                                                             "timm", "torch"))


# ----------------------------------------------------------------------------
# The table.

HEADLINE = ["method", "steps", "nfe", "fid_torch_fidelity", "fid_clean_fid", "fid_diff",
            "fid_rel_diff", "kid_torch_fidelity", "kid_clean_fid", "kid_diff", "isc",
            "precision", "recall", "fd_dinov2"]
PROVENANCE = ["num_samples", "num_reference", "reference_set", "torch_fidelity_extractor",
              "clean_fid_extractor", "dinov2", "versions", "seed", "samples", "code_version"]
FORMATS = {"fid_torch_fidelity": "{:.4f}", "fid_clean_fid": "{:.4f}", "fid_diff": "{:+.2e}",
           "fid_rel_diff": "{:+.1e}", "kid_torch_fidelity": "{:.5f}", "kid_clean_fid": "{:.5f}",
           "kid_diff": "{:+.1e}", "isc": "{:.3f}", "precision": "{:.3f}", "recall": "{:.3f}",
           "fd_dinov2": "{:.3f}"}


def table(rows):
    """The rows (dicts with HEADLINE + PROVENANCE keys) as a DataFrame in Table 1's order."""
    import pandas as pd

    from cmcore.evaluation.reports import METHOD_ORDER

    df = pd.DataFrame(rows, columns=HEADLINE + PROVENANCE)
    order = df["method"].map(lambda m: METHOD_ORDER.get(m, len(METHOD_ORDER)))
    return df.assign(_order=order).sort_values(["_order", "steps"], kind="stable").drop(
        columns="_order").reset_index(drop=True)


def markdown(df):
    """Headline columns (differences: clean-fid minus torch-fidelity), provenance below."""
    from cmcore.evaluation.reports import LABELS, per_row

    dinov2 = bool(df["fd_dinov2"].notna().any())
    named = df.assign(method=df["method"].map(LABELS).fillna(df["method"]))
    view = named[[c for c in HEADLINE if dinov2 or c != "fd_dinov2"]]
    view = view.assign(**{c: view[c].map(lambda v, f=f: "-" if v != v else f.format(v))
                          for c, f in FORMATS.items() if c in view})
    notes = [
        "fid_diff, kid_diff: clean-fid minus torch-fidelity; fid_rel_diff: fid_diff / "
        "fid_torch_fidelity. KID: 100 subsets of min(1000, n) rows, the same subsets in both.",
        f"{per_row(named, 'num_samples')} samples per row against the "
        f"{per_row(named, 'reference_set')} ({per_row(named, 'num_reference')} reference "
        "images).",
        f"torch-fidelity: {per_row(named, 'torch_fidelity_extractor')}; IS, precision and "
        "recall are torch-fidelity's.",
        f"clean-fid: {per_row(named, 'clean_fid_extractor')}.",
        "FD-DINOv2: " + (per_row(named[df["fd_dinov2"].notna()], "dinov2") if dinov2 else
                         "not computed (evaluation.dinov2_weights is null)."),
        f"Versions: {per_row(named, 'versions')}; code version {per_row(named, 'code_version')}"
        f"; seed {per_row(named, 'seed')}.",
    ]
    return (view.to_markdown(index=False, disable_numparse=True) + "\n\n"
            + "\n".join(f"- {n}" for n in notes) + "\n")


def write_table(rows, csv_path, md_path, html_path):
    """The evaluator table of ``rows``: CSV (every column), Markdown and HTML; the DataFrame."""
    from cmcore.evaluation.reports import write_markdown
    from cmcore.files import atomic

    df = table(rows)
    with atomic(csv_path) as tmp:
        df.to_csv(tmp, index=False)
    write_markdown(markdown(df), md_path, html_path,
                   "Evaluators side by side: torch-fidelity and clean-fid")
    return df
