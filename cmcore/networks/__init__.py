"""Backbones F_theta(x, noise_labels, class_labels=None, augment_labels=None) -> shaped like x.

``build_network(cfg)`` turns the ``network`` config section into a module:

    {"arch": "ddpmpp", "img_resolution": 32, "in_channels": 3, "model_channels": 128, ...}

Architecture presets (as EDM's train.py sets them; keys given in cfg override them):
    ddpmpp: SongUNet, positional embedding, standard encoder/decoder, channel_mult_noise 1,
            resample_filter [1, 1].
    ncsnpp: SongUNet, Fourier embedding, residual encoder, standard decoder,
            channel_mult_noise 2, resample_filter [1, 3, 3, 1].
    adm:    ADMUNet of openai/consistency_models (ImageNet 64, LSUN 256); ADM_PRESETS holds the
            published sizes. Its forward embeds 1000 * c_noise, the openai time input.
    mlp:    MLP for 2-D data (in_channels, hidden, depth, label_dim).
"""

from torch import nn

from .adm import ADM_PRESETS, ADMUNet
from .layers import UNetBlock
from .mlp import MLP
from .songunet import SongUNet

__all__ = [
    "ADM_PRESETS",
    "ARCHS",
    "ADMUNet",
    "MLP",
    "SongUNet",
    "build_network",
    "count_parameters",
    "set_dropout",
]

# Per-architecture (class, default constructor kwargs).
ARCHS = {
    "ddpmpp": (
        SongUNet,
        dict(
            embedding_type="positional",
            encoder_type="standard",
            decoder_type="standard",
            channel_mult_noise=1,
            resample_filter=[1, 1],
        ),
    ),
    "ncsnpp": (
        SongUNet,
        dict(
            embedding_type="fourier",
            encoder_type="residual",
            decoder_type="standard",
            channel_mult_noise=2,
            resample_filter=[1, 3, 3, 1],
        ),
    ),
    "adm": (ADMUNet, {}),
    "mlp": (MLP, {}),
}


def build_network(cfg: dict) -> nn.Module:
    """Build the backbone named by cfg["arch"]; all other keys are constructor arguments.

    For the U-Nets, ``out_channels`` defaults to ``in_channels``.
    """
    kwargs = dict(cfg)
    arch = kwargs.pop("arch", None)
    if arch not in ARCHS:
        raise ValueError(f"network.arch must be one of {sorted(ARCHS)}, got {arch!r}")
    cls, preset = ARCHS[arch]
    kwargs = {**preset, **kwargs}
    if cls in (SongUNet, ADMUNet) and "in_channels" in kwargs:
        kwargs.setdefault("out_channels", kwargs["in_channels"])
    return cls(**kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def set_dropout(model: nn.Module, p: float) -> nn.Module:
    """Every dropout rate inside ``model`` set to p (SongUNet's blocks keep theirs as a float,
    ADM's as nn.Dropout): a method's own dropout on a network copied from another run."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(m, UNetBlock):
            m.dropout = p
    return model
