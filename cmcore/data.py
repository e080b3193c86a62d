"""Data sets: a registry from config name to uint8 NHWC images (or 2-D points) plus labels.

- ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits, shipped inside its wheel.
- ``cifar10``: the official ``cifar-10-python.tar.gz`` at a configured path (50,000 train images).
- ``mixture``: points from a 2-D Gaussian mixture (cmcore.analytic), float32.
"""

import os
import pickle
import tarfile

import numpy as np
import torch

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


class DataError(Exception):
    """A data set is missing or malformed; the message says which file and how to fix it."""


def load_digits():
    """(images uint8 (1797, 8, 8, 1), labels int64): pixel = round(v * 255 / 16), v in 0..16."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, d.target.astype(np.int64)


def load_cifar10(path):
    """(images uint8 (50000, 32, 32, 3), labels) from the five training batches of the tarball."""
    if not path or not os.path.isfile(path):
        raise DataError(
            f"dataset.path: CIFAR-10 tarball not found at {path!r}; download "
            f"cifar-10-python.tar.gz from {CIFAR10_URL} and set dataset.path to it"
        )
    images, labels = [], []
    with tarfile.open(path, "r:gz") as tar:
        for i in range(1, 6):
            member = tar.extractfile(f"cifar-10-batches-py/data_batch_{i}")
            if member is None:
                raise DataError(f"dataset.path: {path} lacks data_batch_{i}; is it CIFAR-10?")
            batch = pickle.load(member, encoding="bytes")  # the official format is a pickle
            images.append(batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def load_mixture(num_points, seed, radius=1.0, std=0.1, components=8):
    """(points float32 (n, 2), component labels) from the ring mixture of cmcore.analytic."""
    from cmcore.analytic import ring_mixture

    gm = ring_mixture(components, radius, std)
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(gm.weights, num_points, replacement=True, generator=g)
    z = torch.randn(num_points, 2, generator=g, dtype=gm.means.dtype)
    x = gm.means[k] + gm.stds[k, None] * z
    return x.float().numpy(), k.numpy()


def load_dataset(cfg, seed=0):
    """The data set named by ``cfg['name']`` as (array, labels)."""
    name = cfg["name"]
    if name == "digits":
        return load_digits()
    if name == "cifar10":
        return load_cifar10(cfg.get("path"))
    if name == "mixture":
        return load_mixture(cfg.get("num_points", 10000), seed)
    raise DataError(f"dataset.name: unknown data set {name!r}; use digits, cifar10 or mixture")


def save_prepared(path, x, labels):
    """Write the prepared data set as npz (arr_0 = data, labels), atomically."""
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, arr_0=x, labels=labels)
    os.replace(tmp, path)


def load_prepared(path):
    """(data, labels) from a file written by ``save_prepared``."""
    if not os.path.isfile(path):
        raise DataError(f"prepared data {path} is missing; run `cm prepare-data` first")
    with np.load(path) as f:
        return f["arr_0"], f["labels"]


def to_model_space(x):
    """uint8 NHWC -> float32 NCHW in [-1, 1]; float points pass through unchanged."""
    t = torch.from_numpy(np.asarray(x))
    if t.dtype != torch.uint8:
        return t.float()
    return t.permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x):
    """float NCHW in [-1, 1] -> uint8 NHWC numpy (the official evaluators' sample format)."""
    x = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
