"""Samplers of trained models: one-step and multistep consistency sampling, DDIM for PD.

Class-conditional models sample the labels that ``draw_labels`` gives (balanced by default:
an equal count per class), each batch's networks conditioned on its rows' labels; the labels
are returned beside the samples (``cm sample`` stores them as arr_1, as openai's sampling
script does).
"""

import numpy as np
import torch

from cmcore.diffusion.precond import conditioned, one_hot
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


LABEL_DRAWS = ("balanced", "random")


def draw_labels(num_samples, label_dim, how, generator):
    """Class labels (num_samples,) int64 of the samples of a ``label_dim``-way conditional model:
    ``balanced``: y_i = i mod label_dim (equal counts per class when label_dim divides
    num_samples, else the first classes one more); ``random``: uniform draws from ``generator``
    (the ADM sampling script's way). None for an unconditional model (label_dim 0)."""
    if not label_dim:
        return None
    if how == "balanced":
        return torch.arange(num_samples, device=generator.device) % label_dim
    if how == "random":
        return torch.randint(0, label_dim, (num_samples,), generator=generator,
                             device=generator.device)
    raise ValueError(f"sampling.labels: {how!r}; choose one of {', '.join(LABEL_DRAWS)}")


def noise_batches(ckpt, num_samples, batch, generator, labels="balanced"):
    """(z, y) per batch of ``num_samples`` samples, ``batch`` at a time: the initial noise z in
    the shape of the checkpoint's data, and y the batch's one-hot class labels (None for an
    unconditional model; drawn first, by ``draw_labels``). Noise is drawn lazily, so the draws
    of each batch's sampler come in between."""
    net = ckpt["net"]
    shape = (net["in_channels"],) + (net["img_resolution"],) * 2 if "img_resolution" in net \
        else (net["in_channels"],)
    label_dim = net.get("label_dim", 0)
    y = draw_labels(num_samples, label_dim, labels, generator)
    for start in range(0, num_samples, batch):
        n = min(batch, num_samples - start)
        z = torch.randn(n, *shape, generator=generator, device=generator.device)
        yield z, None if y is None else one_hot(y[start:start + n], label_dim)


def labels_of(y_batches):
    """The integer labels (numpy) of a list of one-hot batches; None for unconditional ones."""
    if not y_batches or y_batches[0] is None:
        return None
    return torch.cat(y_batches).argmax(1).cpu().numpy()


def to_numpy(x):
    """Samples as numpy: uint8 NHWC images, or float points (the 2-D data sets); ValueError
    for NaN or infinite samples (the uint8 conversion would hide them as black pixels)."""
    from cmcore.data import to_uint8

    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).flatten(1).any(1).sum().item()
        raise ValueError(f"{bad} of {len(x)} samples are not finite (NaN or inf): the model's "
                         "weights are broken; nothing is written")
    return to_uint8(x) if x.ndim == 4 else x.float().cpu().numpy()


def sample_checkpoint(ckpt, steps, num_samples, batch, seed, device, taus=(), labels="balanced"):
    """Draw ``num_samples`` samples from a checkpoint with ``steps`` steps, ``batch`` at a time,
    all noise (and random labels) from one generator seeded with ``seed``.

    The sampler follows the method: the EDM Heun sampler for the teacher, Algorithm 1 for
    consistency models with the ``steps - 1`` intermediate times ``taus``, DDIM with the
    matching stage for PD. A class-conditional model samples the labels ``labels`` says
    (``draw_labels``). Returns (uint8 NHWC images, metadata with the sampler, NFE and taus,
    the class labels or None).
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

        def run(m, z):
            return ddim_sample(m, z, steps, rho=d["rho"], **grid)
    elif method == "teacher":
        model = model_from_checkpoint(ckpt).to(device)
        sampler, nfe, taus = "edm-heun", edm_sampler_nfe(steps), []

        def run(m, z):
            return edm_sampler(m, z, steps, rho=d["rho"], **grid)
    else:
        model = model_from_checkpoint(ckpt).to(device)
        taus = list(taus)
        if len(taus) != steps - 1:
            raise ValueError(f"{steps}-step sampling needs {steps - 1} taus, got {len(taus)}")
        sampler, nfe = "consistency-multistep" if taus else "consistency-onestep", steps

        def run(m, z):
            return consistency_sample(m, z, taus, generator=generator, **grid)
    chunks, ys = [], []
    for z, y in noise_batches(ckpt, num_samples, batch, generator, labels):
        chunks.append(to_numpy(run(conditioned(model, y), z)))
        ys.append(y)
    conditional = ys[0] is not None
    meta = {"method": method, "steps": steps, "nfe": nfe, "sampler": sampler, "taus": taus,
            "num_samples": num_samples, "seed": seed, "labels": labels if conditional else "-",
            "train_iters": ckpt.get("train_iters"), "distance": training_distance(ckpt),
            "compute": ckpt.get("compute")}
    samples = np.concatenate(chunks)
    if samples.min() == samples.max():
        raise ValueError(f"all {len(samples)} samples are the same single value "
                         f"{samples.flat[0]}: the model collapsed; nothing is written")
    return samples, meta, labels_of(ys)
