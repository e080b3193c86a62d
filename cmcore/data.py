"""Data sets: a registry from config name to uint8 NHWC images (or 2-D points) plus labels.

- ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits, shipped inside its wheel.
- ``cifar10``: the official ``cifar-10-python.tar.gz`` at a configured path (50,000 train images).
- ``mixture``: points from a 2-D Gaussian mixture (cmcore.diffusion.analytic), float32.
- ``npz``: uint8 NHWC images under key ``arr_0`` (the official evaluators' format, and what
  cmcore.prepared writes), class labels under ``labels`` if present (else all 0).
- ``image_folder``: every .png/.jpg/.jpeg/.webp/.bmp file below a folder (sorted paths), center
  cropped to ``resolution`` as ADM's loader does (halve with box filtering while the short side
  is at least twice the target, bicubic resize, center crop). The class of an image is its
  top-level subfolder (ImageNet's train/<wnid>/ layout) or, for a file directly in the folder,
  its name up to the first "_" (the official code's flat n01440764_2708.JPEG layout); labels
  index the sorted class names. ImageNet 64 and LSUN 256 come this way.
Both keep the first ``max_images`` images if set. ``dataset_rows`` gives a data set as its
labels and a stream of rows (an image folder is decoded one image at a time) for
cmcore.prepared, which writes the file training reads row by row.
"""

import os
import pickle
import tarfile
import zipfile
import zlib

import numpy as np
import torch

from cmcore.errors import DataError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


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
    try:
        with tarfile.open(path, "r:gz") as tar:
            for i in range(1, 6):
                try:
                    member = tar.extractfile(f"cifar-10-batches-py/data_batch_{i}")
                except KeyError:
                    member = None
                if member is None:
                    raise DataError(f"dataset.path: {path} lacks data_batch_{i}; is it CIFAR-10?")
                # The official format is a pickle: read with numpy arrays as the only objects.
                batch = _BatchUnpickler(member, encoding="bytes").load()
                data = np.asarray(batch[b"data"], dtype=np.uint8)
                images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    except (tarfile.TarError, EOFError, OSError, zlib.error, pickle.UnpicklingError, KeyError,
            TypeError, ValueError) as e:
        raise DataError(f"dataset.path: {path} is not a readable CIFAR-10 tarball "
                        f"({type(e).__name__}: {e}); download it again") from None
    return np.concatenate(images), np.concatenate(labels)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and numpy arrays, nothing else: a crafted
    tarball cannot run code (a plain pickle.load calls whatever the file names)."""

    ALLOWED = {(f"numpy.{core}.{module}", name) for core in ("core", "_core")
               for module, name in (("multiarray", "_reconstruct"), ("numeric", "_frombuffer"))
               } | {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name} (only numpy arrays)")
        return super().find_class(module, name)


def load_mixture(num_points, seed, radius=1.0, std=0.1, components=8):
    """(points float32 (n, 2), component labels) from the ring mixture of
    cmcore.diffusion.analytic."""
    from cmcore.diffusion.analytic import ring_mixture

    gm = ring_mixture(components, radius, std)
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(gm.weights, num_points, replacement=True, generator=g)
    z = torch.randn(num_points, 2, generator=g, dtype=gm.means.dtype)
    x = gm.means[k] + gm.stds[k, None] * z
    return x.float().numpy(), k.numpy()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _check_images(x, path, resolution):
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"dataset.path: arr_0 in {path} must be uint8 NHWC with 1 or 3 "
                        f"channels, got {x.dtype} of shape {x.shape}")
    if resolution and x.shape[1:3] != (resolution, resolution):
        raise DataError(f"dataset.path: images in {path} are {x.shape[1]}x{x.shape[2]}, "
                        f"dataset.resolution is {resolution}")


def load_npz(path, resolution=None, max_images=None):
    """(images uint8 NHWC, labels int64) from an npz holding arr_0 (and labels)."""
    if not path or not os.path.isfile(path):
        raise DataError(f"dataset.path: npz file not found at {path!r}; write the images as "
                        "uint8 NHWC under key arr_0 (labels optional) and set dataset.path")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "arr_0" not in f:
                raise DataError(f"dataset.path: {path} has no arr_0 (keys: {', '.join(f.files)})")
            x = f["arr_0"][:max_images]
            labels = f["labels"][:max_images] if "labels" in f else np.zeros(len(x))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"dataset.path: {path} is not a readable npz file "
                        f"({type(e).__name__}: {e}); write it again") from None
    _check_images(x, path, resolution)
    return x, labels.astype(np.int64)


def center_crop(image, resolution):
    """A PIL image -> uint8 (resolution, resolution, 3): box-halve, bicubic resize, crop."""
    from PIL import Image

    image = image.convert("RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), Image.BICUBIC)
    a = np.asarray(image)
    top, left = (a.shape[0] - resolution) // 2, (a.shape[1] - resolution) // 2
    return a[top:top + resolution, left:left + resolution]


def image_folder_files(path, resolution, max_images=None):
    """(files relative to ``path``, labels by subfolder or name prefix) of an image folder."""
    if not path or not os.path.isdir(path):
        raise DataError(f"dataset.path: image folder not found at {path!r}; put the training "
                        "images (in class subfolders, if any) there and set dataset.path")
    if not resolution:
        raise DataError("dataset.resolution: set the image side for an image_folder data set")
    files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, names in os.walk(path)
                   for f in names if f.lower().endswith(IMAGE_SUFFIXES))[:max_images]
    if not files:
        raise DataError(f"dataset.path: no {'/'.join(IMAGE_SUFFIXES)} images under {path}")
    names = [f.split(os.sep)[0] if os.sep in f else f.split("_")[0] if "_" in f else ""
             for f in files]
    classes = {c: i for i, c in enumerate(sorted(set(names)))}
    return files, np.array([classes[c] for c in names], dtype=np.int64)


def image_folder_images(path, files, resolution):
    """Each file center-cropped, one (1, resolution, resolution, 3) uint8 array at a time."""
    from PIL import Image

    for f in files:
        try:
            with Image.open(os.path.join(path, f)) as image:
                yield center_crop(image, resolution)[None]
        except (OSError, ValueError, SyntaxError) as e:  # PIL: unreadable, truncated, foreign
            raise DataError(f"dataset.path: {os.path.join(path, f)} is not a readable image "
                            f"({type(e).__name__}: {e}); remove or replace it") from None


def load_image_folder(path, resolution, max_images=None):
    """(images uint8 (n, resolution, resolution, 3), labels by subfolder or name prefix)."""
    files, labels = image_folder_files(path, resolution, max_images)
    return np.concatenate(list(image_folder_images(path, files, resolution))), labels


def dataset_rows(cfg, seed=0):
    """(labels, row shape, dtype, iterable of row arrays) of the data set ``cfg['name']``: an
    image folder decoded one image at a time, any other data set as one array."""
    if cfg["name"] == "image_folder":
        path, resolution = cfg.get("path"), cfg.get("resolution")
        files, labels = image_folder_files(path, resolution, cfg.get("max_images"))
        return labels, (resolution, resolution, 3), np.uint8, \
            image_folder_images(path, files, resolution)
    x, labels = load_dataset(cfg, seed)
    return labels, x.shape[1:], x.dtype, [x]


def load_dataset(cfg, seed=0):
    """The data set named by ``cfg['name']`` as (array, labels)."""
    name = cfg["name"]
    if name == "digits":
        return load_digits()
    if name == "cifar10":
        return load_cifar10(cfg.get("path"))
    if name == "mixture":
        return load_mixture(cfg.get("num_points", 10000), seed)
    if name == "npz":
        return load_npz(cfg.get("path"), cfg.get("resolution"), cfg.get("max_images"))
    if name == "image_folder":
        return load_image_folder(cfg.get("path"), cfg.get("resolution"), cfg.get("max_images"))
    raise DataError(f"dataset.name: unknown data set {name!r}; use digits, cifar10, mixture, "
                    "npz or image_folder")


def to_model_space(x):
    """uint8 NHWC -> float32 NCHW in [-1, 1]; float points pass through unchanged (a numpy
    array, or a tensor on its device)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.dtype != torch.uint8:
        return t.float()
    return t.permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x):
    """float NCHW in [-1, 1] -> uint8 NHWC numpy (the official evaluators' sample format)."""
    x = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
