"""Class labels end to end: every method gives each step's networks (online, target, teacher)
the labels of the step's data points; sampling draws labels balanced or at random and records
them; evaluation scores how often a sample shows its requested class."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import cm, tiny_config

from cmcore.data import load_digits
from cmcore.diffusion.precond import (
    ConsistencyFunction,
    Denoiser,
    TrigFlowConsistency,
    conditioned,
    one_hot,
)
from cmcore.diffusion.rng import Draws
from cmcore.evaluation.classifier import label_accuracy
from cmcore.methods import objectives, registry
from cmcore.methods.distances import get_distance
from cmcore.networks.mlp import MLP
from cmcore.sampling.samplers import draw_labels

K = 4  # classes of the test data


class Spy(torch.nn.Module):
    """A backbone that records the class labels each evaluation receives (into ``seen``)."""

    def __init__(self, inner, seen):
        super().__init__()
        self.inner, self.seen = inner, seen

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.seen.append(None if class_labels is None else class_labels.detach().clone())
        return self.inner(x, noise_labels, class_labels)


def _networks(seen, kind="consistency"):
    """(f_theta, f_theta^-, D_phi) around one conditional MLP, each evaluation recorded; f is
    sCM's for ``kind`` trigflow."""
    torch.manual_seed(0)
    mlp = MLP(in_channels=2, hidden=16, depth=1, label_dim=K)
    wrap = TrigFlowConsistency if kind == "trigflow" else ConsistencyFunction
    f = wrap(Spy(mlp, seen))
    target = ConsistencyFunction(Spy(copy.deepcopy(mlp), seen)).requires_grad_(False)
    teacher = Denoiser(Spy(copy.deepcopy(mlp), seen)).requires_grad_(False)
    return f, target, teacher


OPTS = {
    "teacher": {"batch": 6},
    "cd": {"batch": 6, "N": 8, "solver": "heun", "target_mu": 0.9},
    "ct": {"batch": 6, "curriculum": "adaptive", "iters": 10, "s0": 2, "s1": 10, "mu0": 0.9,
           "schedule_variant": "paper"},
    "ict": {"batch": 6, "iters": 10, "s0": 2, "s1": 20, "P_mean": -1.1, "P_std": 2.0},
    "ect": {"batch": 6, "iters": 10, "stages": 2, "q": 2.0, "P_mean": -1.1, "P_std": 2.0},
    "cd_cont": {"batch": 6},
    "ct_cont": {"batch": 6},
    "sct": {"batch": 6, "P_mean": -1.0, "P_std": 1.4, "tangent_warmup": 4, "tangent_c": 0.1,
            "adaptive_weight": True},
    "scd": {"batch": 6, "P_mean": -1.0, "P_std": 1.4, "tangent_warmup": 0, "tangent_c": 0.1,
            "adaptive_weight": True},
}


@pytest.mark.parametrize("method", sorted(OPTS))
def test_every_network_of_a_step_sees_the_drawn_labels(method):
    seen = []
    f, target, teacher = _networks(seen, registry.METHODS[method].kind)
    g = torch.Generator().manual_seed(1)
    drawn = []

    def batch(rng):  # points with their one-hot labels, as the training loop draws them
        n = OPTS[method]["batch"]
        y = torch.randint(0, K, (n,), generator=g)
        drawn.append(one_hot(y, K))
        return torch.randn(n, 2, generator=g), drawn[-1]

    spec = registry.METHODS[method]
    c = registry.Context(f, target if spec.target else None, teacher, batch,
                         dict(eps=0.002, T=80.0, rho=7.0), get_distance("l2"), 0.5)
    loss, _ = spec.build(OPTS[method], c)(3, Draws())
    loss.backward()
    users = {"teacher": 1, "cd": 3, "ct": 2, "ict": 2, "ect": 2, "cd_cont": 2, "ct_cont": 1,
             "sct": 2, "scd": 3}
    assert len(seen) >= users[method]  # online + target / teacher evaluations
    assert len(drawn) == 1
    for labels in seen:  # every evaluation got the step's labels, row for row
        assert labels is not None and torch.equal(labels, drawn[0])


def test_progressive_distillation_conditions_student_and_teacher():
    seen = []
    _, _, teacher = _networks(seen)
    student = copy.deepcopy(teacher).requires_grad_(True)
    student.model.seen = seen  # one record for both (deepcopy copied the list)
    y = one_hot(torch.tensor([0, 3, 1, 2, 3]), K)
    c = registry.Context(student, None, teacher, lambda rng: (torch.randn(5, 2), y), {}, None,
                         0.5)
    x, D_s, _, D_t = c.draw(Draws())
    objectives.progressive_distillation_loss(D_s, D_t, x, 2).backward()
    assert len(seen) == 3 and all(torch.equal(s, y) for s in seen)  # 2 teacher + 1 student


def test_labels_change_the_conditional_output():
    """The label reaches the backbone: two classes give different f(x, t) for the same x."""
    f, _, _ = _networks([])
    x, t = torch.randn(3, 2), torch.full((3,), 1.0)
    torch.nn.init.normal_(f.model.inner.out.weight)  # zero at initialisation
    a = conditioned(f, one_hot(torch.zeros(3, dtype=torch.long), K))(x, t)
    b = conditioned(f, one_hot(torch.ones(3, dtype=torch.long), K))(x, t)
    assert (a - b).abs().min() > 1e-4
    assert conditioned(f, None) is f


def test_balanced_and_random_label_draws():
    g = torch.Generator().manual_seed(0)
    y = draw_labels(25, 10, "balanced", g)
    assert np.bincount(y.numpy()).tolist() == [3] * 5 + [2] * 5
    r1 = draw_labels(1000, 10, "random", torch.Generator().manual_seed(3))
    r2 = draw_labels(1000, 10, "random", torch.Generator().manual_seed(3))
    assert torch.equal(r1, r2) and r1.min() == 0 and r1.max() == 9
    assert not torch.equal(r1, torch.arange(1000) % 10)
    assert draw_labels(5, 0, "balanced", g) is None
    with pytest.raises(ValueError, match="sampling.labels"):
        draw_labels(5, 10, "uniform", g)


def test_label_accuracy_of_real_digits(classifier):
    """Real digits with their own labels score near the classifier's accuracy; the same images
    asked for the next class score near zero."""
    images, labels = load_digits()
    assert label_accuracy(classifier, images, labels) > 0.9
    assert label_accuracy(classifier, images, (labels + 1) % 10) < 0.1
    with pytest.raises(ValueError, match="class labels span"):
        label_accuracy(classifier, images, labels + 5)


def test_conditional_digits_through_the_cli(tmp_path, classifier):
    """A class-conditional teacher and CD student on the digits: the samples record balanced
    labels, the evaluation reports their accuracy (the classifier's own figure), and an edit
    runs with the images' classes."""
    cfg = tiny_config(tmp_path, network={"label_dim": 10})
    out = tmp_path / "r"
    data, teacher, cd = out / "train.npz", out / "teacher.pt", out / "cd.pt"
    for args in (["prepare-data", "--out", data],
                 ["train", "--method", "teacher", "--data", data, "--out", teacher],
                 ["train", "--method", "cd", "--data", data, "--teacher", teacher, "--out", cd],
                 ["sample", "--checkpoint", cd, "--steps", 1, "--out", out / "s.npz"],
                 ["evaluate", "--samples", out / "s.npz", "--reference", data, "--classifier",
                  classifier, "--out", out / "m.json"],
                 ["edit", "--checkpoint", cd, "--data", data, "--task", "inpaint", "--out",
                  out / "edit.png"]):
        r = cm(*args, "--config", cfg)
        assert r.returncode == 0, r.stderr
    with np.load(out / "s.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert len(labels) == len(images) == 120
    assert np.bincount(labels).tolist() == [12] * 10
    record = json.loads((out / "m.json").read_text())
    assert record["labels"] == "balanced"
    assert record["label_accuracy"] == pytest.approx(label_accuracy(classifier, images, labels))
    r = cm("table", "--config", cfg, "--metrics", out / "m.json", "--out", out / "t.csv")
    assert r.returncode == 0, r.stderr
    header, _, row = (out / "t.md").read_text().splitlines()[:3]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")],
                     strict=True))
    assert cells["label_accuracy"] == f"{record['label_accuracy']:.3f}"


def test_labels_outside_label_dim_are_refused_in_one_line():
    from cmcore.training.loop import check_labels

    check_labels(np.arange(10), 10)
    with pytest.raises(ValueError, match=r"network.label_dim is 10, but the data's class labels "
                                         r"span 0..11; set it") as e:
        check_labels(np.arange(12), 10)
    assert "\n" not in str(e.value)
