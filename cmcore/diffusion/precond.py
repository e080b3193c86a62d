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


class TrigFlowConsistency(Denoiser):
    """f(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s)), EDM's scalings with f(x, 0) = x:
    the consistency function of sCM (Lu & Song 2024) in our VE variables.

    In TrigFlow, t = arctan(s / sd) and x_t = cos(t) x (x = x0 + s z on our VE path):
        f = cos(t) x_t - sin(t) sd F_trig(x_t / sd, t),   F_trig = -F,
    since c_skip = cos^2 t, c_out = sd sin t and c_in x = x_t / sd. The backbone's output is
    EDM's F, so a teacher's backbone initialises it as it is. ``forward(x, t, trig=True)``
    gives (F_trig(x, t), w_phi(t)) (x = x_t / sd, t the TrigFlow time) through this module's
    forward, which data parallel synchronises: w_phi is sCM's adaptive weighting, a linear map
    of Fourier features of c_noise, zero at initialisation; sampling never uses it.
    """

    def __init__(self, model, sigma_data=0.5, features=64):
        super().__init__(model, sigma_data)
        self.register_buffer("frequencies", 2 * torch.pi * torch.arange(1, features // 2 + 1.0))
        self.weight = torch.nn.Linear(features, 1)
        torch.nn.init.zeros_(self.weight.weight)
        torch.nn.init.zeros_(self.weight.bias)

    def c_noise(self, t):
        """EDM's ln(s) / 4 at s = sd tan t."""
        return (self.sigma_data * torch.tan(t)).log() / 4

    def log_weight(self, t):
        """w_phi(t), (B,)."""
        phase = self.c_noise(t)[:, None] * self.frequencies
        return self.weight(torch.cat([phase.cos(), phase.sin()], 1)).squeeze(1)

    def forward(self, x, t, class_labels=None, trig=False):
        if trig:  # (F_trig(x_t / sd, t) = -F(x_t / sd, c_noise), w_phi(t))
            t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
            return -self.model(x, self.c_noise(t), class_labels=class_labels), self.log_weight(t)
        return super().forward(x, t, class_labels)  # EDM's denoiser formula, used as f
