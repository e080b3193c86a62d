"""Greedy search of the multistep sampler's times tau_1 > tau_2 > ... (paper, Section 6.2):
"we select tau greedily, one at a time, by ternary search to optimise the FID".

tau_i is searched in [lo, tau_{i-1}] (tau_0 = hi) with tau_1..tau_{i-1} fixed; the score is
called with the prefix (tau_1, ..., tau_i), so score_fn((0.8,)) is the FID of the 2-step sampler
with tau_1 = 0.8. Scores are cached by tau tuple; pass the same ``cache`` dict to a later search
(more steps, a resumed run) and none is computed twice.

The search runs in a warped coordinate: 'karras' (t^(1/rho), default: the official script
searches indices of a Karras grid, which is this up to rounding), 'log' (ln t) or 'linear' (t).
Each tau costs 2 * iters score calls, two per ternary step; the chosen tau is the better inner
point of the last step, so its score is already known.

API:
    search_checkpoint_taus(ckpt, n_taus, fid, *, num_samples, batch, seed, device, iters)
        -> (taus, trace): the search of a checkpoint's taus, each scored by fid(images)
    greedy_tau_search(score_fn, n_taus, lo=0.002, hi=80.0, iters=10, space='karras', rho=7.0,
                      cache=None) -> (taus, trace)
        taus:  [tau_1, ..., tau_n], strictly decreasing
        trace: [(tau tuple, score), ...] for every score requested, in order (cache hits too);
               the last entry is (tuple(taus), final score)
"""

import math


def _warp(space, rho):
    """(to_u, from_u): the coordinate the ternary search works in and its inverse."""
    if space == "karras":
        return (lambda t: t ** (1 / rho)), (lambda u: u**rho)
    if space == "log":
        return math.log, math.exp
    if space == "linear":
        return (lambda t: t), (lambda u: u)
    raise ValueError(f"space must be 'karras', 'log' or 'linear', got {space!r}")


def greedy_tau_search(
    score_fn, n_taus, lo=0.002, hi=80.0, iters=10, space="karras", rho=7.0, cache=None
):
    """tau_i = argmin_{tau in [lo, tau_{i-1}]} score(tau_1, ..., tau_{i-1}, tau), i = 1..n_taus,
    each by ``iters`` steps of ternary search (lower scores are better, as FID).

    The score must be unimodal in each tau for the search to find the minimum; FID curves
    are close enough to that in practice (the paper's assumption).
    """
    if iters < 1:
        raise ValueError(f"greedy_tau_search needs iters >= 1, got {iters}")
    cache = {} if cache is None else cache
    trace = []
    to_u, from_u = _warp(space, rho)

    def score(taus):
        key = tuple(float(tau) for tau in taus)
        if key not in cache:
            cache[key] = float(score_fn(key))
        trace.append((key, cache[key]))
        return cache[key]

    taus, upper = [], hi
    for _ in range(n_taus):
        a, b = to_u(lo), to_u(upper)
        for _ in range(iters):
            # Ternary step: drop the third of [a, b] beyond the worse inner point.
            m1, m2 = a + (b - a) / 3, b - (b - a) / 3
            better = score([*taus, from_u(m1)]) < score([*taus, from_u(m2)])
            a, b, best = (a, m2, m1) if better else (m1, b, m2)
        # Fix tau_i at the better inner point of the last step (lo < tau_i < tau_{i-1}).
        upper = from_u(best)
        taus.append(upper)
        score(taus)  # cached: records the prefix's score in the trace
    return taus, trace


def search_checkpoint_taus(ckpt, n_taus, fid, *, num_samples, batch, seed, device, iters,
                           labels="balanced"):
    """The greedy search of ``n_taus`` taus for a consistency-model checkpoint, each candidate
    scored by ``fid(images)`` of ``num_samples`` samples drawn with the search's own ``seed``
    (not the evaluation's, so the reported FID is not the one the search minimised). The taus
    of n steps are the first n - 1 (greedy: a prefix never changes with more steps).

    The images of (tau_1, ..., tau_i) are those of sample_checkpoint with these taus, bitwise,
    but Algorithm 1's steps before tau_i, the same for every candidate tau_i, run once: per
    batch, the state after tau_{i-1} and the noise xi of the last step are kept while tau_i is
    searched, and each candidate costs one network evaluation. A class-conditional model
    samples the labels ``labels`` says, as sample_checkpoint does."""
    import numpy as np
    import torch

    from cmcore.diffusion.precond import conditioned
    from cmcore.models import model_from_checkpoint
    from cmcore.sampling.samplers import (
        consistency_sample,
        draw_xi,
        noise_batches,
        renoise_denoise,
        to_numpy,
    )

    d = ckpt["config"]["diffusion"]
    eps, T = d["sigma_min"], d["sigma_max"]
    model = model_from_checkpoint(ckpt).to(device)
    prefix = {}  # (tau_1, ..., tau_{i-1}) -> per batch (x after tau_{i-1}, xi of step i)

    def states(head):
        # Algorithm 1 up to tau_{i-1}, drawing z and xi as sample_checkpoint does.
        generator = torch.Generator(device).manual_seed(seed)
        out = []
        for z, y in noise_batches(ckpt, num_samples, batch, generator, labels):
            f = conditioned(model, y)
            x = consistency_sample(f, z, head, eps, T, generator)
            out.append((f, x, draw_xi(x, generator)))
        return out

    def score(taus):
        *head, tau = taus
        if tuple(head) not in prefix:
            prefix.clear()  # greedy: an earlier prefix is never searched again
            prefix[tuple(head)] = states(head)
        images = [to_numpy(renoise_denoise(f, x, xi, tau, eps))
                  for f, x, xi in prefix[tuple(head)]]
        return fid(np.concatenate(images))
    return greedy_tau_search(score, n_taus, lo=eps, hi=T, iters=iters, rho=d["rho"])
