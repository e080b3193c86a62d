"""Preconditioning: wraps a free-form backbone F_theta into a denoiser D or a consistency
function f.

Both wrappers keep the backbone as ``self.model`` so that their state-dict keys (``model.*``)
match NVlabs/edm's ``EDMPrecond`` and a published teacher loads into either wrapper.
"""

import functools

import torch
import torch.nn.functional as F


def _per_sample(t, x):
    """Broadcast a time (float, 0-d or (B,) tensor) to shape (B, 1, ..., 1) in x's dtype."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1)
    t = t.expand(x.shape[0]) if t.numel() == 1 else t
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def one_hot(labels, label_dim):
    """Integer class labels (B,) -> one-hot float rows (B, label_dim), EDM's label input; None
    for an unconditional network (``label_dim`` 0) or no labels."""
    if not label_dim or labels is None:
        return None
    return F.one_hot(labels.long(), label_dim).float()


def conditioned(net, class_labels):
    """net(x, t, class_labels=y) as a function of (x, t): every evaluation of one step (online,
    target, teacher, sampler) given the same labels y; ``net`` itself when y is None."""
    return net if class_labels is None else functools.partial(net, class_labels=class_labels)


class Denoiser(torch.nn.Module):
    """D(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s)) (EDM, Karras et al. 2022).

    c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2),
    c_noise = ln(s) / 4.
    """

    def __init__(self, model, sigma_data=0.5):
        super().__init__()
        self.model = model
        self.sigma_data = sigma_data

    def forward(self, x, sigma, class_labels=None):
        s, sd = _per_sample(sigma, x), self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        c_noise = s.log().flatten() / 4
        F_x = self.model(c_in * x, c_noise, class_labels=class_labels)
        return c_skip * x + c_out * F_x


class ConsistencyFunction(torch.nn.Module):
    """f(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t)) with f(x, eps) = x exactly.

    c_skip = sd^2 / ((t - eps)^2 + sd^2), c_out = (t - eps) sd / sqrt(t^2 + sd^2) (paper,
    Appendix C); c_in and c_noise as in EDM so a teacher's backbone is a sensible initialisation.
    """

    def __init__(self, model, sigma_data=0.5, eps=0.002):
        super().__init__()
        self.model = model
        self.sigma_data = sigma_data
        self.eps = eps

    def forward(self, x, t, class_labels=None):
        t, sd = _per_sample(t, x), self.sigma_data
        c_skip = sd**2 / ((t - self.eps) ** 2 + sd**2)
        c_out = (t - self.eps) * sd / (t**2 + sd**2).sqrt()
        c_in = 1 / (t**2 + sd**2).sqrt()
        c_noise = t.log().flatten() / 4
        F_x = self.model(c_in * x, c_noise, class_labels=class_labels)
        return c_skip * x + c_out * F_x
