"""Greedy ternary search of the multistep taus on scores whose minimisers are known."""

import math

import pytest

from cmcore.sampling.tau_search import greedy_tau_search


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
