"""The editing figures of the DAG: each zero-shot task of cmcore.sampling.editing applied to real
images of the data set, as rows (reference, the task's input, the consistency model's output).

    inpaint      the right half of each image is generated, the left half kept
    superres     2x2 block means are kept, the rest generated
    colorize     luma kept, colour generated (RGB data only)
    sdedit       4x4 block means ("strokes") noised to tau_1, then multistep sampling
    denoise      x + sigma n at sigma = 0.5 mapped by f(x, sigma)
    interpolate  slerp between two noises, one row per pair (the rows are the alphas)
"""

import contextlib

import torch
import torch.nn.functional as F

from cmcore.diffusion.precond import conditioned
from cmcore.sampling import editing

TASKS = ("inpaint", "superres", "colorize", "sdedit", "denoise", "interpolate")


def _blocks(x, p):
    """Each p x p block replaced by its mean (same shape)."""
    return F.interpolate(F.avg_pool2d(x, p), scale_factor=p, mode="nearest")


@contextlib.contextmanager
def _global_stream(g):
    """Inside: torch's global generator of g's device continues g's stream; on exit it is
    restored to its state before (torch.random.fork_rng)."""
    cuda = g.device.type == "cuda"
    with torch.random.fork_rng(devices=[g.device] if cuda else []):
        if cuda:
            torch.cuda.set_rng_state(g.get_state(), g.device)
        else:
            torch.set_rng_state(g.get_state())
        yield


def demo(f, task, x, taus, seed, class_labels=None):
    """(rows, labels): image rows (each (B, C, H, W) in [-1, 1]) of ``task`` on images ``x``.

    ``class_labels`` (one-hot rows of x's classes, for a class-conditional f): each edit keeps
    its image's class; the interpolation's three pairs take the first three images' classes.

    Random numbers: one generator seeded with ``seed`` on x's device draws this function's noise
    (denoise, interpolate); the editing functions, which draw from torch's global generator, run
    on its continuation inside a fork of the global state, which the call leaves untouched.
    """
    if task not in TASKS:
        raise ValueError(f"unknown editing task {task!r}; choose one of {list(TASKS)}")
    g = torch.Generator(x.device).manual_seed(seed)
    f_x = conditioned(f, class_labels)

    def run(edit, *args):
        with _global_stream(g):
            return edit(*args)

    with torch.no_grad():
        if task == "inpaint":
            known = torch.zeros_like(x[:1])
            known[..., : x.shape[-1] // 2] = 1  # keep the left half
            y = x * known
            return [x, y, run(editing.inpaint, f_x, x, known, taus)], \
                ["reference", "kept", "inpainted"]
        if task == "superres":
            out = run(editing.super_resolve, f_x, F.avg_pool2d(x, 2), 2, taus)
            return [x, _blocks(x, 2), out], ["reference", "2x2 means", "super-resolved"]
        if task == "colorize":
            if x.shape[1] != 3:
                raise ValueError("colorize needs RGB data; drop it from editing.tasks")
            grey = editing.luma(x)
            return [x, grey.expand_as(x), run(editing.colorize, f_x, grey, taus)], \
                ["reference", "luma", "colourised"]
        if task == "sdedit":
            strokes = _blocks(x, 4)
            return [x, strokes, run(editing.sdedit, f_x, strokes, taus)], \
                ["reference", "strokes", "SDEdit"]
        if task == "denoise":
            noisy = x + 0.5 * torch.randn(x.shape, generator=g, dtype=x.dtype, device=x.device)
            return [x, noisy.clamp(-1, 1), run(editing.denoise, f_x, noisy, 0.5).clamp(-1, 1)], \
                ["reference", "noisy (sigma 0.5)", "denoised"]
        # interpolate: rows are pairs of noises, columns the alphas
        z0, z1 = torch.randn(2, 3, *x.shape[1:], generator=g, device=x.device)
        alphas = torch.linspace(0, 1, x.shape[0])
        f_pairs = conditioned(f, None if class_labels is None else class_labels[:3])
        out = run(editing.interpolate, f_pairs, z0, z1, alphas, taus)  # (alphas, pairs, ...)
        return list(out.transpose(0, 1).clamp(-1, 1)), ["pair 1", "pair 2", "pair 3"]
