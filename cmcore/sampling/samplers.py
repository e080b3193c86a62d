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
        x = renoise_denoise(f, x, draw_xi(x, generator), tau, eps)
    return x


def draw_xi(x, generator):
    """xi ~ N(0, I) shaped as ``x``: Algorithm 1's noise of one step."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


@torch.no_grad()
def renoise_denoise(f, x, xi, tau, eps=0.002):
    """Algorithm 1's step: re-noise x to tau_n with xi, then map back to the trajectory's origin:
    f(x + sqrt(tau_n^2 - eps^2) xi, tau_n)."""
    return f(x + (tau**2 - eps**2) ** 0.5 * xi, tau)


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


def noise_batches(ckpt, num_samples, batch, generator):
    """The initial noise z of ``num_samples`` samples, ``batch`` at a time, in the shape of the
    checkpoint's data; drawn lazily, so the draws of each batch's sampler come in between."""
    net = ckpt["net"]
    shape = (net["in_channels"],) + (net["img_resolution"],) * 2 if "img_resolution" in net \
        else (net["in_channels"],)
    for start in range(0, num_samples, batch):
        n = min(batch, num_samples - start)
        yield torch.randn(n, *shape, generator=generator, device=generator.device)


def to_numpy(x):
    """Samples as numpy: uint8 NHWC images, or float points (the 2-D data sets); ValueError
    for NaN or infinite samples (the uint8 conversion would hide them as black pixels)."""
    from cmcore.data import to_uint8

    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).flatten(1).any(1).sum().item()
        raise ValueError(f"{bad} of {len(x)} samples are not finite (NaN or inf): the model's "
                         "weights are broken; nothing is written")
    return to_uint8(x) if x.ndim == 4 else x.float().cpu().numpy()


def sample_checkpoint(ckpt, steps, num_samples, batch, seed, device, taus=()):
    """Draw ``num_samples`` samples from a checkpoint with ``steps`` steps, ``batch`` at a time,
    all noise from one generator seeded with ``seed``.

    The sampler follows the method: the EDM Heun sampler for the teacher, Algorithm 1 for
    consistency models with the ``steps - 1`` intermediate times ``taus``, DDIM with the
    matching stage for PD. Returns (uint8 NHWC images, metadata with the sampler, NFE and taus).
    """
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
    chunks = [to_numpy(run(z)) for z in noise_batches(ckpt, num_samples, batch, generator)]
    meta = {"method": method, "steps": steps, "nfe": nfe, "sampler": sampler, "taus": taus,
            "num_samples": num_samples, "seed": seed,
            "train_iters": ckpt.get("train_iters"), "distance": training_distance(ckpt)}
    samples = np.concatenate(chunks)
    if samples.min() == samples.max():
        raise ValueError(f"all {len(samples)} samples are the same single value "
                         f"{samples.flat[0]}: the model collapsed; nothing is written")
    return samples, meta
