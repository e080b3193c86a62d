"""DDPM++ and NCSN++ backbones F_theta(x, c_noise) (Song et al. 2021, as re-implemented in EDM).

The module layout, parameter names and shapes follow NVlabs/edm's ``SongUNet``
(``training/networks.py``) exactly, so that ``SongUNet(**kwargs).state_dict()`` has the same keys
and shapes as EDM's network built from the same arguments and the published EDM checkpoints
(``EDMPrecond.model``) load with ``strict=True``. The code is our own; behaviour is identical in
fp32 (checked against EDM's implementation, see ``tests/test_networks.py``).

Layers here (``Linear``, ``Conv2d``, ``GroupNorm``, ``UNetBlock``, the two noise embeddings) are
the EDM building blocks and may be reused by other backbones.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

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
        return F.group_norm(
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
        qkv = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, h * w)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (b * heads, h * w, c_head)
        a = F.scaled_dot_product_attention(q, k, v)  # (b * heads, h * w, c_head)
        return self.proj(a.transpose(1, 2).reshape(b, c, h, w))

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
