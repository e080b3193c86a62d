"""Losses against exact answers on a one-point data set, where f and D are known in closed form.

For p_data = delta(x0): D(x, t) = x0 and the consistency function is f(x, t) = x0 + (x - x0) eps/t.
"""

import pytest
import torch

from cmcore.diffusion.solvers import euler_step, heun_step
from cmcore.methods.distances import l1, l2, pseudo_huber
from cmcore.methods.objectives import (
    consistency_distillation_loss,
    consistency_training_loss,
    edm_loss,
    progressive_distillation_loss,
)

EPS = 0.002
X0 = torch.tensor([[0.3, -0.7, 0.1, 0.9]], dtype=torch.float64)


def D_exact(x, t):
    return X0.expand_as(x)


def f_exact(x, t):
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1)
    return X0 + (x - X0) * EPS / t


def f_wrong(x, t):
    return f_exact(x, t) + 0.01 * x


@pytest.mark.parametrize("solver", [euler_step, heun_step])
@pytest.mark.parametrize("distance", [l2, l1, pseudo_huber])
def test_cd_loss_is_zero_for_the_exact_consistency_function(solver, distance):
    torch.manual_seed(0)
    x0 = X0.expand(256, -1)
    loss = consistency_distillation_loss(f_exact, f_exact, D_exact, x0, 18, solver, distance)
    assert loss.item() < 1e-12
    wrong = consistency_distillation_loss(f_wrong, f_exact, D_exact, x0, 18, solver, distance)
    assert wrong.item() > 1e-6


def test_ct_loss_is_zero_for_the_exact_consistency_function():
    torch.manual_seed(0)
    x0 = X0.expand(256, -1)
    assert consistency_training_loss(f_exact, f_exact, x0, 151, l2).item() < 1e-24
    assert consistency_training_loss(f_wrong, f_exact, x0, 151, l2).item() > 1e-8


def test_edm_loss_is_zero_for_the_exact_denoiser():
    torch.manual_seed(0)
    assert edm_loss(D_exact, X0.expand(64, -1)).item() == 0.0


def test_pd_loss_is_zero_when_student_equals_exact_teacher():
    torch.manual_seed(0)
    x0 = X0.expand(64, -1)
    assert progressive_distillation_loss(D_exact, D_exact, x0, steps=4).item() < 1e-20


def test_distances_by_hand():
    x, y = torch.zeros(1, 4), torch.tensor([[1.0, -1.0, 2.0, 0.0]])
    assert l2(x, y).item() == pytest.approx(6 / 4)
    assert l1(x, y).item() == pytest.approx(4 / 4)
    c = 0.00054 * 2  # sqrt(dim) = 2
    assert pseudo_huber(x, y).item() == pytest.approx((6 + c**2) ** 0.5 - c)


def test_lpips_random_backbone_and_missing_weights(monkeypatch, tmp_path):
    from cmcore.methods.distances import LPIPS, lpips_backbone_available

    torch.manual_seed(0)
    d = LPIPS(backbone="random")
    x, y = torch.rand(2, 1, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8) * 2 - 1
    assert d(x, x).abs().max().item() < 1e-6 and (d(x, y) > 0).all()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert not lpips_backbone_available()
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        LPIPS(backbone="pretrained")


def test_training_distance_labels_lpips_backbone():
    from cmcore.sampling.samplers import training_distance

    cfg = {"cd": {"distance": "lpips"}, "ct": {"distance": "l1"},
           "distance_options": {"lpips_backbone": "random", "lpips_resize": 224}}
    assert training_distance({"method": "cd", "config": cfg}) == \
        "lpips (RANDOM AlexNet, not the paper's LPIPS)"
    assert training_distance({"method": "ct", "config": cfg}) == "l1"
    cfg["distance_options"]["lpips_backbone"] = "pretrained"
    assert training_distance({"method": "cd", "config": cfg}) == "lpips (ImageNet AlexNet)"
    assert training_distance({"method": "untrained", "config": cfg}) == "-"
    cfg["distance_options"]["lpips_resize"] = 64
    assert training_distance({"method": "cd", "config": cfg}) == \
        "lpips (ImageNet AlexNet, inputs at 64 px, not 224)"
