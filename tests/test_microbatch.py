"""Micro-batches (``batch_gpu``, cmcore.training.step.TrainStep): every method's gradient over
one pass of the batch equals the gradient accumulated over any split of it, and the mean of the
ranks' gradients (what DDP averages) for 2 or 4 ranks, because each piece draws its rows of the
one-pass random numbers (cmcore.diffusion.rng.Draws); a batch_gpu that does not divide a rank's
rows is one line, at config time and at train time."""

import copy

import pytest
import torch
from conftest import TINY

from cmcore.config import ConfigError, validate
from cmcore.diffusion.precond import one_hot
from cmcore.methods import objectives, registry
from cmcore.methods.distances import get_distance
from cmcore.models import make_model
from cmcore.training.distributed import World
from cmcore.training.step import TrainStep

B, K = 8, 3
BASE = {"lr": 1e-3, "optimizer": "adam", "fused": False, "warmup": 0, "ema": 0.9,
        "grad_clip": None, "iters": 10, "batch": B}
OPTS = {
    "teacher": {},
    "cd": {"N": 8, "solver": "heun", "target_mu": 0.9},
    "ct": {"curriculum": "adaptive", "s0": 2, "s1": 10, "mu0": 0.9, "schedule_variant": "paper"},
    "ict": {"s0": 2, "s1": 20, "P_mean": -1.1, "P_std": 2.0},
    "ect": {"stages": 2, "q": 2.0, "P_mean": -1.1, "P_std": 2.0},
    "cd_cont": {},
    "ct_cont": {},
    "sct": {"P_mean": -1.0, "P_std": 1.4, "tangent_warmup": 10, "tangent_c": 0.1,
            "adaptive_weight": True},
    "scd": {"P_mean": -1.0, "P_std": 1.4, "tangent_warmup": 0, "tangent_c": None,
            "adaptive_weight": True},
    "pd": {},
}
GRID = dict(eps=0.002, T=80.0, rho=7.0)


def gradient(method, batch_gpu, k=3, world=None):
    """grad L of step k over the batch of B, in pieces of ``batch_gpu`` rows (None: one), of
    rank ``world.rank``'s rows when a World is given."""
    torch.manual_seed(0)
    net = {"arch": "mlp", "in_channels": 2, "hidden": 16, "depth": 2, "label_dim": K}
    diffusion = {"sigma_data": 0.5, "sigma_min": 0.002}
    kind = "denoiser" if method == "pd" else registry.METHODS[method].kind
    model = make_model(net, kind, diffusion)
    with torch.no_grad():  # no zero-initialised layer: every parameter gets a gradient
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    teacher = make_model(net, "denoiser", diffusion).requires_grad_(False)
    target = copy.deepcopy(model).requires_grad_(False)
    data, labels = torch.randn(50, 2), torch.randint(0, K, (50,))

    def batch(rng):  # as the training loop draws: indices, then the labeled points
        i = rng.randint(data.shape[0], rng.n)
        return data[i], one_hot(labels[i], K)

    opt = {**BASE, **OPTS[method], "batch_gpu": batch_gpu}
    if method == "pd":
        context = registry.Context(model, None, teacher, batch, GRID, None, 0.5)

        def loss_fn(k, rng):
            x, student, _, D = context.draw(rng)
            return objectives.progressive_distillation_loss(student, D, x, 2, 0.5, **GRID,
                                                            rng=rng), {}
    else:
        spec = registry.METHODS[method]
        context = registry.Context(model, target if spec.target else None, teacher, batch,
                                   GRID, get_distance("l2"), 0.5)
        loss_fn = spec.build(opt, context)
    step = TrainStep(model, loss_fn, opt, world=world, seed=7, label=method)
    loss, _ = step.gradient(k)
    return loss, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("method", sorted(OPTS))
def test_any_split_of_the_batch_gives_the_same_gradient(method):
    loss, ref = gradient(method, None)
    assert all(g.abs().sum() > 0 for g in ref)  # gradients that could differ
    for batch_gpu in (4, 2):
        split_loss, grads = gradient(method, batch_gpu)
        torch.testing.assert_close(split_loss, loss, rtol=1e-5, atol=1e-7)
        for g, want in zip(grads, ref, strict=True):
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6)
    _, other = gradient(method, None, k=4)  # another step draws other numbers
    assert not all(torch.equal(a, b) for a, b in zip(other, ref, strict=True))


@pytest.mark.parametrize("method", sorted(OPTS))
def test_the_mean_of_rank_gradients_is_the_one_process_gradient(method):
    """What DDP averages (each rank's gradient over its rows, itself in micro-batches) is the
    gradient of one process over the whole batch: draws do not depend on the world size."""
    loss, ref = gradient(method, None)
    for P, batch_gpu in ((2, None), (2, 2), (4, None)):
        ranks = [gradient(method, batch_gpu, world=World(P, r)) for r in range(P)]
        torch.testing.assert_close(sum(r[0] for r in ranks) / P, loss, rtol=1e-5, atol=1e-7)
        for i, want in enumerate(ref):
            mean = sum(r[1][i] for r in ranks) / P
            torch.testing.assert_close(mean, want, rtol=1e-4, atol=1e-6)


def test_a_batch_gpu_that_does_not_divide_is_one_line():
    with pytest.raises(ValueError, match=r"^cd batch 8 over 2 rank\(s\) is 4 rows per rank, not a "
                       "multiple of batch_gpu 3; pick a batch_gpu that divides it$"):
        World(2, 1).check_batch(8, "cd batch", 3)
    cfg = copy.deepcopy(TINY)
    cfg["teacher"]["batch_gpu"] = cfg["teacher"]["batch"] + 1
    b = cfg["teacher"]["batch"]
    with pytest.raises(ConfigError, match=rf"teacher.batch_gpu: {b + 1} does not divide the {b} "
                       rf"rows each GPU gets of the batch {b}; use a divisor of {b}"):
        validate(cfg)
