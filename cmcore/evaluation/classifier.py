"""A small CNN classifier for the embedded digits, used as the metrics' feature extractor.

Inception-v3 is meaningless on 8x8 grayscale digits and runs at about 7 images/s on 2 CPU cores,
so the embedded default computes FID, IS and precision/recall in the feature space of this
classifier instead (``cmcore.evaluation.metrics`` registers it with torch-fidelity):

    phi(x) = SiLU(W_1 h(x) + b_1)      penultimate features, ``feature_dim`` (default 128) wide
    logits = W_2 Dropout(phi(x)) + b_2  ``num_classes`` (default 10) wide

Inputs are float images in [-1, 1], NCHW; ``to_model_input`` maps uint8 pixels p to p / 127.5 - 1.
Checkpoints are plain dicts ``{"format", "state_dict", "meta"}`` loaded with ``weights_only=True``;
the architecture is inferred from the state dict's shapes, so a checkpoint needs no class pickle.
"""

import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmcore.files import atomic
from cmcore.threads import torch_threads

CHECKPOINT_FORMAT = "cmcore-classifier-v1"


def to_model_input(x_u8):
    """x = p / 127.5 - 1: uint8 pixels p in 0..255 (any layout) -> float32 in [-1, 1]."""
    return x_u8.to(torch.float32) / 127.5 - 1


class DigitsClassifier(nn.Module):
    """logits = W_2 Dropout(phi(x)) + b_2, phi(x) = SiLU(W_1 h(x) + b_1) (see the module docstring).

    h: conv3x3(C -> c) SiLU, conv3x3(c -> 2c) SiLU, maxpool 2 (8x8 -> 4x4), conv3x3(2c -> 2c) SiLU,
    adaptive average pool to 4x4 (identity for 8x8 inputs), flatten to 2c * 16. SiLU rather than
    ReLU keeps every feature dimension alive, so feature covariances stay well conditioned.
    """

    def __init__(self, in_channels=1, num_classes=10, channels=16, feature_dim=128, dropout=0.3):
        super().__init__()
        self.in_channels, self.num_classes, self.feature_dim = in_channels, num_classes, feature_dim
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * channels, 2 * channels, 3, padding=1)
        self.fc1 = nn.Linear(2 * channels * 16, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(feature_dim, num_classes)

    def features_and_logits(self, x):
        """(phi(x), logits(x)) for x float NCHW in [-1, 1]: (N, feature_dim), (N, num_classes)."""
        h = F.silu(self.conv1(x))                       # N x c x H x W
        h = F.max_pool2d(F.silu(self.conv2(h)), 2)      # N x 2c x H/2 x W/2
        h = F.adaptive_avg_pool2d(F.silu(self.conv3(h)), 4).flatten(1)  # N x 2c*16
        phi = F.silu(self.fc1(h))                       # N x feature_dim
        return phi, self.fc2(self.drop(phi))

    def forward(self, x):
        """logits(x) for x float NCHW in [-1, 1]."""
        return self.features_and_logits(x)[1]


def classifier_from_state_dict(state_dict):
    """DigitsClassifier whose sizes are read off the state dict's weight shapes, weights loaded."""
    try:
        in_channels = state_dict["conv1.weight"].shape[1]
        channels = state_dict["conv1.weight"].shape[0]
        feature_dim = state_dict["fc1.weight"].shape[0]
        num_classes = state_dict["fc2.weight"].shape[0]
    except (KeyError, AttributeError, IndexError) as e:
        raise ValueError(f"state dict is not a DigitsClassifier's (missing {e})") from None
    net = DigitsClassifier(in_channels, num_classes, channels, feature_dim)
    net.load_state_dict(state_dict)
    return net


def _random_shift(x, generator, max_shift=1):
    """x'[n, :, i, j] = pad(x)[n, :, i + dy_n, j + dx_n]: shifts each image by up to max_shift px.

    The padding value is -1 (the background of the digits in model space).
    """
    N, C, H, W = x.shape
    s = max_shift
    x_pad = F.pad(x, (s, s, s, s), value=-1.0)
    dy = torch.randint(0, 2 * s + 1, (N, 1), generator=generator)
    dx = torch.randint(0, 2 * s + 1, (N, 1), generator=generator)
    rows = (dy + torch.arange(H)).view(N, H, 1)
    cols = (dx + torch.arange(W)).view(N, 1, W)
    out = x_pad.permute(0, 2, 3, 1)[torch.arange(N).view(N, 1, 1), rows, cols]  # N x H x W x C
    return out.permute(0, 3, 1, 2).contiguous()


def _as_nchw_float(images_u8):
    """uint8 NHWC (or NHW) numpy array -> float32 NCHW tensor in [-1, 1]."""
    images_u8 = np.asarray(images_u8)
    if images_u8.dtype != np.uint8 or images_u8.ndim not in (3, 4):
        raise ValueError(f"expected uint8 NHWC images, got {images_u8.dtype} {images_u8.shape}")
    if images_u8.ndim == 3:
        images_u8 = images_u8[..., None]
    return to_model_input(torch.from_numpy(images_u8).permute(0, 3, 1, 2).contiguous())


@torch.no_grad()
def accuracy(net, x, y, batch=1000):
    """Fraction of argmax_k logits_k(x) == y, with dropout off."""
    was_training = net.training
    net.eval()
    correct = sum(int((net(xb).argmax(1) == yb).sum()) for xb, yb in
                  zip(x.split(batch), y.split(batch), strict=True))
    net.train(was_training)
    return correct / max(len(y), 1)


def label_accuracy(path, images_u8, labels):
    """acc = (1/n) sum_i [argmax_k logits_k(x_i) = y_i]: how often the classifier at ``path``
    sees the requested class y_i in a class-conditional sample x_i (chance: 1 / classes)."""
    net, meta = load_classifier(path)
    if len(images_u8) != len(labels):
        raise ValueError(f"{len(images_u8)} samples but {len(labels)} class labels")
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if int(y.min()) < 0 or int(y.max()) >= net.num_classes:
        raise ValueError(f"class labels span {int(y.min())}..{int(y.max())}; the classifier "
                         f"knows {net.num_classes} classes")
    return accuracy(net, _as_nchw_float(images_u8), y)


def train_classifier(images_u8, labels, *, iters=1000, batch=128, lr=3e-3, seed=0,
                     holdout_fraction=0.2, max_shift=1, num_threads=1):
    """Minimise the cross-entropy of DigitsClassifier with Adam on a stratified, seeded split.

    Steps: (1) hold out ``holdout_fraction`` of the images, stratified by label (sklearn, seed);
    (2) train ``iters`` Adam steps on random minibatches shifted by up to ``max_shift`` pixels,
    learning rate cosine-annealed from ``lr`` to 0; (3) report held-out accuracy with dropout off.
    The global torch RNG and thread count are left untouched (training runs on ``num_threads``
    intra-op threads; see ``torch_threads``). Returns ``(state_dict, metrics)``; metrics is a plain
    JSON-serialisable dict (holdout_accuracy, train_accuracy, sizes, seconds, ...).
    """
    from sklearn.model_selection import train_test_split

    t0 = time.perf_counter()
    x = _as_nchw_float(images_u8)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    num_classes = int(y.max()) + 1
    idx_train, idx_hold = train_test_split(np.arange(len(y)), test_size=holdout_fraction,
                                           random_state=seed, stratify=y.numpy())
    x_tr, y_tr = x[idx_train], y[idx_train]
    x_ho, y_ho = x[idx_hold], y[idx_hold]

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsClassifier(in_channels=x.shape[1], num_classes=num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters)
    net.train()
    with torch.random.fork_rng(devices=[]), torch_threads(num_threads):
        torch.manual_seed(seed)  # dropout masks
        for _ in range(iters):
            i = torch.randint(0, len(y_tr), (batch,), generator=gen)
            xb = _random_shift(x_tr[i], gen, max_shift) if max_shift > 0 else x_tr[i]
            loss = F.cross_entropy(net(xb), y_tr[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()

    metrics = dict(
        holdout_accuracy=accuracy(net, x_ho, y_ho), train_accuracy=accuracy(net, x_tr, y_tr),
        num_train=len(y_tr), num_holdout=len(y_ho), num_classes=num_classes,
        in_channels=int(x.shape[1]), resolution=[int(x.shape[2]), int(x.shape[3])],
        feature_dim=net.feature_dim, iters=iters, batch=batch, lr=lr, seed=seed,
        holdout_fraction=holdout_fraction, final_loss=float(loss.detach()),
        seconds=time.perf_counter() - t0,
    )
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, metrics


def save_classifier(path, state_dict, meta):
    """Write ``{"format", "state_dict", "meta"}`` with torch.save, atomically (cmcore.files).

    ``meta`` must be JSON-serialisable (so that ``weights_only=True`` loading accepts it).
    """
    try:
        meta = json.loads(json.dumps(meta))
    except TypeError as e:
        raise ValueError(f"classifier meta must be JSON-serialisable: {e}") from None
    obj = {"format": CHECKPOINT_FORMAT, "state_dict": dict(state_dict), "meta": meta}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic(path) as tmp:
        torch.save(obj, tmp)


def load_classifier(path, map_location="cpu"):
    """(DigitsClassifier in eval mode, meta) from a checkpoint written by ``save_classifier``.

    Raises FileNotFoundError for a missing file and ValueError for a file that is not a
    classifier checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classifier checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is not a cmcore classifier checkpoint ({msg})") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a cmcore classifier checkpoint "
                         f"(expected a dict with format {CHECKPOINT_FORMAT!r})")
    net = classifier_from_state_dict(obj["state_dict"]).eval()
    return net, dict(obj.get("meta") or {})
