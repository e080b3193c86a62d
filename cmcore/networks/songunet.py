"""DDPM++ and NCSN++ backbones F_theta(x, c_noise) (Song et al. 2021, as re-implemented in EDM).

The module layout, parameter names and shapes follow NVlabs/edm's ``SongUNet``
(``training/networks.py``) exactly, so that ``SongUNet(**kwargs).state_dict()`` has the same keys
and shapes as EDM's network built from the same arguments and the published EDM checkpoints
(``EDMPrecond.model``) load with ``strict=True``. The code is our own; behaviour is identical in
fp32 (checked against EDM's implementation, see ``tests/test_networks.py``).

The building blocks live in ``layers.py``.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    Conv2d,
    FourierEmbedding,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    UNetBlock,
)

# ----------------------------------------------------------------------------------------------
# The U-Net.


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ U-Net F_theta(x, c_noise, y, aug) -> tensor of shape (B, out_channels, H, W).

    DDPM++: embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
    resample_filter=(1, 1). NCSN++: "fourier", 2, "residual", (1, 3, 3, 1). Both use
    decoder_type="standard". Argument names and defaults are EDM's.

    Args:
        img_resolution: input and output resolution (square, a power of two).
        in_channels, out_channels: image channels at input and output.
        label_dim: number of classes (0 = unconditional); labels are one-hot float vectors.
        augment_dim: dimension of the augmentation label (0 = none).
        model_channels: base channel count; level ``i`` has model_channels * channel_mult[i].
        channel_mult: per-resolution channel multipliers; len(channel_mult) resolutions.
        channel_mult_emb: embedding width = model_channels * channel_mult_emb.
        num_blocks: residual blocks per resolution in the encoder (decoder: num_blocks + 1).
        attn_resolutions: resolutions with self-attention.
        dropout: dropout inside residual blocks.
        label_dropout: probability of dropping the class label in training (for CFG).
        embedding_type: "positional" or "fourier" noise embedding.
        channel_mult_noise: noise-embedding width = model_channels * channel_mult_noise.
        encoder_type: "standard", "skip" or "residual".
        decoder_type: "standard" or "skip".
        resample_filter: FIR taps used for 2x up/downsampling.
    """

    def __init__(
        self,
        img_resolution,
        in_channels,
        out_channels,
        label_dim=0,
        augment_dim=0,
        model_channels=128,
        channel_mult=(1, 2, 2, 2),
        channel_mult_emb=4,
        num_blocks=4,
        attn_resolutions=(16,),
        dropout=0.10,
        label_dropout=0.0,
        embedding_type="positional",
        channel_mult_noise=1,
        encoder_type="standard",
        decoder_type="standard",
        resample_filter=(1, 1),
    ):
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(
                f"embedding_type must be 'fourier' or 'positional', got {embedding_type!r}"
            )
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(
                f"encoder_type must be 'standard', 'skip' or 'residual', got {encoder_type!r}"
            )
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', got {decoder_type!r}")
        super().__init__()
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        attn_resolutions = set(attn_resolutions)
        resample_filter = list(resample_filter)
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels,
            num_heads=1,
            dropout=dropout,
            skip_scale=math.sqrt(0.5),
            eps=1e-6,
            resample_filter=resample_filter,
            resample_proj=True,
            adaptive_scale=False,
            init=init,
            init_zero=init_zero,
            init_attn=init_attn,
        )

        # Mapping network: noise (+ class + augmentation) embedding -> 2-layer MLP.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = (
            Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        )
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder: input conv, then per level (downsampling block,) num_blocks blocks.
        # Entries named *aux* act on the auxiliary image pyramid of the skip/residual encoders.
        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        caux, caux, kernel=0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux,
                        cout,
                        kernel=3,
                        down=True,
                        resample_filter=resample_filter,
                        fused_resample=True,
                        **init,
                    )
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block_kwargs
                )
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]

        # Decoder: per level (two bottleneck blocks or an upsampling block,) num_blocks + 1
        # blocks fed with concatenated encoder skips, and an output head at level 0.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin,
                    cout,
                    attention=idx == num_blocks and res in attn_resolutions,
                    **block_kwargs,
                )
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        out_channels,
                        out_channels,
                        kernel=0,
                        up=True,
                        resample_filter=resample_filter,
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(
                    cout, out_channels, kernel=3, **init_zero
                )

    def embed(self, noise_labels, class_labels=None, augment_labels=None):
        """Conditioning vector emb = silu(L1 silu(L0 (e(c_noise) + A y + B aug)))."""
        emb = self.map_noise(noise_labels)
        emb = torch.cat(emb.chunk(2, dim=1)[::-1], dim=1)  # DDPM++ order: [sin, cos]
        if self.map_label is not None:
            if class_labels is None:  # no label given: the all-zero (unconditional) label
                class_labels = emb.new_zeros(emb.shape[0], self.label_dim)
            y = class_labels.to(emb.dtype)
            if self.training and self.label_dropout:
                keep = torch.rand([y.shape[0], 1], device=y.device) >= self.label_dropout
                y = y * keep.to(y.dtype)
            emb = emb + self.map_label(y * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        """F_theta(x, c_noise): x (B, in_channels, H, W), noise_labels (B,) -> (B, out, H, W)."""
        emb = self.embed(noise_labels, class_labels, augment_labels)

        # Encoder: keep every non-aux output as a skip; aux layers update the image pyramid.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder: concatenate a skip whenever a block expects more channels than x has;
        # aux_norm / aux_conv form the output head(s), summed across levels for the skip decoder.
        out = None
        head = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                out = block(out)
            elif "aux_norm" in name:
                head = block(x)
            elif "aux_conv" in name:
                head = block(F.silu(head))
                out = head if out is None else head + out
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out
