"""ADM U-Net F_theta(x, c_noise, y) (Dhariwal & Nichol 2021), the backbone of the ImageNet 64 and
LSUN 256 models of openai/consistency_models.

The module tree, parameter names and shapes follow openai's ``UNetModel`` (``cm/unet.py`` of
openai/consistency_models) with ``learn_sigma=False``, so the published state dicts
(``edm_imagenet64_ema.pt``, ``cd_imagenet64_lpips.pt``, ``edm_bedroom256_ema.pt``, ...) load with
``strict=True``:

    time_embed.{0,2}                        Linear(C, 4C), Linear(4C, 4C) (1 is SiLU)
    label_emb                               Embedding(label_dim, 4C), class-conditional only
    input_blocks.0.0                        3x3 conv, in_channels -> C * channel_mult[0]
    input_blocks.i.0                        ResBlock (or down-ResBlock / Downsample op)
    input_blocks.i.1                        AttentionBlock where the resolution asks for one
    middle_block.{0,1,2}                    ResBlock, AttentionBlock, ResBlock
    output_blocks.i.{0,1,2}                 ResBlock, [AttentionBlock], [up-ResBlock / Upsample]
    out.{0,2}                               GroupNorm, 3x3 conv -> out_channels (1 is SiLU)
    ResBlock: in_layers.{0,2}, emb_layers.1, out_layers.{0,3}, skip_connection (1x1, if needed)
    AttentionBlock: norm, qkv (1x1 conv, 3C x C x 1 x 1), proj_out (1x1 conv)

The attention splits qkv channels as (3, heads, head_channels), as the consistency_models code
does (flash attention, ``b (three h d) s``); guided-diffusion's legacy order differs. The code is
our own.

Noise conditioning. Our wrappers (cmcore.diffusion.precond) call F(c_in x, c_noise) with the EDM
label c_noise = ln(sigma) / 4. The openai code feeds its U-Net ``rescaled_t = 1000 * 0.25 *
ln(sigma + 1e-44)`` (``KarrasDenoiser.denoise`` in ``cm/karras_diffusion.py``, for the EDM
teacher and the consistency model alike, with the same c_skip, c_out, c_in), so ``forward``
embeds t = 1000 c_noise with the sinusoidal embedding [cos(t w_j), sin(t w_j)],
w_j = 10000^(-j / (C/2)). A published checkpoint thus sees the input it was trained with (the
1e-44 is far below float32 resolution at sigma >= 0.002).

Class labels: integer labels (B,) or one-hot rows (B, label_dim) (EDM's convention); a one-hot
row y adds y @ label_emb.weight, the same as the embedding lookup. A class-conditional network
called without labels adds nothing (the all-zero label), as SongUNet does.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .forward_mode import group_norm

# The published architectures (openai/consistency_models, scripts/launch.sh; learn_sigma off).
ADM_PRESETS = {
    "imagenet64": dict(
        arch="adm",
        img_resolution=64,
        in_channels=3,
        out_channels=3,
        label_dim=1000,
        model_channels=192,
        channel_mult=[1, 2, 3, 4],
        num_blocks=3,
        attn_resolutions=[32, 16, 8],
        num_head_channels=64,
        use_scale_shift_norm=True,
        resblock_updown=True,
        dropout=0.1,
    ),
    "lsun256": dict(
        arch="adm",
        img_resolution=256,
        in_channels=3,
        out_channels=3,
        label_dim=0,
        model_channels=256,
        channel_mult=[1, 1, 2, 2, 4, 4],
        num_blocks=2,
        attn_resolutions=[32, 16, 8],
        num_head_channels=64,
        use_scale_shift_norm=False,
        resblock_updown=True,
        dropout=0.1,
    ),
}


def timestep_embedding(t, dim, max_period=10000):
    """[cos(t w_j), sin(t w_j)] with w_j = max_period^(-j / half), j < half = dim // 2."""
    half = dim // 2
    w = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * w.to(t.device)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _zeroed(module):
    """Zero a layer's weight and bias (the output layers of every residual branch)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups, computed in float32 and returned in the input's dtype."""

    def __init__(self, channels):
        super().__init__(32, channels)

    def forward(self, x):
        return group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


def _resample(x, mode):
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return x


class ResBlock(nn.Module):
    """h = conv(silu(norm(x))) [resampled before the conv]; then either
    h = conv(dropout(silu(norm(h) (1 + s) + b))) with (s, b) = L(silu(emb)) (scale-shift) or
    h = conv(dropout(silu(norm(h + L(silu(emb)))))); out = skip(x) + h."""

    def __init__(self, cin, cout, emb_channels, dropout, scale_shift, resample=None):
        super().__init__()
        self.scale_shift, self.resample = scale_shift, resample
        conv_in = nn.Conv2d(cin, cout, 3, padding=1)
        self.in_layers = nn.Sequential(GroupNorm32(cin), nn.SiLU(), conv_in)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * cout if scale_shift else cout)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(cout),
            nn.SiLU(),
            nn.Dropout(dropout),
            _zeroed(nn.Conv2d(cout, cout, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.in_layers[1](self.in_layers[0](x))
        h, x = _resample(h, self.resample), _resample(x, self.resample)
        h = self.in_layers[2](h)
        e = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """x + proj(softmax(q k^T / sqrt(d)) v) per head, q, k, v = 1x1 conv of norm(x)."""

    def __init__(self, channels, head_channels):
        super().__init__()
        if channels % head_channels:
            raise ValueError(
                f"attention width {channels} is not a multiple of "
                f"num_head_channels = {head_channels}"
            )
        self.heads = channels // head_channels
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = _zeroed(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # each (B, heads, HW, d)
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(a.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Stride-2 3x3 conv (key ``op``); used when resblock_updown is off."""

    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 conv (key ``conv``); used when resblock_updown is off."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(_resample(x, "up"))


class EmbedSequential(nn.Sequential):
    """A sequence of layers; residual blocks also receive the embedding."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ADMUNet(nn.Module):
    """ADM U-Net F_theta(x, c_noise, y) -> (B, out_channels, H, W); see the module docstring.

    Args (defaults: the ImageNet-64 network but unconditional; ADM_PRESETS has both published):
        img_resolution: input resolution (square).
        in_channels, out_channels: image channels (out_channels defaults to in_channels).
        label_dim: number of classes (openai's num_classes); 0 = unconditional.
        model_channels: base width C; level i has C * channel_mult[i] channels.
        channel_mult: per-resolution multipliers; len(channel_mult) resolutions.
        num_blocks: residual blocks per resolution in the encoder (decoder: num_blocks + 1).
        attn_resolutions: resolutions (not downsampling rates) with self-attention.
        dropout: dropout in the residual blocks.
        num_head_channels: channels per attention head.
        use_scale_shift_norm: FiLM-like conditioning norm(h) (1 + s) + b instead of h + b.
        resblock_updown: resample with residual blocks instead of a strided / upsampling conv.
    """

    def __init__(
        self,
        img_resolution,
        in_channels,
        out_channels=None,
        label_dim=0,
        model_channels=192,
        channel_mult=(1, 2, 3, 4),
        num_blocks=3,
        attn_resolutions=(32, 16, 8),
        dropout=0.0,
        num_head_channels=64,
        use_scale_shift_norm=True,
        resblock_updown=True,
    ):
        super().__init__()
        self.img_resolution, self.in_channels = img_resolution, in_channels
        self.out_channels = out_channels or in_channels
        self.label_dim, self.model_channels = label_dim, model_channels
        C, emb = model_channels, 4 * model_channels
        if any(C * m % 32 for m in channel_mult):
            raise ValueError(
                f"adm: model_channels * channel_mult = {[C * m for m in channel_mult]}"
                " must be multiples of 32 (GroupNorm with 32 groups)"
            )
        attn = set(attn_resolutions)

        def block(cin, cout, resample=None):
            return ResBlock(cin, cout, emb, dropout, use_scale_shift_norm, resample)

        self.time_embed = nn.Sequential(nn.Linear(C, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Embedding(label_dim, emb) if label_dim else None

        # Encoder: input conv; per level num_blocks blocks (+ attention), then a downsampling.
        ch = C * channel_mult[0]
        conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.input_blocks = nn.ModuleList([EmbedSequential(conv_in)])
        skips, res = [ch], img_resolution
        for level, mult in enumerate(channel_mult):
            for _ in range(num_blocks):
                layers = [block(ch, C * mult)]
                ch = C * mult
                if res in attn:
                    layers.append(AttentionBlock(ch, num_head_channels))
                self.input_blocks.append(EmbedSequential(*layers))
                skips.append(ch)
            if level < len(channel_mult) - 1:
                down = block(ch, ch, "down") if resblock_updown else Downsample(ch)
                self.input_blocks.append(EmbedSequential(down))
                skips.append(ch)
                res //= 2

        self.middle_block = EmbedSequential(
            block(ch, ch), AttentionBlock(ch, num_head_channels), block(ch, ch)
        )

        # Decoder: per level num_blocks + 1 blocks on [h, skip] (+ attention), then upsampling.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_blocks + 1):
                layers = [block(ch + skips.pop(), C * mult)]
                ch = C * mult
                if res in attn:
                    layers.append(AttentionBlock(ch, num_head_channels))
                if level and i == num_blocks:
                    layers.append(block(ch, ch, "up") if resblock_updown else Upsample(ch))
                    res *= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), _zeroed(nn.Conv2d(ch, self.out_channels, 3, padding=1))
        )

    def embed(self, noise_labels, class_labels=None):
        """emb = MLP(e(1000 c_noise)) (+ label embedding); the openai time input, see above."""
        emb = self.time_embed(timestep_embedding(1000 * noise_labels, self.model_channels))
        if self.label_emb is not None and class_labels is not None:
            if class_labels.ndim == 1:  # integer labels, as the openai code passes them
                emb = emb + self.label_emb(class_labels.long())
            else:  # one-hot rows (EDM's convention)
                emb = emb + class_labels.to(emb.dtype) @ self.label_emb.weight
        return emb

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        """F_theta(x, c_noise): x (B, C, H, W), noise_labels (B,) -> (B, out_channels, H, W).

        ``augment_labels`` is accepted for the common backbone signature and ignored.
        """
        emb = self.embed(noise_labels, class_labels).to(x.dtype)
        h, hs = x, []
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
