"""One training loop for every objective: optimizer, warm-up, evaluation EMA, target network
theta^- with decay mu(k), CSV log and atomic checkpoints.

Methods: ``teacher`` (EDM denoising loss), ``cd`` (consistency distillation, initialised from
the teacher as in the paper), ``ct`` (consistency training, random initialisation), ``pd``
(progressive distillation, one stage per halving), ``untrained`` (the random initialisation of a
consistency model, the floor every method must beat).
"""

import copy
import csv
import math
import os
import time

import torch

from cmcore import objectives, schedules
from cmcore.config import code_version
from cmcore.data import load_prepared, to_model_space
from cmcore.distances import get_distance
from cmcore.networks import build_network
from cmcore.precond import ConsistencyFunction, Denoiser
from cmcore.solvers import get_solver

FORMAT = "cmcore-checkpoint/1"
METHODS = ("teacher", "cd", "ct", "pd", "untrained")


class CheckpointError(Exception):
    """A checkpoint is missing, truncated or foreign; the message names the file."""


def pick_device(name):
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def network_config(cfg, shape):
    """The backbone's constructor arguments for data of ``shape`` (N, C, H, W) or (N, d)."""
    net = cfg["network"]
    if net["arch"] == "mlp":
        return {"arch": "mlp", "in_channels": shape[1], "hidden": net["hidden"],
                "depth": net["depth"]}
    keys = ("arch", "model_channels", "channel_mult", "num_blocks", "attn_resolutions", "dropout")
    return {**{k: net[k] for k in keys}, "img_resolution": shape[-1], "in_channels": shape[1]}


def make_model(net_cfg, kind, diffusion):
    """A denoiser D or a consistency function f around a fresh backbone."""
    F = build_network(net_cfg)
    if kind == "denoiser":
        return Denoiser(F, diffusion["sigma_data"])
    return ConsistencyFunction(F, diffusion["sigma_data"], diffusion["sigma_min"])


def save_checkpoint(path, payload):
    """torch.save to a temporary file, then rename: a reader never sees a partial file."""
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """A cmcore checkpoint (plain tensors and config only, loaded with weights_only=True)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found; run the training step that writes it")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or pickled-class files all land here
        raise CheckpointError(
            f"{path} is not a readable cmcore checkpoint ({type(e).__name__}); delete it and "
            "re-run the step that writes it") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cmcore checkpoint (no format tag {FORMAT!r})")
    return ckpt


def model_from_checkpoint(ckpt, weights="ema", stage=None):
    """The network of a checkpoint in eval mode; ``stage`` picks a PD student by step count."""
    model = make_model(ckpt["net"], ckpt["kind"], ckpt["config"]["diffusion"])
    state = ckpt["stages"][str(stage)] if stage is not None else ckpt[weights]
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def _optimizer(model, opt):
    cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[opt["optimizer"]]
    return cls(model.parameters(), lr=opt["lr"])


class CSVLog:
    """Append rows (dicts) to a CSV file, header taken from the first row."""

    def __init__(self, path):
        self.path, self.writer, self.file = path, None, None

    def write(self, row):
        if self.writer is None:
            self.file = open(self.path, "w", newline="")  # closed in close()
            self.writer = csv.DictWriter(self.file, fieldnames=list(row))
            self.writer.writeheader()
        self.writer.writerow(row)
        self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()


def fit(model, loss_fn, opt, log, after_step=None, echo=print, label=""):
    """Run ``opt['iters']`` steps of loss_fn(k) -> (loss, stats); return (ema, optimizer).

    Per step: lr warm-up, backward, optional gradient clipping, optimizer step, after_step(k)
    (the target-network update), then the evaluation EMA with decay min(ema, (1+k)/(10+k)).
    """
    optimizer = _optimizer(model, opt)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    K, t0 = opt["iters"], time.time()
    model.train()
    for k in range(K):
        lr = opt["lr"] * min(1.0, (k + 1) / opt["warmup"]) if opt["warmup"] else opt["lr"]
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, stats = loss_fn(k)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if opt["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(params, opt["grad_clip"])
        optimizer.step()
        if after_step is not None:
            after_step(k, stats)
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - schedules.ema_warmup_decay(opt["ema"], k))
        if (k + 1) % opt["log_every"] == 0 or k + 1 == K:
            value = loss.item()  # the only host-device sync, at logging intervals
            if not math.isfinite(value):
                raise FloatingPointError(f"{label} loss is {value} at step {k + 1}; lower the lr")
            row = {"stage": label, "step": k + 1, "loss": value, "lr": lr, **stats,
                   "seconds": round(time.time() - t0, 2)}
            log.write(row)
            echo(" ".join(f"{key}={val:.5g}" if isinstance(val, float) else f"{key}={val}"
                          for key, val in row.items()))
    return ema, optimizer


def train(cfg, method, data_path, out_path, teacher_path=None, echo=print):
    """Train ``method`` on the prepared data and write its checkpoint to ``out_path``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    torch.manual_seed(cfg["seed"])
    device = pick_device(cfg["device"])
    x_all = to_model_space(load_prepared(data_path)[0]).to(device)
    net_cfg = network_config(cfg, x_all.shape)
    diff = cfg["diffusion"]
    grid = dict(eps=diff["sigma_min"], T=diff["sigma_max"], rho=diff["rho"])
    teacher = None
    if method in ("cd", "pd"):
        teacher = model_from_checkpoint(load_checkpoint(teacher_path)).to(device)

    def batch(size):
        x = x_all[torch.randint(0, x_all.shape[0], (size,), device=device)]
        if cfg["dataset"]["xflip"]:
            flip = torch.rand(size, device=device) < 0.5
            x = torch.where(flip.view(-1, *[1] * (x.ndim - 1)), x.flip(-1), x)
        return x

    log = CSVLog(os.path.join(os.path.dirname(out_path) or ".", "train_log.csv"))
    payload = {"format": FORMAT, "method": method, "net": net_cfg, "config": cfg,
               "seed": cfg["seed"], "code_version": code_version()}
    try:
        if method == "pd":
            payload.update(_train_pd(cfg, teacher, batch, grid, log, echo, net_cfg, device))
        else:
            payload.update(_train_single(cfg, method, teacher, batch, grid, log, echo, net_cfg,
                                         device))
    finally:
        log.close()
    save_checkpoint(out_path, payload)
    return payload


def _train_single(cfg, method, teacher, batch, grid, log, echo, net_cfg, device):
    """Teacher, CD, CT or the untrained baseline: one run of ``fit``."""
    kind = "denoiser" if method == "teacher" else "consistency"
    model = make_model(net_cfg, kind, cfg["diffusion"]).to(device)
    opt = cfg["teacher" if method in ("teacher", "untrained") else method]
    if method == "untrained":
        opt = {**opt, "iters": 0}
    target, loss_fn, after = None, None, None
    if method == "teacher":
        def loss_fn(k):
            sd = cfg["diffusion"]["sigma_data"]
            return objectives.edm_loss(model, batch(opt["batch"]), sd), {}
    elif method in ("cd", "ct"):
        if method == "cd":  # the paper initialises CD from the teacher
            model.model.load_state_dict(teacher.model.state_dict())
        target = copy.deepcopy(model).eval().requires_grad_(False)
        distance = get_distance(opt["distance"], cfg["distance_options"]["lpips_backbone"])
        if hasattr(distance, "to"):
            distance = distance.to(device)
        loss_fn = _cd_loss(model, target, teacher, opt, batch, grid, distance) if method == "cd" \
            else _ct_loss(model, target, opt, batch, grid, distance)

        def after(k, stats):
            # theta^- <- stopgrad(mu theta^- + (1 - mu) theta)
            with torch.no_grad():
                torch._foreach_lerp_(list(target.parameters()), list(model.parameters()),
                                     1 - stats["mu"])
    ema, optimizer = fit(model, loss_fn, opt, log, after, echo, label=method)
    return {"kind": kind, "model": model.state_dict(), "ema": ema.state_dict(),
            "target": None if target is None else target.state_dict(),
            "optimizer": optimizer.state_dict(), "step": opt["iters"], "train_iters": opt["iters"]}


def _cd_loss(f, target, teacher, opt, batch, grid, distance):
    solver = get_solver(opt["solver"])

    def loss_fn(k):
        loss = objectives.consistency_distillation_loss(
            f, target, teacher, batch(opt["batch"]), opt["N"], solver, distance, **grid)
        return loss, {"N": opt["N"], "mu": opt["target_mu"]}
    return loss_fn


def _ct_loss(f, target, opt, batch, grid, distance):
    def loss_fn(k):
        # Curriculum: N(k) grows and mu(k) follows it.
        N = schedules.ct_N(k, opt["iters"], opt["s0"], opt["s1"])
        mu = schedules.ct_mu(k, opt["iters"], opt["s0"], opt["s1"], opt["mu0"],
                             opt["schedule_variant"])
        loss = objectives.consistency_training_loss(
            f, target, batch(opt["batch"]), N, distance, **grid)
        return loss, {"N": N, "mu": mu}
    return loss_fn


def _train_pd(cfg, teacher, batch, grid, log, echo, net_cfg, device):
    """Progressive distillation: halve the sampling steps per stage, each student initialised
    from (and then teacher of the next) the EMA of the previous stage."""
    opt, sd = cfg["pd"], cfg["diffusion"]["sigma_data"]
    stages, current, steps = {}, teacher, cfg["pd"]["start_steps"] // 2
    while steps >= 1:
        student = copy.deepcopy(current).train().requires_grad_(True)

        def loss_fn(k, student=student, current=current, steps=steps):
            return objectives.progressive_distillation_loss(
                student, current, batch(opt["batch"]), steps, sd, **grid), {"steps": steps}
        ema, _ = fit(student, loss_fn, opt, log, None, echo, label=f"pd{steps}")
        stages[str(steps)] = ema.state_dict()
        current, steps = ema, steps // 2
    return {"kind": "denoiser", "model": None, "ema": stages["1"], "target": None,
            "optimizer": None, "stages": stages, "step": opt["iters"] * len(stages),
            "train_iters": opt["iters"] * len(stages)}
