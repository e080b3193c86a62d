"""FID, Inception Score and precision/recall of generated samples, all through torch-fidelity.

    FID       = |mu_g - mu_r|^2 + tr(S_g + S_r - 2 (S_g S_r)^(1/2))    on features phi
    IS        = exp E_x KL(p(y|x) || p(y))                               on logits, in splits
    precision = frac. of generated phi inside the k-NN balls of the reference phi (k = 3)
    recall    = frac. of reference phi inside the k-NN balls of the generated phi
    KID       = mean over subsets of MMD^2_unbiased(phi_g, phi_r), k(x, y) = (x.y / d + 1)^3

Two feature extractors, both registered with torch-fidelity and chosen by ``extractor``:
- ``"inception"``: torch-fidelity's ``inception-v3-compat`` (pool 2048 features for FID and
  precision/recall, unbiased logits for IS, as in torch-fidelity's defaults), weights from a
  local file (config key ``evaluation.inception_weights``).
- ``"classifier"``: ``cm-classifier``, the small CNN of ``cmcore.evaluation.classifier`` trained
  on the embedded digits (config key ``evaluation.classifier``): penultimate ``features`` (128-d by
  default) for FID and precision/recall, ``logits`` for IS.

Images enter as uint8 NHWC numpy arrays and are wrapped in a Dataset of uint8 CHW tensors, the
form torch-fidelity passes to extractors. Single-channel images stay single-channel for the
classifier, and are repeated to 3 channels in the dataset wrapper for Inception (which asserts
Bx3xHxW). Inception resizes any H x W to 299 x 299 itself; the classifier requires the
resolution it was trained at.
"""

import atexit
import hashlib
import os
import shutil
import tempfile

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from cmcore.evaluation.classifier import load_classifier, to_model_input
from cmcore.threads import torch_threads

CLASSIFIER_EXTRACTOR = "cm-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's and clean-fid's defaults
CONFIG_KEYS = {"classifier": "evaluation.classifier", "inception": "evaluation.inception_weights"}
INCEPTION_WEIGHTS_HINT = (
    f"get the torch-fidelity release asset {os.path.basename(URL_INCEPTION_V3)} "
    f"({URL_INCEPTION_V3}; pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
    "carries the same hash suffix)"
)
CLASSIFIER_WEIGHTS_HINT = (
    "train it with the pipeline's classifier step (cmcore.evaluation.classifier)")


class MetricsError(ValueError):
    """Inputs to compute_metrics that cannot be evaluated: mismatched sets, missing weights."""


# ----------------------------------------------------------------------------
# Feature extractor for torch-fidelity.

class ClassifierFeatureExtractor(FeatureExtractorBase):
    """(phi(x), logits(x)) of a DigitsClassifier for uint8 NCHW batches, as torch-fidelity needs.

    torch-fidelity constructs it as ``cls(name, features_list, **all_calculate_metrics_kwargs)``;
    the checkpoint comes from ``feature_extractor_weights_path``. Pixels p map to p / 127.5 - 1.
    Dropout is off (torch-fidelity calls ``eval()``; we also do it here).
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise MetricsError(f"{name}: feature_extractor_weights_path is required")
        self.net, self.meta = load_classifier(feature_extractor_weights_path)
        self.weights_path = os.fspath(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4):
            raise MetricsError(f"{self.name}: expecting uint8 NCHW tensors, got {_describe(x)}")
        if x.shape[1] != self.net.in_channels:
            raise MetricsError(f"{self.name}: classifier takes {self.net.in_channels} channel(s), "
                               f"got input of shape {tuple(x.shape)}")
        res = self.meta.get("resolution")
        if res is not None and list(x.shape[2:]) != list(res):
            raise MetricsError(f"{self.name}: classifier was trained on {res[0]}x{res[1]} images, "
                               f"got input of shape {tuple(x.shape)}")
        phi, logits = self.net.features_and_logits(to_model_input(x))
        out = {"features": phi.to(torch.float32), "logits": logits.to(torch.float32)}
        return tuple(out[name] for name in self.features_list)


def _describe(x):
    return f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__


if CLASSIFIER_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:  # registration is global and one-shot
    torch_fidelity.register_feature_extractor(CLASSIFIER_EXTRACTOR, ClassifierFeatureExtractor)


# ----------------------------------------------------------------------------
# Inputs.

class ImagesU8Dataset(Dataset):
    """Dataset over a uint8 NHWC array yielding uint8 CHW tensors (C repeated to ``channels``),
    laid out as N x C x H x W once, so an item is a view."""

    def __init__(self, images_u8, channels=None):
        x = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2)
        channels = channels or x.shape[1]
        if x.shape[1] != channels:
            x = x.expand(-1, channels, -1, -1)  # only 1 -> 3, checked in compute_metrics
        self.images = x.contiguous()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


_REFERENCE_CACHE = []  # this process's folder of reference features (removed at exit)


def _reference_cache_name(reference, name, weights_path):
    """torch-fidelity's cache name of a reference set's features: its content, the extractor and
    its weights file. Features are cached for this process only, so a caller that scores many
    sample sets against one reference (snapshots, the tau search) extracts them once."""
    stat = os.stat(weights_path)
    h = hashlib.sha256(reference.tobytes())
    h.update(f"{reference.shape}|{name}|{os.path.abspath(weights_path)}|{stat.st_size}|"
             f"{stat.st_mtime_ns}".encode())
    return f"reference-{h.hexdigest()[:32]}"


def _process_cache_root():
    if not _REFERENCE_CACHE:
        root = tempfile.mkdtemp(prefix="cmcore-features-")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _REFERENCE_CACHE.append(root)
    return _REFERENCE_CACHE[0]


def _check_images(name, x):
    """Raise MetricsError unless x is a non-empty uint8 NHWC array with C in {1, 3}."""
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or len(x) == 0:
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise MetricsError(f"{name}: expected a non-empty uint8 NHWC array, got {desc}")
    if x.shape[-1] not in (1, 3):
        raise MetricsError(f"{name}: expected 1 or 3 channels (NHWC), got shape {x.shape}")


def check_weights(extractor, weights_path):
    """Raise MetricsError (one line: file, config key, where to get it) for absent weights."""
    if extractor not in CONFIG_KEYS:
        raise MetricsError(f"extractor must be 'classifier' or 'inception', got {extractor!r}")
    hint = CLASSIFIER_WEIGHTS_HINT if extractor == "classifier" else INCEPTION_WEIGHTS_HINT
    if not weights_path or not os.path.isfile(weights_path):
        raise MetricsError(f"{extractor} weights not found: {weights_path!r} (config key "
                           f"{CONFIG_KEYS[extractor]}); {hint}")


# ----------------------------------------------------------------------------
# Metrics.

def compute_metrics(samples_u8_nhwc, reference_u8_nhwc, *, extractor="classifier", weights_path,
                    device="cpu", prc_neighborhood=3, isc_splits=10, batch_size=None, seed=2020,
                    num_threads=None, fid_only=False, reference_stats=None, kid=False):
    """FID(samples, reference), IS(samples), precision and recall in one torch-fidelity call.

    ``samples`` is torch-fidelity's input1 (generated) and ``reference`` its input2 (real): IS is
    computed on the samples only; precision asks whether samples fall on the reference manifold.
    The reference's features are cached for the rest of the process (in a temporary folder).
    ``seed`` fixes the shuffling before the IS splits; ``num_threads`` (None: unchanged) sets
    torch's intra-op threads for the call. ``fid_only``: FID alone (the same number; IS and
    precision/recall, not computed, are NaN), as the tau search scores its candidates.
    ``reference_stats`` ((mu, sigma) of a published reference batch, cmcore.evaluation.reference):
    FID against them instead of against ``reference``, which precision/recall still use.
    ``kid``: also KID (against ``reference``; KID_SUBSETS subsets of min(KID_SUBSET_SIZE, n)
    rows drawn by np.random.RandomState(seed): samples' rows first, then the reference's).
    Returns a plain dict with fid, isc_mean, isc_std, precision, recall, f_score, num_samples,
    num_reference, feature_extractor (name, layers and weights path) and the layer names used.
    """
    # Validate everything before any work.
    _check_images("samples", samples_u8_nhwc)
    _check_images("reference", reference_u8_nhwc)
    if samples_u8_nhwc.shape[1:] != reference_u8_nhwc.shape[1:]:
        raise MetricsError(f"samples and reference differ in HxWxC: {samples_u8_nhwc.shape[1:]} vs "
                           f"{reference_u8_nhwc.shape[1:]}")
    if samples_u8_nhwc.min() == samples_u8_nhwc.max():
        raise MetricsError(f"samples: every pixel is {samples_u8_nhwc.flat[0]}: degenerate "
                           "samples get no score")
    check_weights(extractor, weights_path)
    num_samples, num_reference = len(samples_u8_nhwc), len(reference_u8_nhwc)
    k = prc_neighborhood + 1
    if num_samples < max(isc_splits, k, 2) or num_reference < k:
        raise MetricsError(f"too few images ({num_samples} samples, {num_reference} reference) for "
                           f"isc_splits={isc_splits}, prc_neighborhood={prc_neighborhood}")

    # Choose extractor and layers; Inception needs 3 channels, the classifier its own count.
    if extractor == "classifier":
        name, channels, default_batch = CLASSIFIER_EXTRACTOR, None, 500
        layers = dict(isc="logits", fid="features", prc="features")
    else:
        name, channels, default_batch = INCEPTION_EXTRACTOR, 3, 64
        layers = dict(isc="logits_unbiased", fid="2048", prc="2048")
    cuda = torch.device(device).type == "cuda"

    batch = batch_size or default_batch
    with torch_threads(num_threads):
        out = {}
        if reference_stats is not None:  # FID against a published batch's (mu, sigma)
            out[torch_fidelity.KEY_METRIC_FID] = _fid_against_statistics(
                samples_u8_nhwc, reference_stats, name, layers["fid"], channels, weights_path,
                batch, cuda)
        if not (fid_only and out):  # FID (unless done above), IS and precision/recall
            out.update(torch_fidelity.calculate_metrics(
                input1=ImagesU8Dataset(samples_u8_nhwc, channels),
                input2=ImagesU8Dataset(reference_u8_nhwc, channels),
                isc=not fid_only, fid=not out, prc=not fid_only, kid=kid, ppl=False,
                feature_extractor=name, feature_extractor_weights_path=os.fspath(weights_path),
                feature_layer_isc=layers["isc"], feature_layer_fid=layers["fid"],
                feature_layer_prc=layers["prc"], feature_layer_kid=layers["fid"],
                kid_subsets=KID_SUBSETS,
                kid_subset_size=min(KID_SUBSET_SIZE, num_samples, num_reference),
                isc_splits=isc_splits, prc_neighborhood=prc_neighborhood, rng_seed=seed,
                batch_size=batch, cuda=cuda, save_cpu_ram=True, cache=True,
                cache_root=_process_cache_root(),
                input2_cache_name=_reference_cache_name(reference_u8_nhwc, name, weights_path),
                verbose=False,
            ))
    nan = float("nan")
    return dict(
        fid=float(out[torch_fidelity.KEY_METRIC_FID]),
        isc_mean=float(out.get(torch_fidelity.KEY_METRIC_ISC_MEAN, nan)),
        isc_std=float(out.get(torch_fidelity.KEY_METRIC_ISC_STD, nan)),
        precision=float(out.get(torch_fidelity.KEY_METRIC_PRECISION, nan)),
        recall=float(out.get(torch_fidelity.KEY_METRIC_RECALL, nan)),
        f_score=float(out.get(torch_fidelity.KEY_METRIC_F_SCORE, nan)),
        **({"kid_mean": float(out[torch_fidelity.KEY_METRIC_KID_MEAN]),
            "kid_std": float(out[torch_fidelity.KEY_METRIC_KID_STD])} if kid else {}),
        num_samples=num_samples, num_reference=num_reference,
        feature_extractor=(f"{name} (fid/prc: {layers['fid']}, isc: {layers['isc']}) "
                           f"weights={os.path.abspath(weights_path)}"),
        feature_layers=layers, prc_neighborhood=prc_neighborhood, isc_splits=isc_splits,
    )


def _fid_against_statistics(samples, stats, name, layer, channels, weights_path, batch_size,
                            cuda):
    """FID of the samples' ``layer`` features against published (mu, sigma)."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    from cmcore.evaluation.reference import frechet_distance

    extractor = create_feature_extractor(name, [layer], cuda=cuda, verbose=False,
                                         feature_extractor_weights_path=os.fspath(weights_path))
    features = get_featuresdict_from_dataset(ImagesU8Dataset(samples, channels), extractor,
                                             batch_size, cuda, True, False)[layer]
    return frechet_distance(features, *stats)
