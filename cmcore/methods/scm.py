"""sCM: simplified continuous-time consistency models (Lu & Song 2024), trained from scratch
(sCT) or distilled from the teacher (sCD), in TrigFlow variables.

TrigFlow: x_t = cos(t) x0 + sin(t) z, z ~ N(0, sd^2 I), t in [0, pi/2]; the PF-ODE velocity is
dx_t/dt = sd F(x_t / sd, t), and the consistency model f(x_t, t) = cos(t) x_t - sin(t) sd
F_theta(x_t / sd, t) (cmcore.diffusion.precond.TrigFlowConsistency: our VE path is x = x_t /
cos(t) at s = sd tan(t)). Along the ODE,

    df/dt = -cos(t) (sd F - dx_t/dt) - sin(t) (x_t + sd dF/dt),

and with theta^- = stopgrad(theta) the continuous-time gradient is that of

    L = E[ e^{w_phi(t)} / D ||F_theta - F_theta^- - g||^2 - w_phi(t) ],
    g = -cos^2(t) (sd F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sd dF^-/dt)   (= cos(t) df^-/dt),
    g <- g / (||g|| + c)                                         (tangent normalisation)

(sCM, Algorithm 1): r = min(1, k / H) warms the tangent up over H iterations, w_phi is the
adaptive weighting learned with theta, D the data dimension, dF^-/dt one forward-mode JVP
(tangents scaled by cos t sin t, as sCM does), ln(sd tan t) ~ N(P_mean, P_std^2) clamped to
[eps, T]. dx_t/dt: sCT the unbiased cos(t) z - sin(t) x0; sCD the teacher's velocity, from an
EDM denoiser D: dx_t/dt = (cos(t) x_t - D(x_t / cos t, sd tan t)) / sin(t), the teacher
converted to TrigFlow exactly (no retraining). At the exact consistency function and the exact
velocity g = 0: L = 0 (tests/test_scm.py).

API (per-example random numbers from ``rng``, a cmcore.diffusion.rng.Draws):
    trigflow_velocity(D, x_t, t, sigma_data) -> dx_t/dt of an EDM denoiser D
    scm_loss(f, x0, velocity, r, sigma_data, P_mean, P_std, eps, T, c, rng) -> scalar loss
"""

import torch
from torch.func import jvp

from cmcore.diffusion.precond import _per_sample
from cmcore.diffusion.rng import Draws, same_randomness
from cmcore.networks.forward_mode import forward_mode


def trigflow_velocity(D, x_t, t, sigma_data=0.5):
    """dx_t/dt = (cos(t) x_t - D(x_t / cos t, sd tan t)) / sin(t): an EDM denoiser's PF-ODE in
    TrigFlow (E[x0 | x_t] = D at the VE point x_t / cos t)."""
    c, s = _per_sample(torch.cos(t), x_t), _per_sample(torch.sin(t), x_t)
    return (c * x_t - D(x_t / c, sigma_data * torch.tan(t))) / s


def ct_velocity(x_t, t, x0, z):
    """The unbiased estimate cos(t) z - sin(t) x0 of dx_t/dt (sCT)."""
    return _per_sample(torch.cos(t), x0) * z - _per_sample(torch.sin(t), x0) * x0


def scm_loss(f, x0, velocity, r=1.0, sigma_data=0.5, P_mean=-1.0, P_std=1.4, eps=0.002,
             T=80.0, c=0.1, adaptive=True, rng=None):
    """L of the module docstring, batch mean. ``f``: the TrigFlowConsistency (or a wrapper of
    it: f(x, t, trig=True) = (F_trig, w_phi)); ``velocity(x_t, t, x0, z)`` -> dx_t/dt
    (ct_velocity, or the teacher's); ``adaptive`` False: w_phi = 0; ``c`` None: g as is."""
    rng, sd = rng or Draws(), sigma_data
    # Sample the time: ln(sd tan t) ~ N(P_mean, P_std^2) within [eps, T].
    sigma = (rng.randn(x0.shape[0], x0.device, x0.dtype) * P_std + P_mean).exp().clamp(eps, T)
    t = torch.atan(sigma / sd)
    cos, sin = _per_sample(torch.cos(t), x0), _per_sample(torch.sin(t), x0)
    z = sd * rng.randn_like(x0)
    x_t = cos * x0 + sin * z
    with torch.no_grad():
        v = velocity(x_t, t, x0, z)

    def F(x, t):
        return f(x, t, trig=True)[0]

    def target():  # F^- and cos t sin t dF^-/dt: one JVP along (dx_t/dt / sd, 1)
        scale = torch.cos(t) * torch.sin(t)
        with torch.no_grad(), forward_mode():
            return jvp(F, (x_t / sd, t), (_per_sample(scale, x0) * v / sd, scale))
    # The online F_theta and the target under the same dropout masks.
    (F_theta, w), (F_minus, dF) = same_randomness(
        x0.device, lambda: f(x_t / sd, t, trig=True), target)
    # The tangent g = cos(t) df^-/dt, warmed up (r) and normalised.
    g = -cos**2 * (sd * F_minus - v) - r * (cos * sin * x_t + sd * dF)
    if c is not None:
        g = g / (_per_sample(g.flatten(1).norm(dim=1), g) + c)
    w = w if adaptive else 0 * w  # in the graph either way (data parallel wants every grad)
    per_sample = (F_theta - F_minus - g).square().flatten(1).sum(1)
    return (w.exp() / x0[0].numel() * per_sample - w).mean()
