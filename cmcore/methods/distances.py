"""Distances d(x, y) >= 0 between batches, one value per sample (shape (B,)).

l2 is the squared Euclidean distance as in the paper (Section 6.1) and the official code,
averaged over dimensions so learning rates transfer across resolutions; l1 likewise.
"""

import os

import torch
import torch.nn.functional as F


def l2(x, y):
    """d(x, y) = ||x - y||_2^2 / dim."""
    return (x - y).square().flatten(1).mean(1)


def l1(x, y):
    """d(x, y) = ||x - y||_1 / dim."""
    return (x - y).abs().flatten(1).mean(1)


def pseudo_huber(x, y, c=None):
    """d(x, y) = sqrt(||x - y||_2^2 + c^2) - c, c = 0.00054 sqrt(dim) by default (iCT)."""
    dim = x[0].numel()
    c = 0.00054 * dim**0.5 if c is None else c
    return ((x - y).square().flatten(1).sum(1) + c**2).sqrt() - c


_HUB_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


def lpips_backbone_available(net="alex"):
    """True when torchvision's ImageNet weights for the LPIPS backbone are in the hub cache."""
    hub = os.path.join(torch.hub.get_dir(), "checkpoints", _HUB_FILES[net])
    return os.path.isfile(hub)


class LPIPS(torch.nn.Module):
    """d(x, y) = LPIPS(up(x), up(y)): inputs in [-1, 1] resized bilinearly to 224 (paper, App. C).

    ``backbone='pretrained'`` needs torchvision's weights in the torch hub cache (no download
    happens here); ``'random'`` uses a randomly initialised backbone and must be reported so.
    ``resize`` replaces the paper's 224 px (AlexNet accepts 32 px and up), for cheap runs.
    """

    def __init__(self, net="alex", backbone="pretrained", resize=224):
        super().__init__()
        self.resize = resize
        import lpips

        if backbone == "pretrained" and not lpips_backbone_available(net):
            hub = os.path.join(torch.hub.get_dir(), "checkpoints", _HUB_FILES[net])
            raise FileNotFoundError(
                f"LPIPS needs the {net} backbone weights at {hub} (copy them from a machine with "
                "internet, or set distance_options.lpips_backbone: random, labelled as such)"
            )
        self.net = lpips.LPIPS(net=net, pnet_rand=backbone == "random", verbose=False)
        self.net.requires_grad_(False).eval()

    def forward(self, x, y):
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        if x.shape[-1] < 256:
            x = F.interpolate(x, size=self.resize, mode="bilinear", align_corners=False)
            y = F.interpolate(y, size=self.resize, mode="bilinear", align_corners=False)
        return self.net(x, y).flatten()


DISTANCES = ("l1", "l2", "pseudo_huber", "lpips")


def get_distance(name, lpips_backbone="pretrained", lpips_resize=224):
    """The distance called ``name``: one of DISTANCES."""
    if name == "l1":
        return l1
    if name == "l2":
        return l2
    if name == "pseudo_huber":
        return pseudo_huber
    if name == "lpips":
        return LPIPS(backbone=lpips_backbone, resize=lpips_resize)
    raise ValueError(f"unknown distance {name!r}; choose one of {list(DISTANCES)}")
