"""Losses against exact answers on a one-point data set, where f and D are known in closed form.

For p_data = delta(x0): D(x, t) = x0 and the consistency function is f(x, t) = x0 + (x - x0) eps/t.
"""

import copy

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


@pytest.mark.parametrize("method", ["cd", "ct"])
def test_target_replays_the_online_dropout_masks(method):
    # theta^- = theta with dropout 0.5 and t_n -> t_{n+1} (N = 10^6): the loss must vanish, as
    # it does without dropout; under independent masks it would stay near the dropout noise.
    from cmcore.models import make_model

    torch.manual_seed(0)
    net = {"arch": "ddpmpp", "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
           "attn_resolutions": [], "dropout": 0.5, "img_resolution": 8, "in_channels": 1}
    f = make_model(net, "consistency", {"sigma_data": 0.5, "sigma_min": 0.002}).train()
    with torch.no_grad():  # not the initialisation, whose last layer is zero: F_theta != 0
        for p in f.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    N = 10**6

    def loss(target):  # the teacher of CD: D = x0, so that its Euler step is x0 + t_n z
        if method == "ct":
            return consistency_training_loss(f, target, x0, N, l2).item()
        return consistency_distillation_loss(f, target, lambda x, s: x0, x0, N, euler_step,
                                             l2).item()
    replayed, apart = loss(f), loss(copy.deepcopy(f).eval())  # eval: the target without masks
    assert replayed < 1e-8 and apart > 1e-4, (replayed, apart)
