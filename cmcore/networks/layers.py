"""EDM's building blocks (NVlabs/edm, training/networks.py), re-implemented with the same
parameter names and shapes: Linear, Conv2d with FIR resampling, GroupNorm, UNetBlock and the
positional and Fourier noise embeddings. Used by SongUNet and the MLP."""


import math

import torch
import torch.nn.functional as F
from torch import nn

from .forward_mode import group_norm

# ----------------------------------------------------------------------------------------------
# Weight initialisation.


def weight_init(shape, mode, fan_in, fan_out):
    """Random tensor of ``shape`` from one of EDM's four init schemes (unit ``init_weight``)."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}")


# ----------------------------------------------------------------------------------------------
# Basic layers.


class Linear(nn.Module):
    """Fully connected layer y = x W^T + b with EDM's initialisation (keys: weight, bias)."""

    def __init__(
        self,
        in_features,
        out_features,
        bias=True,
        init_mode="kaiming_normal",
        init_weight=1.0,
        init_bias=0.0,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), b)


def _resample_kernel(resample_filter):
    """Separable 2-D FIR kernel f f^T / (sum f)^2, shaped (1, 1, k, k)."""
    f = torch.as_tensor(resample_filter, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square())[None, None]


class Conv2d(nn.Module):
    """k x k convolution with optional FIR 2x up- or downsampling before it.

    ``kernel=0`` gives a pure resampling layer with no weights. With ``fused_resample`` the
    downsampling happens after the convolution and upsampling before it, as in EDM. The FIR
    kernel is stored as the buffer ``resample_filter`` only when the layer resamples.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel,
        bias=True,
        up=False,
        down=False,
        resample_filter=(1, 1),
        fused_resample=False,
        init_mode="kaiming_normal",
        init_weight=1.0,
        init_bias=0.0,
    ):
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(
            mode=init_mode,
            fan_in=in_channels * kernel * kernel,
            fan_out=out_channels * kernel * kernel,
        )
        self.weight = None
        self.bias = None
        if kernel:
            shape = [out_channels, in_channels, kernel, kernel]
            self.weight = nn.Parameter(weight_init(shape, **fans) * init_weight)
            if bias:
                self.bias = nn.Parameter(weight_init([out_channels], **fans) * init_bias)
        self.register_buffer(
            "resample_filter", _resample_kernel(resample_filter) if up or down else None
        )
        # The 2-tap box filter [1, 1] is exactly 2x2 average pooling / nearest upsampling.
        self.box = list(resample_filter) == [1, 1]

    def _down(self, x, channels, pad):
        """Depthwise FIR filter and stride-2 subsampling."""
        if self.box and pad == 0:
            return F.avg_pool2d(x, 2)
        f = self.resample_filter.to(x.dtype).expand(channels, 1, -1, -1)
        return F.conv2d(x, f, groups=channels, stride=2, padding=pad)

    def _up(self, x, channels, pad):
        """Zero-insertion 2x upsampling followed by the FIR filter (gain 4)."""
        if self.box and pad == 0:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        f = self.resample_filter.to(x.dtype).mul(4).expand(channels, 1, -1, -1)
        return F.conv_transpose2d(x, f, groups=channels, stride=2, padding=pad)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (self.resample_filter.shape[-1] - 1) // 2 if self.up or self.down else 0

        if self.fused_resample and self.up and w is not None:
            # Upsample first, letting the FIR padding absorb part of the conv padding.
            x = self._up(x, self.in_channels, max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, b, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            # Convolve at full resolution, then filter and subsample.
            x = F.conv2d(x, w, b, padding=w_pad + f_pad)
            x = self._down(x, self.out_channels, 0)
        else:
            # Resample (if asked), then convolve (if the layer has weights).
            if self.up:
                x = self._up(x, self.in_channels, f_pad)
            if self.down:
                x = self._down(x, self.in_channels, f_pad)
            if w is not None:
                x = F.conv2d(x, w, b, padding=w_pad)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with min(num_groups, C // min_channels_per_group) groups."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return group_norm(
            x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps
        )


# ----------------------------------------------------------------------------------------------
# Residual block with optional resampling and self-attention.


class UNetBlock(nn.Module):
    """EDM's unified U-Net block: residual conv pair conditioned on emb, then optional attention.

    h = conv1(dropout(silu(norm1(conv0(silu(norm0(x))) + A emb))));  x' = (h + skip(x)) * s;
    with attention: x'' = (proj(attn(qkv(norm2(x')))) + x') * s, where s = ``skip_scale``.
    ``adaptive_scale`` uses scale/shift modulation norm1(.) * (1 + a) + b instead of the add.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        emb_channels,
        up=False,
        down=False,
        attention=False,
        num_heads=None,
        channels_per_head=64,
        dropout=0.0,
        skip_scale=1.0,
        eps=1e-5,
        resample_filter=(1, 1),
        resample_proj=False,
        adaptive_scale=True,
        init=None,
        init_zero=None,
        init_attn=None,
    ):
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0)
        init_attn = init_attn if init_attn is not None else init
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if num_heads is None:
            num_heads = out_channels // channels_per_head
        self.num_heads = num_heads if attention else 0
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        # Main branch: norm0 -> conv0 (resamples) -> emb injection -> norm1 -> conv1.
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(
            in_channels,
            out_channels,
            kernel=3,
            up=up,
            down=down,
            resample_filter=resample_filter,
            **init,
        )
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        # Shortcut: 1x1 projection when channels change (or resample_proj), resampled like conv0.
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(
                in_channels,
                out_channels,
                kernel=kernel,
                up=up,
                down=down,
                resample_filter=resample_filter,
                **init,
            )

        # Self-attention over all pixels.
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def attention(self, x):
        """Multi-head dot-product self-attention softmax(q^T k / sqrt(c)) v over H*W positions."""
        b, c, h, w = x.shape
        # qkv channels are laid out as (head, channel, {q,k,v}), as in EDM.
        qkv = self.qkv(self.norm2(x)).reshape(b, self.num_heads, c // self.num_heads, 3, h * w)
        # 4-D, contiguous (b, heads, h * w, c_head) inputs let SDPA pick a fused kernel on CUDA.
        q, k, v = qkv.permute(3, 0, 1, 4, 2).contiguous().unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # (b, heads, h * w, c_head)
        return self.proj(a.permute(0, 1, 3, 2).reshape(b, c, h, w))

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))

        # Inject the embedding: additive bias, or adaptive scale and shift.
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))

        # Second conv, residual sum, variance-preserving scale.
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            x = (self.attention(x) + x) * self.skip_scale
        return x


# ----------------------------------------------------------------------------------------------
# Noise-level embeddings.


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding [cos(c w_i), sin(c w_i)], w_i = P^(-i / (n/2 - endpoint)), P = 10^4."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device)
        freqs = (1 / self.max_positions) ** (freqs / (half - (1 if self.endpoint else 0)))
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi c w_i), sin(2 pi c w_i)], w_i ~ N(0, scale^2)."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)
