"""FD-DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics"):
the Frechet distance on DINOv2 ViT features instead of Inception's.

    FD_DINOv2 = |mu_g - mu_r|^2 + tr(S_g + S_r - 2 (S_g S_r)^(1/2)),   phi(x) = CLS token of
                ViT(normalize(resize_224_bicubic(x)))

As dgm-eval computes it: each image (grey ones repeated to RGB) resized to 224 x 224 with PIL's
bicubic filter, scaled to [0, 1], normalised with the ImageNet mean and std; phi is the final
LayerNorm's CLS token (the hub model's ``x_norm_clstoken``), 1024-d for ViT-L/14. The network is
timm's DINOv2 ViT (config key ``evaluation.dinov2_arch``, ``vit_large_patch14_dinov2`` by
default) loaded from the official facebookresearch checkpoint (``dinov2_vitl14_pretrain.pth``,
config key ``evaluation.dinov2_weights``) through timm's own key filter (it drops
``mask_token``). The weights keep their 518-pixel grid; timm interpolates the position embedding
to the 16 x 16 patches of a 224 input at each forward (bicubic, antialiased), where the hub model
interpolates with a 0.1 offset and no antialiasing: features close to dgm-eval's, not bitwise.
The distance is clean-fid's ``frechet_distance`` (scipy's sqrtm, as dgm-eval's).
"""

import os

import numpy as np
import torch

from cmcore.evaluation.metrics import MetricsError
from cmcore.threads import torch_threads

CONFIG_KEY = "evaluation.dinov2_weights"
DEFAULT_ARCH = "vit_large_patch14_dinov2"
HINT = ("get dinov2_vitl14_pretrain.pth from https://dl.fbaipublicfiles.com/dinov2/"
        "dinov2_vitl14/dinov2_vitl14_pretrain.pth (facebookresearch/dinov2) or set it to null")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIZE = 224


def check_weights(path):
    """Raise MetricsError (one line: the key, the file, where to get it) unless ``path`` is a
    file; None means FD-DINOv2 is not asked for and passes."""
    if path is not None and not os.path.isfile(path):
        raise MetricsError(f"{CONFIG_KEY}: {path!r} not found; {HINT}")


def load_dinov2(path, arch=DEFAULT_ARCH, device="cpu"):
    """timm's ``arch`` with the official DINOv2 checkpoint at ``path``, no head, in eval mode;
    strict loading, so a file of another layout or size is an error, never a random net."""
    import timm

    check_weights(path)
    try:
        net = timm.create_model(arch, pretrained=True, num_classes=0, dynamic_img_size=True,
                                pretrained_cfg_overlay=dict(file=os.fspath(path), source=""))
    except RuntimeError as e:  # missing or mis-shaped keys
        first = str(e).strip().splitlines()[0]
        raise MetricsError(f"{CONFIG_KEY}: {path} does not fit {arch} "
                           f"(evaluation.dinov2_arch): {first}") from None
    return net.eval().requires_grad_(False).to(device)


def preprocess(images_u8):
    """uint8 NHWC (C = 1 or 3) -> float N x 3 x 224 x 224: PIL bicubic resize, [0, 1], ImageNet
    normalisation (dgm-eval's transform)."""
    from PIL import Image

    rgb = images_u8 if images_u8.shape[-1] == 3 else np.repeat(images_u8, 3, axis=-1)
    resized = np.stack([np.asarray(Image.fromarray(x).resize((SIZE, SIZE), Image.BICUBIC))
                        for x in rgb])
    x = torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return (x - mean[:, None, None]) / std[:, None, None]


@torch.no_grad()
def features(net, images_u8, batch=32, device="cpu"):
    """phi(x) of module docstring: (N, d) float64 numpy, in batches of ``batch`` images."""
    out = [net(preprocess(images_u8[i:i + batch]).to(device)).double().cpu()
           for i in range(0, len(images_u8), batch)]
    return torch.cat(out).numpy()


def statistics(phi):
    """(mu, Sigma) of features (N, d), Sigma the unbiased covariance (as clean-fid's
    fid_from_feats computes them)."""
    return phi.mean(axis=0), np.cov(phi, rowvar=False)


def frechet(phi, mu_r, sigma_r):
    """FD between features (N, d) and reference statistics, by clean-fid's formula."""
    from cleanfid.fid import frechet_distance

    mu, sigma = statistics(phi)
    return float(frechet_distance(mu, sigma, mu_r, sigma_r))


class FDDINOv2:
    """FD-DINOv2 of many sample sets against one reference set (its features computed once)."""

    def __init__(self, path, reference_u8, arch=DEFAULT_ARCH, device="cpu", num_threads=None):
        self.path, self.arch, self.device, self.num_threads = path, arch, device, num_threads
        with torch_threads(num_threads):
            self.net = load_dinov2(path, arch, device)
            self.mu_r, self.sigma_r = statistics(features(self.net, reference_u8,
                                                          device=device))

    def __call__(self, samples_u8):
        with torch_threads(self.num_threads):
            phi = features(self.net, samples_u8, device=self.device)
        return frechet(phi, self.mu_r, self.sigma_r)

    def describe(self):
        return f"{self.arch} CLS token, 224 bicubic, weights={os.path.abspath(self.path)}"
