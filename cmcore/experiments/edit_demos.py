"""The editing figures of the DAG: each zero-shot task of cmcore.sampling.editing applied to real
images of the data set, as rows (reference, the task's input, the consistency model's output).

    inpaint      the right half of each image is generated, the left half kept
    superres     2x2 block means are kept, the rest generated
    colorize     luma kept, colour generated (RGB data only)
    sdedit       4x4 block means ("strokes") noised to tau_1, then multistep sampling
    denoise      x + sigma n at sigma = 0.5 mapped by f(x, sigma)
    interpolate  slerp between two noises, one row per pair (the rows are the alphas)
"""

import torch
import torch.nn.functional as F

from cmcore.sampling import editing

TASKS = ("inpaint", "superres", "colorize", "sdedit", "denoise", "interpolate")


def _blocks(x, p):
    """Each p x p block replaced by its mean (same shape)."""
    return F.interpolate(F.avg_pool2d(x, p), scale_factor=p, mode="nearest")


def demo(f, task, x, taus, seed=0):
    """(rows, labels): image rows (each (B, C, H, W) in [-1, 1]) of ``task`` on images ``x``."""
    if task not in TASKS:
        raise ValueError(f"unknown editing task {task!r}; choose one of {list(TASKS)}")
    torch.manual_seed(seed)
    with torch.no_grad():
        if task == "inpaint":
            known = torch.zeros_like(x[:1])
            known[..., : x.shape[-1] // 2] = 1  # keep the left half
            y = x * known
            return [x, y, editing.inpaint(f, x, known, taus)], ["reference", "kept", "inpainted"]
        if task == "superres":
            low = F.avg_pool2d(x, 2)
            out = editing.super_resolve(f, low, 2, taus)
            return [x, _blocks(x, 2), out], ["reference", "2x2 means", "super-resolved"]
        if task == "colorize":
            if x.shape[1] != 3:
                raise ValueError("colorize needs RGB data; drop it from editing.tasks")
            grey = editing.luma(x)
            return [x, grey.expand_as(x), editing.colorize(f, grey, taus)], \
                ["reference", "luma", "colourised"]
        if task == "sdedit":
            strokes = _blocks(x, 4)
            return [x, strokes, editing.sdedit(f, strokes, taus)], \
                ["reference", "strokes", "SDEdit"]
        if task == "denoise":
            noisy = x + 0.5 * torch.randn_like(x)
            return [x, noisy.clamp(-1, 1), editing.denoise(f, noisy, 0.5).clamp(-1, 1)], \
                ["reference", "noisy (sigma 0.5)", "denoised"]
        # interpolate: rows are pairs of noises, columns the alphas
        z0, z1 = torch.randn(2, 3, *x.shape[1:])
        alphas = torch.linspace(0, 1, x.shape[0])
        out = editing.interpolate(f, z0, z1, alphas, taus)  # (alphas, pairs, ...)
        return list(out.transpose(0, 1).clamp(-1, 1)), ["pair 1", "pair 2", "pair 3"]
