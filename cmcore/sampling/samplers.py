"""Samplers of trained models: one-step and multistep consistency sampling, DDIM for PD."""

import numpy as np
import torch

from cmcore.diffusion.schedules import pd_grid
from cmcore.methods.objectives import ddim_step


@torch.no_grad()
def consistency_sample(f, z, taus=(), eps=0.002, T=80.0, generator=None):
    """Paper Algorithm 1: x = f(T z, T); for tau_n: x = f(x + sqrt(tau_n^2 - eps^2) xi, tau_n).

    With ``taus`` empty this is one-step generation; NFE = 1 + len(taus). ``generator`` draws
    the xi (torch's global generator when None).
    """
    x = f(z * T, T)
    for tau in taus:
        # Re-noise to tau_n, then map back to the trajectory's origin.
        xi = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x_hat = x + (tau**2 - eps**2) ** 0.5 * xi
        x = f(x_hat, tau)
    return x


@torch.no_grad()
def ddim_sample(D, z, steps, eps=0.002, T=80.0, rho=7.0):
    """Deterministic DDIM over the progressive-distillation grid T = s_0 > ... > s_steps = eps."""
    grid = pd_grid(steps, eps, T, rho).tolist()
    x = z * T
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        x = ddim_step(D, x, t, t_next)
    return x


def training_distance(ckpt):
    """The distance d a checkpoint was trained with, naming LPIPS's backbone ('-' if none)."""
    method, cfg = ckpt["method"], ckpt["config"]
    if method in ("teacher", "pd"):
        return "l2 (denoising)"
    if "distance" not in cfg.get(method, {}):
        return "-"
    name = cfg[method]["distance"]
    if name == "lpips":
        options = cfg["distance_options"]
        pretrained, size = options["lpips_backbone"] == "pretrained", options["lpips_resize"]
        notes = ["ImageNet AlexNet" if pretrained else "RANDOM AlexNet"]
        notes += [] if size == 224 else [f"inputs at {size} px, not 224"]
        notes += [] if pretrained else ["not the paper's LPIPS"]
        return f"lpips ({', '.join(notes)})"
    return name


def sample_checkpoint(ckpt, steps, num_samples, batch, seed, device, taus=()):
    """Draw ``num_samples`` samples from a checkpoint with ``steps`` steps, ``batch`` at a time,
    all noise from one generator seeded with ``seed``.

    The sampler follows the method: the EDM Heun sampler for the teacher, Algorithm 1 for
    consistency models with the ``steps - 1`` intermediate times ``taus``, DDIM with the
    matching stage for PD. Returns (uint8 NHWC images, metadata with the sampler, NFE and taus).
    """
    from cmcore.data import to_uint8
    from cmcore.diffusion.solvers import edm_sampler, edm_sampler_nfe
    from cmcore.models import model_from_checkpoint

    method, d = ckpt["method"], ckpt["config"]["diffusion"]
    grid = dict(eps=d["sigma_min"], T=d["sigma_max"])
    generator = torch.Generator(device).manual_seed(seed)
    if method == "pd":
        if str(steps) not in ckpt["stages"]:
            raise ValueError(f"PD has no {steps}-step student; stages: {sorted(ckpt['stages'])}")
        model = model_from_checkpoint(ckpt, stage=steps).to(device)
        sampler, nfe, taus = "ddim", steps, []

        def run(z):
            return ddim_sample(model, z, steps, rho=d["rho"], **grid)
    elif method == "teacher":
        model = model_from_checkpoint(ckpt).to(device)
        sampler, nfe, taus = "edm-heun", edm_sampler_nfe(steps), []

        def run(z):
            return edm_sampler(model, z, steps, rho=d["rho"], **grid)
    else:
        model = model_from_checkpoint(ckpt).to(device)
        taus = list(taus)
        if len(taus) != steps - 1:
            raise ValueError(f"{steps}-step sampling needs {steps - 1} taus, got {len(taus)}")
        sampler, nfe = "consistency-multistep" if taus else "consistency-onestep", steps

        def run(z):
            return consistency_sample(model, z, taus, generator=generator, **grid)
    net = ckpt["net"]
    shape = (net["in_channels"],) + (net["img_resolution"],) * 2 if "img_resolution" in net \
        else (net["in_channels"],)
    chunks, left = [], num_samples
    while left > 0:
        n = min(left, batch)
        x = run(torch.randn(n, *shape, generator=generator, device=device))
        chunks.append(to_uint8(x) if x.ndim == 4 else x.float().cpu().numpy())
        left -= n
    meta = {"method": method, "steps": steps, "nfe": nfe, "sampler": sampler, "taus": taus,
            "num_samples": num_samples, "seed": seed,
            "train_iters": ckpt.get("train_iters"), "distance": training_distance(ckpt)}
    return np.concatenate(chunks), meta
