"""The kernels forward-mode AD (torch.func.jvp) takes through the networks.

    with forward_mode(): jvp(f, primals, tangents)

Inside, attention runs on SDPA's math kernel (the fused kernels have no forward-mode
derivative) and group normalisation takes the analytic JVP of ``GroupNormJVP``. Outside,
``group_norm`` is F.group_norm itself, so nothing but a JVP changes.

Group norm's Jacobian, per sample and group of n elements with x_hat = (x - mu) r, r = rstd:
    dy = w * P dx,   P = r (I - 1 1^T / n - x_hat x_hat^T / n)
P is symmetric, so P dx is what GN's backward returns for the incoming gradient dx without
weight: one fused native kernel instead of the dozen ops of torch's generic forward-AD rule,
about half of a JVP's time on the embedded default (tests/test_forward_mode.py checks it).
"""

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_ACTIVE = contextvars.ContextVar("forward_mode", default=False)


@contextlib.contextmanager
def forward_mode():
    """SDPA's math kernel and the analytic group-norm JVP for the JVPs taken inside."""
    token = _ACTIVE.set(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        _ACTIVE.reset(token)


def group_norm(x, num_groups, weight, bias, eps):
    """F.group_norm; inside forward_mode() (and outside autocast), through GroupNormJVP."""
    if _ACTIVE.get() and not torch.is_autocast_enabled(x.device.type):
        x = x.contiguous(memory_format=_memory_format(x))  # as the native kernels take it
        return GroupNormJVP.apply(x, weight, bias, num_groups, eps)[0]
    return F.group_norm(x, num_groups, weight, bias, eps)


def _memory_format(x):
    """The layout group norm's native kernels take x in (channels-last when x is)."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last and not x.is_contiguous() \
        else torch.contiguous_format


class GroupNormJVP(torch.autograd.Function):
    """y = w (x - mu_g) r_g + b with torch's native forward and backward kernels (so gradients
    are those of F.group_norm) and the JVP dy = w P dx + x_hat dw + db (module docstring).
    x: contiguous in its memory format (group_norm passes it so). Returns (y, mu, r); mu and r
    are not differentiable."""

    @staticmethod
    def forward(x, weight, bias, num_groups, eps):
        N, C = x.shape[:2]
        return torch.ops.aten.native_group_norm(x, weight, bias, N, C, x[0, 0].numel(),
                                                num_groups, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, num_groups, _ = inputs
        _, mu, r = output
        ctx.save_for_backward(x, weight, mu, r)
        ctx.save_for_forward(x, weight, mu, r)
        ctx.num_groups = num_groups
        ctx.mark_non_differentiable(mu, r)
        ctx.set_materialize_grads(False)  # absent tangents (the parameters') stay None

    @staticmethod
    def _native_backward(ctx, gy, weight, mask):
        x, _, mu, r = ctx.saved_tensors
        N, C = x.shape[:2]
        gy = gy.contiguous(memory_format=_memory_format(x))
        return torch.ops.aten.native_group_norm_backward(gy, x, mu, r, weight, N, C,
                                                         x[0, 0].numel(), ctx.num_groups, mask)

    @staticmethod
    def backward(ctx, gy, _gmu, _gr):
        if gy is None:
            return None, None, None, None, None
        weight = ctx.saved_tensors[1]
        gx, gw, gb = GroupNormJVP._native_backward(ctx, gy, weight, list(ctx.needs_input_grad[:3]))
        return gx, gw, gb, None, None

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, _num_groups, _eps):
        x, weight, mu, r = ctx.saved_tensors
        channel = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        dy = None
        if dx is not None:  # w P dx: GN's backward of dx with no weight, then w
            Pdx = GroupNormJVP._native_backward(ctx, dx, None, [True, False, False])[0]
            dy = Pdx if weight is None else Pdx * weight.reshape(channel)
        if dweight is not None:  # x_hat dw
            groups = (x.shape[0], ctx.num_groups, -1)
            x_hat = ((x.reshape(groups) - mu.reshape(*groups[:2], 1)) * r.reshape(*groups[:2], 1))
            term = x_hat.reshape(x.shape) * dweight.reshape(channel)
            dy = term if dy is None else dy + term
        if dbias is not None:
            term = dbias.reshape(channel).expand(x.shape)
            dy = term if dy is None else dy + term
        return dy, None, None
