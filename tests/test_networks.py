"""Tests for cmcore.networks: EDM state-dict layout, shapes, determinism, the MLP, the registry."""

import math

import pytest
import torch

from cmcore.networks import build_network, count_parameters
from cmcore.networks.layers import Conv2d, UNetBlock

# CIFAR-10 DDPM++: EDM's cifar10 network, as config/cifar10.yaml sets it.
CIFAR_DDPMPP = dict(
    arch="ddpmpp",
    img_resolution=32,
    in_channels=3,
    out_channels=3,
    model_channels=128,
    channel_mult=[2, 2, 2],
    num_blocks=4,
    attn_resolutions=[16],
    dropout=0.13,
)
SMALL = dict(
    arch="ddpmpp",
    img_resolution=8,
    in_channels=1,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    dropout=0.1,
)


@pytest.fixture(scope="module")
def cifar_state_dict():
    # Built on the meta device: shapes only, no memory or init time.
    with torch.device("meta"):
        net = build_network(CIFAR_DDPMPP)
    return net, net.state_dict()


def test_cifar_ddpmpp_parameter_count(cifar_state_dict):
    net, _ = cifar_state_dict
    # Checked against NVlabs/edm's SongUNet (training/networks.py) built with the same arguments.
    assert count_parameters(net) == 55_732_739


def test_cifar_ddpmpp_edm_keys_and_shapes(cifar_state_dict):
    _, sd = cifar_state_dict
    # Names and shapes read off NVlabs/edm's SongUNet state dict (424 entries).
    expected = {
        "map_layer0.weight": (512, 128),
        "map_layer1.bias": (512,),
        "enc.32x32_conv.weight": (128, 3, 3, 3),
        "enc.16x16_down.conv0.resample_filter": (1, 1, 2, 2),
        "enc.16x16_down.skip.weight": (256, 256, 1, 1),
        "enc.16x16_block0.affine.weight": (256, 512),
        "enc.16x16_block0.qkv.weight": (768, 256, 1, 1),
        "enc.16x16_block3.proj.bias": (256,),
        "dec.8x8_in0.qkv.bias": (768,),
        "dec.16x16_up.skip.resample_filter": (1, 1, 2, 2),
        "dec.16x16_block0.conv0.weight": (256, 512, 3, 3),
        "dec.32x32_block4.skip.weight": (256, 384, 1, 1),
        "dec.32x32_aux_norm.weight": (256,),
        "dec.32x32_aux_conv.weight": (3, 256, 3, 3),
    }
    assert len(sd) == 424
    for key, shape in expected.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    # No attention where EDM has none, and no noise-embedding state for the positional embedding.
    assert "enc.32x32_block0.qkv.weight" not in sd
    assert not any(k.startswith("map_noise") for k in sd)


def test_ncsnpp_edm_layout():
    net = build_network(
        dict(
            arch="ncsnpp",
            img_resolution=16,
            in_channels=3,
            model_channels=32,
            channel_mult=[1, 2, 2],
            num_blocks=2,
            attn_resolutions=[8],
        )
    )
    sd = net.state_dict()
    assert len(sd) == 287
    assert count_parameters(net) == 1_777_635  # also checked against NVlabs/edm's SongUNet
    assert tuple(sd["map_noise.freqs"].shape) == (32,)
    assert tuple(sd["enc.4x4_aux_residual.weight"].shape) == (64, 32, 3, 3)
    f = sd["enc.8x8_aux_residual.resample_filter"]
    assert torch.allclose(f[0, 0, 0], torch.tensor([1, 3, 3, 1]) / 64)


def test_output_shape_and_finite():
    torch.manual_seed(0)
    net = build_network(SMALL)
    x = torch.randn(5, 1, 8, 8)
    y = net(x, torch.randn(5))
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


def test_eval_is_deterministic_and_train_uses_dropout():
    torch.manual_seed(0)
    net = build_network(SMALL)
    # Perturb the zero-initialised output layers so that the output depends on everything.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, c = torch.randn(4, 1, 8, 8), torch.randn(4)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x, c), net(x, c))
    net.train()
    with torch.no_grad():
        assert not torch.equal(net(x, c), net(x, c))


def test_class_labels_default_to_zero_label():
    torch.manual_seed(0)
    net = build_network({**SMALL, "label_dim": 3}).eval()
    x, c = torch.randn(2, 1, 8, 8), torch.randn(2)
    with torch.no_grad():
        assert torch.equal(net(x, c), net(x, c, torch.zeros(2, 3)))


@pytest.mark.parametrize("up", [False, True])
def test_box_filter_fast_path_matches_fir(up):
    # The [1, 1] fast path (avg-pool / nearest) must equal the generic FIR (de)convolution.
    torch.manual_seed(0)
    conv = Conv2d(4, 6, kernel=3, up=up, down=not up, resample_filter=[1, 1])
    x = torch.randn(2, 4, 8, 8)
    fast = conv(x)
    conv.box = False
    assert torch.allclose(fast, conv(x), atol=1e-6)


def test_attention_matches_softmax_formula():
    # Pins EDM's qkv channel layout (channel, {q, k, v}) and the 1/sqrt(c) scale.
    torch.manual_seed(0)
    block = UNetBlock(8, 8, emb_channels=4, attention=True, num_heads=1)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(2, 8, 4, 4)
    qkv = block.qkv(block.norm2(x)).reshape(2, 8, 3, 16)
    q, k, v = qkv.unbind(2)
    w = torch.softmax(torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(8), dim=2)
    expected = block.proj(torch.einsum("nqk,nck->ncq", w, v).reshape(x.shape))
    assert torch.allclose(block.attention(x), expected, atol=1e-5)


def test_mlp_output_shape():
    torch.manual_seed(0)
    net = build_network(dict(arch="mlp", in_channels=2, hidden=32, depth=2))
    y = net(torch.randn(7, 2), torch.rand(7))
    assert y.shape == (7, 2)
    assert torch.equal(y, torch.zeros(7, 2))  # output layer starts at zero
    assert count_parameters(net) > 0


def test_unknown_arch_error():
    with pytest.raises(
        ValueError,
        match=r"network\.arch must be one of \['adm', 'ddpmpp', 'mlp', "
        r"'ncsnpp'\], got 'resnet'",
    ):
        build_network({"arch": "resnet"})
