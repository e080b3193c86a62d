"""The fast-step options (cmcore.training.fast: precision, tf32, fused, compile) against the
plain path on CPU: the defaults are the plain path bitwise, fused Adam / foreach RAdam agree
within 1e-6, bf16 autocast within bf16's rounding; EMA and target updates equal a loop over
parameters; between log rows fit never asks the device for a value; inference-mode targets are
safe."""

import contextlib
import copy
import csv
import math

import pytest
import torch
from conftest import TINY
from torch.overrides import TorchFunctionMode

from cmcore.config import ConfigError, validate
from cmcore.data import load_dataset
from cmcore.diffusion import schedules
from cmcore.diffusion.solvers import heun_step
from cmcore.methods import objectives
from cmcore.methods.distances import l2
from cmcore.models import make_model
from cmcore.prepared import save_prepared
from cmcore.training import fast, flat, loop
from cmcore.training.checkpoints import load_checkpoint
from cmcore.training.loop import train

QUIET = dict(echo=lambda s: None)
PLAIN = {"precision": "fp32", "tf32": False, "fused": False, "compile": False}
SECTIONS = ("teacher", "cd", "ct", "pd")


def config(**sections):
    """TINY with attention at 4x4, a few steps per method, each section updated by ``sections``."""
    cfg = copy.deepcopy(TINY)
    cfg["network"]["attn_resolutions"] = [4]
    cfg["teacher"].update(iters=4, log_every=1, warmup=2, grad_clip=1.0)
    cfg["cd"].update(iters=3, log_every=1)
    cfg["ct"].update(iters=3, log_every=1)
    cfg["pd"].update(iters=2, log_every=1)
    for name, values in sections.items():
        cfg[name].update(values)
    return validate(cfg)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Prepared digits and a (4-step) teacher for CD and PD."""
    tmp = tmp_path_factory.mktemp("fast")
    torch.set_num_threads(1)
    cfg = config()
    data = str(tmp / "data.npz")
    save_prepared(data, *load_dataset(cfg["dataset"], seed=0))
    teacher = str(tmp / "teacher.pt")
    train(cfg, "teacher", data, teacher, **QUIET)
    return {"data": data, "teacher": teacher}


def run(setup, tmp_path, method, name="run", **options):
    """Train ``method`` with its section updated by ``options``: (checkpoint, logged losses)."""
    out = tmp_path / name / "checkpoint.pt"
    out.parent.mkdir()
    sections = {method if method != "untrained" else "teacher": options}
    train(config(**sections), method, setup["data"], str(out), teacher_path=setup["teacher"],
          **QUIET)
    with open(out.parent / "train_log.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    return load_checkpoint(str(out)), losses


def states(ckpt):
    """The parameter-like tensors of a checkpoint: model, EMA, target (or the PD stages)."""
    keys = ("model", "ema", "target") if ckpt.get("stages") is None else ()
    out = {f"{k}.{n}": v for k in keys if ckpt[k] is not None for n, v in ckpt[k].items()}
    for s, state in (ckpt.get("stages") or {}).items():
        out.update({f"stage{s}.{n}": v for n, v in state.items()})
    return out


def test_every_method_section_has_the_options():
    cfg = config()
    for section in SECTIONS:
        assert {k: cfg[section][k] for k in PLAIN} == {
            "precision": "fp32", "tf32": True, "fused": "auto", "compile": False}
    for bad in ({"precision": "fp16"}, {"fused": "yes"}, {"compile": "no"}):
        with pytest.raises(ConfigError, match=f"cd.{next(iter(bad))}"):
            config(cd=bad)


def test_optimizer_fuses_on_cuda_or_when_asked():
    p = [torch.nn.Parameter(torch.zeros(3))]

    def kinds(name, fused, device):
        d = fast.optimizer(p, {"optimizer": name, "lr": 1e-3, "fused": fused}, device).defaults
        return bool(d.get("fused")), bool(d.get("foreach"))
    assert kinds("adam", "auto", "cpu") == (False, False)  # torch's default: a loop on CPU
    assert kinds("radam", "auto", "cpu") == (False, False)
    assert kinds("adam", "auto", "cuda") == (True, False)
    assert kinds("radam", "auto", "cuda") == (False, True)  # no fused RAdam in torch 2.14
    assert kinds("adam", True, "cpu") == (True, False)
    assert kinds("radam", True, "cpu") == (False, True)
    assert kinds("adam", False, "cuda") == (False, False)


@pytest.mark.parametrize("method", SECTIONS)
def test_defaults_are_the_plain_path_bitwise(setup, tmp_path, method):
    # fused auto and tf32 do nothing on CPU; fp32 adds no autocast; compile is off.
    default, losses = run(setup, tmp_path, method, "default")
    plain, plain_losses = run(setup, tmp_path, method, "plain", **PLAIN)
    assert losses == plain_losses
    a, b = states(default), states(plain)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["teacher", "cd"])  # Adam (fused kernel), RAdam (foreach)
def test_fused_optimizer_equals_the_loop_within_1e_6(setup, tmp_path, method):
    plain, plain_losses = run(setup, tmp_path, method, "plain", fused=False)
    fused, losses = run(setup, tmp_path, method, "fused", fused=True)
    assert losses[0] == plain_losses[0]  # the first loss precedes any optimizer step
    assert losses == pytest.approx(plain_losses, rel=1e-6, abs=1e-7)
    a, b = states(fused), states(plain)
    for k in a:  # not bitwise: the fused kernel rounds in another order (about 1 ulp)
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6, msg=k)


@pytest.mark.parametrize("method", ["teacher", "cd", "pd"])
def test_bf16_autocast_is_close_to_fp32(setup, tmp_path, monkeypatch, method):
    updates = []
    for name, precision in (("fp32", "fp32"), ("bf16", "bf16")):
        rec = Recorder(monkeypatch)
        ckpt, losses = run(setup, tmp_path, method, name, precision=precision)
        first = rec.calls[0]  # pd: its first stage; every run starts it from the same weights
        updates.append(torch.cat([(b - a).flatten() for a, b in zip(*first, strict=True)]))
        if precision == "fp32":
            ref, ref_losses = ckpt, losses
    assert all(map(math.isfinite, losses))
    # The first step sees the same weights and noise: bf16 rounding only (8-bit mantissa).
    assert losses[0] == pytest.approx(ref_losses[0], rel=3e-2)
    assert losses == pytest.approx(ref_losses, rel=0.1)
    # Parameters, EMA and target stay fp32; the steps taken are those of fp32 up to rounding
    # (Adam's first steps are about lr sign(g): a tiny gradient may flip, so no elementwise test).
    a, b = states(ckpt), states(ref)
    assert all(a[k].dtype == b[k].dtype for k in a)
    bf16, fp32 = updates
    cosine = torch.nn.functional.cosine_similarity(bf16, fp32, dim=0)
    assert cosine > 0.99 and (bf16 - fp32).norm() < 0.2 * fp32.norm()  # here: 0.999, 0.05


class Recorder:
    """Wraps loop.fit: the parameters after each optimizer step, the EMA and target;
    ``calls``: (initial, trained) parameters of each fit."""

    def __init__(self, monkeypatch):
        self.steps, self.calls, self.real = [], [], loop.fit
        monkeypatch.setattr(loop, "fit", self.fit)

    def fit(self, model, loss_fn, opt, log, after_step=None, *args, resume=None, **kwargs):
        self.model, self.opt = model, opt
        self.initial = [p.detach().clone() for p in model.parameters()]

        def after(k, stats):
            target = resume.extra().get("target")  # the target's state dict, as saved
            before = None if target is None else {n: v.clone() for n, v in target.items()}
            params = [p.detach().clone() for p in model.parameters()]
            if after_step is not None:
                after_step(k, stats)
            after_target = None if target is None else {n: v.clone() for n, v in target.items()}
            self.steps.append((k, stats, params, before, after_target))
        self.ema, *rest = self.real(model, loss_fn, opt, log, after, *args, resume=resume,
                                    **kwargs)
        self.calls.append((self.initial, [p.detach().clone() for p in model.parameters()]))
        return (self.ema, *rest)


@pytest.mark.parametrize("method", ["teacher", "cd"])
def test_ema_and_target_updates_equal_a_loop_over_parameters(setup, tmp_path, monkeypatch,
                                                             method):
    rec = Recorder(monkeypatch)
    run(setup, tmp_path, method)
    # Evaluation EMA: e <- lerp(e, theta_k, 1 - decay_k) after each step k, one tensor at a time.
    ema = [p.clone() for p in rec.initial]
    formula = [p.double() for p in rec.initial]
    for k, _, params, _, _ in rec.steps:
        decay = schedules.ema_warmup_decay(rec.opt["ema"], k)
        for e, f, p in zip(ema, formula, params, strict=True):
            e.lerp_(p, 1 - decay)
            f.mul_(decay).add_(p.double(), alpha=1 - decay)
    got = list(rec.ema.parameters())
    for e, f, g in zip(ema, formula, got, strict=True):
        assert torch.equal(g, e)  # foreach lerp == per-tensor lerp, bitwise
        torch.testing.assert_close(g.double(), f, rtol=0, atol=1e-6)  # == decay e + (1-d) p
    if method != "cd":
        return
    # Target theta^- <- mu theta^- + (1 - mu) theta after each optimizer step.
    names = [n for n, _ in rec.model.named_parameters()]
    for _, stats, params, before, after in rec.steps:
        mu = stats["mu"]
        for n, p in zip(names, params, strict=True):
            assert torch.equal(after[n], before[n].lerp(p, 1 - mu))
            torch.testing.assert_close(after[n], mu * before[n] + (1 - mu) * p, rtol=0,
                                       atol=1e-6)


T = torch.Tensor
# What makes the host wait for a CUDA device: reading a value, or an output sized by the data.
SYNCS = {T.item, T.__bool__, T.__float__, T.__int__, T.__index__, T.tolist, T.numpy, T.cpu,
         T.nonzero, torch.nonzero, T.masked_select, torch.masked_select, torch.argwhere,
         torch.unique, T.unique}


class SyncWatch(TorchFunctionMode):
    """Records (step, call, tensor) for every call in SYNCS while fit runs."""

    def __init__(self):
        super().__init__()
        self.step, self.events = None, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCS:
            self.events.append((self.step, func.__name__, args[0] if args else None))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("method", SECTIONS)
def test_no_host_sync_between_log_rows(setup, tmp_path, monkeypatch, method, fused):
    real, watch, seen = loop.fit, SyncWatch(), {}

    def fit(model, loss_fn, opt, *args, **kwargs):
        def watched(k, rng):
            watch.step = k
            return loss_fn(k, rng)
        with watch:
            out = real(model, watched, opt, *args, **kwargs)
        seen.setdefault("counters", []).extend(
            s["step"] for s in out[1].state.values() if "step" in s)
        seen["K"] = opt["iters"]
        return out
    monkeypatch.setattr(loop, "fit", fit)
    warm = {"warmup": 3, "grad_clip": 1.0}  # both exercised
    run(setup, tmp_path, method, iters=8, log_every=4, fused=fused, **warm)
    counters = {id(c) for c in seen["counters"]}
    assert all(c.device.type == "cpu" for c in seen["counters"])
    # The torch optimizer's own step counters are CPU tensors (read without a device sync).
    # Step 0 builds lazy state (the data loader draws its seed with .item()), as on CUDA.
    bad = [(k, name) for k, name, t in watch.events if k is not None and k > 0
           and (k + 1) % 4 and k + 1 != seen["K"] and id(t) not in counters]
    assert not bad, bad
    assert any((k + 1) % 4 == 0 for k, _, _ in watch.events)  # the watch does see log rows


def _cd_parts():
    torch.manual_seed(0)
    net = {"arch": "mlp", "in_channels": 2, "hidden": 16, "depth": 2}
    diffusion = {"sigma_data": 0.5, "sigma_min": 0.002}
    f = make_model(net, "consistency", diffusion)
    target = copy.deepcopy(f).eval().requires_grad_(False)
    teacher = make_model(net, "denoiser", diffusion).eval().requires_grad_(False)
    return f, target, teacher, torch.randn(32, 2)


def test_an_inference_tensor_cannot_be_saved_for_backward():
    # Why the objectives clone what comes out of inference mode before it meets f's output.
    f, target, _, x = _cd_parts()
    with torch.inference_mode():
        y = target(x, torch.ones(32))
    assert y.is_inference()
    with pytest.raises(RuntimeError, match="[Ii]nference tensors cannot be saved for backward"):
        (f(x, torch.ones(32)) * y).sum().backward()  # mul saves y for f's gradient
    (f(x, torch.ones(32)) * y.clone()).sum().backward()


def _losses(f, target, teacher, x, distance):
    return {
        "cd": lambda: objectives.consistency_distillation_loss(
            f, target, teacher, x, 6, heun_step, distance),
        "ct": lambda: objectives.consistency_training_loss(f, target, x, 6, distance),
        "pd": lambda: objectives.progressive_distillation_loss(f, teacher, x, 2),
    }


def _no_grad_instead(mode=True):
    return torch.no_grad() if mode else contextlib.nullcontext()


@pytest.mark.parametrize("name", ["cd", "ct", "pd"])
def test_inference_mode_targets_equal_no_grad_targets(monkeypatch, name):
    f, target, teacher, x = _cd_parts()

    def product(a, b):  # a distance that saves its second argument for backward
        return -(a * b).flatten(1).mean(1)
    results = []
    for patch in (False, True):
        with monkeypatch.context() as m:
            if patch:  # what the objectives did before: torch.no_grad for the targets
                m.setattr(torch, "inference_mode", _no_grad_instead)
            for distance in (l2, product):
                torch.manual_seed(1)
                f.zero_grad()
                loss = _losses(f, target, teacher, x, distance)[name]()
                loss.backward()
                results.append([loss.detach()] + [p.grad.clone() for p in f.parameters()])
    half = len(results) // 2
    for a, b in zip(results[:half], results[half:], strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_device_grid_is_made_once_with_the_same_values():
    x = torch.zeros(4, 2)
    g = objectives._device_grid(schedules.karras_grid, 7, 0.002, 80.0, 7.0, x)
    assert g is objectives._device_grid(schedules.karras_grid, 7, 0.002, 80.0, 7.0, x)
    assert torch.equal(g, schedules.karras_grid(7).to(x.dtype)) and not g.is_inference()


def test_compile_runs_the_online_network_compiled(setup, tmp_path, monkeypatch):
    # torch.compile with the eager backend (no C++ compiler, seconds): the plumbing, not
    # inductor (tests/test_gpu.py compiles for real). The EMA and target stay eager.
    compiled, real_compile = [], torch.compile

    def eager_compile(fn, *args, **kwargs):
        compiled.append(getattr(fn, "__self__", fn))
        return real_compile(fn, backend="eager")
    monkeypatch.setattr(torch, "compile", eager_compile)
    rec = Recorder(monkeypatch)
    with_compile, losses = run(setup, tmp_path, "cd", "compiled", compile=True)
    assert compiled == [rec.model]  # the online network only
    assert rec.model._compiled_call_impl is None  # eager again after fit
    monkeypatch.setattr(torch, "compile", real_compile)
    plain, plain_losses = run(setup, tmp_path, "cd", "plain")
    assert losses == plain_losses
    a, b = states(with_compile), states(plain)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flat_params", [False, True])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("exact, torch_cls", [(fast.ExactAdam, torch.optim.Adam),
                                              (fast.ExactRAdam, torch.optim.RAdam)])
def test_flat_optimizers_are_torchs_loop_bitwise(exact, torch_cls, memory_format, flat_params):
    # RAdam's first steps (rho_k <= 5) and later ones, a changing lr, gradients over six orders
    # of magnitude, a parameter without a gradient for a while (its own step count), a resume;
    # the parameters as they are, or in one buffer as TrainStep lays them out (one op updates
    # them all while every one has a gradient).
    torch.manual_seed(0)
    net = make_model({"arch": "ddpmpp", "model_channels": 16, "channel_mult": [1, 2],
                      "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.0,
                      "img_resolution": 8, "in_channels": 1}, "consistency",
                     {"sigma_data": 0.5, "sigma_min": 0.002}).to(memory_format=memory_format)
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    if flat_params:
        assert flat.flatten_(a.parameters()) is not None
    ours, theirs = exact(a.parameters(), lr=1e-3), torch_cls(b.parameters(), lr=1e-3,
                                                            foreach=False)
    g = torch.Generator().manual_seed(1)
    for k in range(40):
        for i, (p, q) in enumerate(zip(a.parameters(), b.parameters(), strict=True)):
            grad = torch.randn(p.shape, generator=g) * 10.0 ** (k % 6 - 4)
            p.grad, q.grad = (None, None) if i == 0 and k < 10 else (grad, grad.clone())
        for opt in (ours, theirs):
            opt.param_groups[0]["lr"] = 1e-3 * (1 - k / 40)
            opt.step()
        if k == 20:  # a resume: our flat moment buffers rebuilt from a loaded state dict
            ours.load_state_dict(copy.deepcopy(ours.state_dict()))
        if k == 30:  # the parameters change layout (module.to), then one buffer again
            other = torch.contiguous_format if memory_format == torch.channels_last \
                else torch.channels_last
            a.to(memory_format=other), b.to(memory_format=other)
            if flat_params:
                assert flat.flatten_(a.parameters()) is not None
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ours.state[p][key], theirs.state[q][key]), key
    assert ours.state_dict()["param_groups"][0].keys() == \
        theirs.state_dict()["param_groups"][0].keys()
    with pytest.raises(ValueError, match="default options only"):
        exact(a.parameters(), lr=1e-3, weight_decay=0.1)
    # Our state dict drives torch's own optimizer (a resume on a GPU, where the fused or
    # foreach one runs): one step advances every parameter's count by exactly one.
    other = torch_cls(b.parameters(), lr=1e-3, foreach=True)
    other.load_state_dict(copy.deepcopy(ours.state_dict()))  # as a resume file gives it
    other.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert other.state[q]["step"] == ours.state[p]["step"] + 1
    strided = torch.nn.Parameter(torch.zeros(4, 6)[:, ::2])  # every other column: not dense
    with pytest.raises(ValueError, match="dense parameters"):
        exact([strided], lr=1e-3)


def test_flat_parameters_keep_values_and_layouts_in_one_buffer():
    torch.manual_seed(0)
    cfg = {"arch": "ddpmpp", "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
           "attn_resolutions": [4], "dropout": 0.0, "img_resolution": 8, "in_channels": 1}
    nets = [make_model(cfg, "denoiser", {"sigma_data": 0.5}).to(memory_format=torch.channels_last)
            for _ in range(2)]
    before = [[p.detach().clone() for p in net.parameters()] for net in nets]
    a, b = (flat.Flat(net.parameters()) for net in nets)
    for f, old in zip((a, b), before, strict=True):
        assert f.buffer.numel() == sum(p.numel() for p in f.params)
        for p, q in zip(f.params, old, strict=True):
            assert torch.equal(p, q) and p.stride() == q.stride()  # channels-last kept
            assert p.untyped_storage().data_ptr() == f.buffer.untyped_storage().data_ptr()
    assert flat.flatten_(a.params).data_ptr() == a.buffer.data_ptr()  # already flat: kept
    # lerp_ of two Flats is one op on their buffers, and it is a _foreach_ lerp bitwise.
    want = [p.clone() for p in a.params]
    torch._foreach_lerp_(want, b.params, 0.3)
    with torch.no_grad():
        flat.lerp_(a, b, 0.3)
    assert all(torch.equal(p, q) for p, q in zip(a.params, want, strict=True))
    # A parameter moved out of the buffer (module.to does that): no buffer, the _foreach_ path.
    nets[0].to(memory_format=torch.contiguous_format)
    assert a.buffer is None
    want = [p.clone() for p in a.params]
    torch._foreach_lerp_(want, b.params, 0.5)
    with torch.no_grad():
        flat.lerp_(a, b, 0.5)
    assert all(torch.equal(p, q) for p, q in zip(a.params, want, strict=True))
    # Moved into one buffer again (now contiguous, b's still channels-last): found again, and
    # lerp_ still matches element to element (the layouts differ: the _foreach_ path).
    buffer = flat.flatten_(a.params)
    for f in (a, flat.Flat(a.params, move=False)):
        assert (f.buffer.data_ptr(), f.buffer.numel()) == (buffer.data_ptr(), buffer.numel())
    want = [p.clone() for p in a.params]
    torch._foreach_lerp_(want, b.params, 0.7)
    with torch.no_grad():
        flat.lerp_(a, b, 0.7)
    assert all(torch.equal(p, q) for p, q in zip(a.params, want, strict=True))
