"""Greedy ternary search of the multistep taus on scores whose minimisers are known."""

import math

import numpy as np
import pytest
import torch

from cmcore.models import make_model
from cmcore.sampling.samplers import sample_checkpoint
from cmcore.sampling.tau_search import greedy_tau_search, search_checkpoint_taus


class Score:
    """score(tau_1..tau_i) = sum_i (ln tau_i - ln target_i)^2, counting its calls."""

    def __init__(self, targets):
        self.targets, self.calls = targets, 0

    def __call__(self, taus):
        self.calls += 1
        pairs = zip(taus, self.targets[: len(taus)], strict=True)
        return sum((math.log(t) - math.log(s)) ** 2 for t, s in pairs)


@pytest.mark.parametrize("space", ["karras", "log", "linear"])
def test_search_finds_the_minimiser_of_a_unimodal_score(space):
    score = Score([2.0, 0.5, 0.05])
    taus, _ = greedy_tau_search(score, 3, iters=60, space=space)
    assert taus == pytest.approx([2.0, 0.5, 0.05], rel=1e-4)


def test_taus_are_decreasing_even_when_the_score_wants_otherwise():
    score = Score([0.5, 3.0, 0.1])  # tau_2 would like to exceed tau_1
    taus, _ = greedy_tau_search(score, 3, iters=40)
    assert taus[0] == pytest.approx(0.5, rel=1e-4)
    assert 0.002 < taus[2] < taus[1] < taus[0]
    assert taus[1] == pytest.approx(0.5, rel=1e-4)  # pressed against its upper bound


def test_number_of_score_calls_and_the_trace():
    score = Score([2.0, 0.5])
    taus, trace = greedy_tau_search(score, 2, iters=7)
    assert score.calls == 2 * 2 * 7  # two per ternary step; the chosen tau is a cache hit
    assert len(trace) == 2 * (2 * 7 + 1)
    assert trace[-1] == (tuple(taus), score(taus))
    assert all(len(key) == 1 for key, _ in trace[:15]) and all(len(k) == 2 for k, _ in trace[15:])


def test_cache_is_shared_across_searches():
    cache = {}
    score = Score([2.0, 0.5])
    one, _ = greedy_tau_search(score, 1, iters=5, cache=cache)
    assert score.calls == 10
    two, _ = greedy_tau_search(score, 2, iters=5, cache=cache)
    assert score.calls == 20  # tau_1 came from the cache
    assert two[0] == one[0]
    again, trace = greedy_tau_search(score, 2, iters=5, cache=cache)
    assert score.calls == 20 and again == two and len(trace) == 22


def test_bad_arguments():
    with pytest.raises(ValueError, match="space"):
        greedy_tau_search(Score([1.0]), 1, space="cubic")
    with pytest.raises(ValueError, match="iters"):
        greedy_tau_search(Score([1.0]), 1, iters=0)


def test_checkpoint_search_scores_the_images_of_sample_checkpoint_bitwise():
    # The search runs Algorithm 1's prefix once per tau; every candidate's images must still be
    # those sample_checkpoint draws for the same taus (three batches, the last one partial).
    torch.manual_seed(0)
    net = {"arch": "ddpmpp", "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
           "attn_resolutions": [4], "dropout": 0.0, "img_resolution": 8, "in_channels": 1}
    diffusion = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "rho": 7.0}
    model = make_model(net, "consistency", diffusion)
    ckpt = {"method": "ct", "kind": "consistency", "net": net, "config": {"diffusion": diffusion},
            "ema": model.state_dict(), "train_iters": 0}
    seen = {}

    def fid(images):  # any function of the images; record them
        seen[len(seen)] = images
        return float(np.abs(images.astype(float) - 100.0).mean())
    _, trace = search_checkpoint_taus(ckpt, 2, fid, num_samples=10, batch=4, seed=3,
                                      device="cpu", iters=2)
    assert len(seen) == 2 * 2 * 2 and len({t for t, _ in trace}) == len(seen)
    for i, (taus, score) in enumerate(dict.fromkeys(trace)):
        images, _, _ = sample_checkpoint(ckpt, len(taus) + 1, 10, 4, 3, "cpu", taus)
        assert np.array_equal(seen[i], images) and fid(images) == score
    assert not np.array_equal(seen[0], seen[1])  # the candidates' images differ: it can fail
