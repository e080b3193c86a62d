"""forward_mode(): group norm's analytic JVP against torch's own forward-AD rule, its gradients
against F.group_norm's, and whole U-Net JVPs (SongUNet with attention, the ADM U-Net) against
the JVP torch computes without it."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from cmcore.diffusion.precond import ConsistencyFunction
from cmcore.methods.continuous import total_derivative
from cmcore.networks import build_network
from cmcore.networks.forward_mode import forward_mode, group_norm


def _inputs(layout, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 12, 5, 4, generator=g, dtype=dtype) * 2 + 0.5
    w = torch.randn(12, generator=g, dtype=dtype)
    b = torch.randn(12, generator=g, dtype=dtype)
    tangents = [torch.randn(t.shape, generator=g, dtype=dtype) for t in (x, w, b)]
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        tangents[0] = tangents[0].contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor: contiguous in no format
        x, tangents[0] = (torch.stack([t, t], -1).flatten(-2)[..., ::2] for t in (x, tangents[0]))
    return (x, w, b), tangents


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("wrt", ["x", "x_w_b"])
def test_group_norm_jvp_is_torchs_rule(layout, wrt):
    (x, w, b), (dx, dw, db) = _inputs(layout)
    if wrt == "x":  # the parameters are constants: the case of a JVP through a network
        def ours(x):
            return group_norm(x, 3, w, b, 1e-5)

        def torchs(x):
            return F.group_norm(x, 3, w, b, 1e-5)
        primals, tangents = (x,), (dx,)
    else:
        def ours(x, w, b):
            return group_norm(x, 3, w, b, 1e-5)

        def torchs(x, w, b):
            return F.group_norm(x, 3, w, b, 1e-5)
        primals, tangents = (x, w, b), (dx, dw, db)
    with forward_mode():
        y, dy = jvp(ours, primals, tangents)
    y_ref, dy_ref = jvp(torchs, primals, tangents)
    assert torch.equal(y, y_ref)
    assert dy_ref.abs().max() > 1
    torch.testing.assert_close(dy, dy_ref, rtol=1e-12, atol=1e-12)


def test_group_norm_gradients_in_forward_mode_are_native():
    (x, w, b), (gy, _, _) = _inputs("channels_last", torch.float32)
    grads = []
    for mode in (forward_mode, torch.enable_grad):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
        with mode():
            y = group_norm(*leaves[:1], 3, *leaves[1:], 1e-5)
        y.backward(gy)
        grads.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


UNETS = {
    "songunet": dict(arch="ddpmpp", img_resolution=8, in_channels=1, model_channels=16,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0),
    "adm": dict(arch="adm", img_resolution=8, in_channels=3, model_channels=32,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], num_head_channels=32),
}


@pytest.mark.parametrize("arch, dtype, tol", [("songunet", torch.float64, 1e-10),
                                             ("adm", torch.float32, 1e-5)])
def test_unet_jvp_in_forward_mode_equals_torchs(arch, dtype, tol):
    """(The ADM U-Net embeds time in float32, as openai's does: it is checked in float32.)"""
    torch.manual_seed(0)
    f = ConsistencyFunction(build_network(UNETS[arch])).to(dtype).eval()
    with torch.no_grad():  # every weight random, the zero-initialised outputs included
        for p in f.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    c = UNETS[arch]["in_channels"]
    x_t, v = torch.randn(4, c, 8, 8, dtype=dtype), torch.randn(4, c, 8, 8, dtype=dtype)
    t = torch.tensor([0.01, 0.3, 2.0, 40.0], dtype=dtype)
    f_t, df_dt = total_derivative(f, x_t, t, v)  # in forward_mode()
    with sdpa_kernel(SDPBackend.MATH):
        f_ref, df_ref = jvp(f, (x_t, t), (v, torch.ones_like(t)))
    assert torch.equal(f_t, f_ref)
    assert df_ref.abs().max() > 0.1
    torch.testing.assert_close(df_dt, df_ref, rtol=tol, atol=tol * df_ref.abs().max().item())
