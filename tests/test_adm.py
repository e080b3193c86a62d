"""The ADM U-Net (cmcore.networks.adm): openai's state-dict layout, parameter counts of the
published networks, shapes, noise and class conditioning.

The layout was checked once against openai/consistency_models itself (cm/unet.py, UNetModel
built as cm/script_util.py create_model does, flash-attn replaced by the same attention in plain
PyTorch): identical key lists and shapes for the ImageNet-64 and LSUN-256 networks, and
bitwise-equal outputs for small random networks with and without scale-shift norm, resblock
up/down and class labels, given timesteps 1000 * 0.25 * ln(sigma). Those checks need their code;
the tests below pin what they found.
"""

import math

import pytest
import torch

from cmcore.diffusion.precond import Denoiser
from cmcore.networks import ADM_PRESETS, ADMUNet, build_network, count_parameters
from cmcore.networks.adm import timestep_embedding

SMALL = dict(
    arch="adm",
    img_resolution=16,
    in_channels=3,
    model_channels=32,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[8],
    num_head_channels=32,
    label_dim=10,
)


def randomized(net, seed=0):
    """The network with every parameter random (the zero-initialised output layers included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


def test_small_adm_has_openai_key_names_and_shapes():
    sd = build_network(SMALL).state_dict()
    # Encoder: conv; level 0 (16x16) ResBlock, down-ResBlock; level 1 (8x8) ResBlock + attention.
    # Decoder: 8x8 two ResBlocks on [h, skip] with attention, the second with an up-ResBlock;
    # 16x16 two ResBlocks. Channels: 32 (level 0), 64 (level 1); embedding 4 * 32 = 128.
    expected = {
        "time_embed.0.weight": (128, 32),
        "time_embed.2.weight": (128, 128),
        "label_emb.weight": (10, 128),
        "input_blocks.0.0.weight": (32, 3, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (32,),
        "input_blocks.1.0.in_layers.2.weight": (32, 32, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (64, 128),  # scale and shift: 2 x 32
        "input_blocks.1.0.out_layers.0.bias": (32,),
        "input_blocks.1.0.out_layers.3.weight": (32, 32, 3, 3),
        "input_blocks.2.0.in_layers.2.weight": (32, 32, 3, 3),  # the down-ResBlock
        "input_blocks.3.0.skip_connection.weight": (64, 32, 1, 1),
        "input_blocks.3.1.norm.weight": (64,),
        "input_blocks.3.1.qkv.weight": (192, 64, 1, 1),
        "input_blocks.3.1.proj_out.weight": (64, 64, 1, 1),
        "middle_block.0.emb_layers.1.weight": (128, 128),
        "middle_block.1.qkv.weight": (192, 64, 1, 1),
        "middle_block.2.out_layers.3.weight": (64, 64, 3, 3),
        "output_blocks.0.0.skip_connection.weight": (64, 128, 1, 1),
        "output_blocks.0.1.qkv.bias": (192,),
        "output_blocks.1.0.skip_connection.weight": (64, 96, 1, 1),
        "output_blocks.1.2.in_layers.2.weight": (64, 64, 3, 3),  # the up-ResBlock
        "output_blocks.2.0.skip_connection.weight": (32, 96, 1, 1),
        "output_blocks.3.0.skip_connection.weight": (32, 64, 1, 1),
        "out.0.weight": (32,),
        "out.2.weight": (3, 32, 3, 3),
        "out.2.bias": (3,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    prefixes = (
        "time_embed.",
        "label_emb.",
        "input_blocks.",
        "middle_block.",
        "output_blocks.",
        "out.",
    )
    assert all(k.startswith(prefixes) for k in sd)
    absent = (
        "input_blocks.2.0.skip",
        "output_blocks.1.2.skip",
        "input_blocks.4",
        "output_blocks.4",
    )  # no skip conv in resampling blocks; 4 blocks each way
    assert not any(k.startswith(absent) for k in sd)
    assert "label_emb.weight" not in build_network({**SMALL, "label_dim": 0}).state_dict()


def test_layout_without_scale_shift_and_resblock_updown():
    sd = build_network({**SMALL, "use_scale_shift_norm": False, "resblock_updown": False})
    sd = sd.state_dict()
    assert tuple(sd["input_blocks.1.0.emb_layers.1.weight"].shape) == (32, 128)
    assert tuple(sd["input_blocks.2.0.op.weight"].shape) == (32, 32, 3, 3)  # strided conv
    assert tuple(sd["output_blocks.1.2.conv.weight"].shape) == (64, 64, 3, 3)  # upsampling conv


def adm_parameter_count(image_size, C, mult, blocks, attn_res, classes, scale_shift, channels=3):
    """Parameters of openai's UNetModel, counted layer by layer from its construction
    (cm/unet.py, learn_sigma off, num_head_channels does not change the count)."""
    emb = 4 * C
    norm = 2  # GroupNorm weight and bias per channel

    def conv(ci, co, k):
        return ci * co * k * k + co

    def res(ci, co):
        skip = conv(ci, co, 1) if ci != co else 0
        return (
            norm * ci
            + conv(ci, co, 3)
            + emb * (2 * co if scale_shift else co)
            + (2 * co if scale_shift else co)
            + norm * co
            + conv(co, co, 3)
            + skip
        )

    def attn(c):
        return norm * c + conv(c, 3 * c, 1) + conv(c, c, 1)

    total = (C * emb + emb) + (emb * emb + emb) + classes * emb
    ch = C * mult[0]
    total += conv(channels, ch, 3)
    skips, size = [ch], image_size
    for level, m in enumerate(mult):
        for _ in range(blocks):
            total += res(ch, C * m) + (attn(C * m) if size in attn_res else 0)
            ch = C * m
            skips.append(ch)
        if level < len(mult) - 1:
            total += res(ch, ch)  # resblock_updown
            skips.append(ch)
            size //= 2
    total += 2 * res(ch, ch) + attn(ch)
    for level, m in reversed(list(enumerate(mult))):
        for i in range(blocks + 1):
            total += res(ch + skips.pop(), C * m) + (attn(C * m) if size in attn_res else 0)
            ch = C * m
            if level and i == blocks:
                total += res(ch, ch)
                size *= 2
    return total + norm * ch + conv(ch, channels, 3)


@pytest.mark.parametrize(
    "name, arch_args, expected",
    [
        # openai/consistency_models scripts/launch.sh: ImageNet 64 --num_channels 192
        # --num_res_blocks 3 --attention_resolutions 32,16,8 --class_cond True
        # --use_scale_shift_norm True --resblock_updown True (channel_mult 1,2,3,4 for 64 px).
        ("imagenet64", (64, 192, (1, 2, 3, 4), 3, {32, 16, 8}, 1000, True), 295_899_267),
        # LSUN 256: --num_channels 256 --num_res_blocks 2 --class_cond False
        # --use_scale_shift_norm False (channel_mult 1,1,2,2,4,4 for 256 px).
        ("lsun256", (256, 256, (1, 1, 2, 2, 4, 4), 2, {32, 16, 8}, 0, False), 526_304_771),
    ],
)
def test_published_parameter_counts(name, arch_args, expected):
    assert adm_parameter_count(*arch_args) == expected
    with torch.device("meta"):
        net = build_network(ADM_PRESETS[name])
    assert count_parameters(net) == expected


def test_forward_shapes_and_denoiser():
    net = randomized(build_network({**SMALL, "label_dim": 0}))
    x = torch.randn(2, 3, 16, 16)
    out = net(x, torch.tensor([-1.0, 0.5]))
    assert out.shape == x.shape and out.isfinite().all()
    D = Denoiser(net)
    assert D(x, torch.tensor([0.01, 10.0])).shape == x.shape
    assert isinstance(build_network({**SMALL, "out_channels": None}), ADMUNet)
    assert build_network({**SMALL, "out_channels": 6})(x, torch.zeros(2)).shape == (2, 6, 16, 16)
    with pytest.raises(ValueError, match=r"\[16, 32\] must be multiples of 32 \(GroupNorm"):
        build_network({**SMALL, "model_channels": 16})
    with pytest.raises(ValueError, match="attention width 64 is not a multiple of .* = 48"):
        build_network({**SMALL, "num_head_channels": 48})


def test_noise_input_is_the_openai_timestep():
    """forward embeds t = 1000 c_noise = 1000 * 0.25 ln(sigma) as [cos(t w_j), sin(t w_j)]."""
    t = torch.tensor([0.0, 250.0 * math.log(0.5)])
    e = timestep_embedding(t, 4)
    w = torch.tensor([1.0, 10000**-0.5])
    assert torch.allclose(e, torch.cat([torch.cos(t[:, None] * w), torch.sin(t[:, None] * w)], 1))
    net = randomized(build_network(SMALL))
    c = torch.tensor([math.log(0.5) / 4])
    assert torch.equal(net.embed(c), net.time_embed(timestep_embedding(1000 * c, 32)))


def test_class_labels_change_the_output():
    net = randomized(build_network(SMALL))
    x, c = torch.randn(3, 3, 16, 16), torch.zeros(3)
    y = torch.tensor([1, 2, 3])
    with torch.no_grad():
        out = net(x, c, class_labels=y)
        other = net(x, c, class_labels=torch.tensor([4, 5, 6]))
        onehot = net(x, c, class_labels=torch.nn.functional.one_hot(y, 10).float())
        none = net(x, c)
    assert (out - other).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every sample changes
    assert torch.allclose(out, onehot, atol=1e-5)  # one-hot rows = integer labels
    assert not torch.allclose(out, none)


def test_set_dropout_reaches_every_block():
    """A method's own dropout on a copied network (PD's students): every rate of ADM and
    SongUNet is the new one."""
    from cmcore.networks import set_dropout
    from cmcore.networks.layers import UNetBlock

    song = {"arch": "ddpmpp", "img_resolution": 8, "in_channels": 1, "model_channels": 8,
            "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.1}
    for cfg in (SMALL, song):
        net = set_dropout(build_network(cfg), 0.25)
        rates = [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)] + \
            [m.dropout for m in net.modules() if isinstance(m, UNetBlock)]
        assert len(rates) >= 2 and set(rates) == {0.25}
