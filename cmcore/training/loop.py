"""One training loop for every objective: optimizer, warm-up, evaluation EMA, target network
theta^- with decay mu(k), CSV log (cmcore.training.log) and atomic checkpoints.

Methods: those of cmcore.methods.registry (teacher, cd, ct, ict, ect, cd_cont, ct_cont,
untrained: one fit each) and ``pd`` (progressive distillation, one fit per halving of the steps).

Preemption: every ``ckpt_every`` iterations, and at the end of the step in which SIGTERM,
SIGUSR1 or SIGINT (Ctrl-C) arrives, the run writes its resume file ``<out>.partial``
(cmcore.training.checkpoints); a signal then ends it with Preempted (exit status 143 for
SIGTERM, 138 for SIGUSR1, 130 for Ctrl-C). A second run on the same ``<out>`` is refused while
the first holds ``<out>.lock``. ``train`` continues from a resume file of the same run and
reaches bitwise the same checkpoint as an uninterrupted run on CPU. ``<out>`` is written only
when training completes; its loss plot is the caller's (``cm train`` draws ``loss.png`` from
the CSV log, cmcore.evaluation.reports).

Data parallel: under ``torchrun --nproc_per_node=P`` each rank trains on its B/P rows of the
global batch B, gradients averaged by DDP, and only rank 0 writes files
(cmcore.training.distributed).

GPU options (each method's section, cmcore.training.fast): ``precision: bf16`` runs the loss
(online, teacher and target forwards) under bf16 autocast while backward, optimizer, EMA and target
updates stay fp32; ``tf32`` (default true) allows TF32 matmuls and convolutions on CUDA;
``fused`` (default auto: CUDA only) fuses the Adam step (RAdam: foreach); ``compile`` (default
false, experimental) runs the online network through torch.compile. The defaults leave CPU
results bitwise unchanged. Between log rows fit never waits for the device (the loss and the
first non-finite step stay there until a log row or save reads them), nor do the teacher, cd,
ct and pd losses; ict and ect still copy per-step tensors to the device.
"""

import contextlib
import copy
import math
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from cmcore import dag
from cmcore.config import code_version
from cmcore.data import to_model_space
from cmcore.diffusion.precond import one_hot
from cmcore.methods import objectives, registry
from cmcore.methods.distances import get_distance
from cmcore.models import (
    for_training,
    init_from_teacher,
    make_model,
    model_from_checkpoint,
    network_config,
    pick_device,
)
from cmcore.networks import set_dropout
from cmcore.prepared import PreparedFile
from cmcore.training import fast
from cmcore.training.batches import Batches
from cmcore.training.checkpoints import (
    FORMAT,
    ResumeFile,
    load_checkpoint,
    output_lock,
    run_identity,
    save_checkpoint,
)
from cmcore.training.compute import Meter
from cmcore.training.distributed import World
from cmcore.training.log import CSVLog
from cmcore.training.step import TrainStep, target_update

METHODS = (*registry.METHODS, "pd")


class _FollowerResume(ResumeFile):
    """The resume file as a rank other than 0 sees it: read at the start, never written."""

    def save(self, state):
        self.saved = f"{state['label']} step {state['k']}"

    def remove(self):
        pass


def _check_finite(first_bad, loss, params, label, k, resume, world):
    """FloatingPointError, before anything is logged or saved, if the loss was non-finite at any
    step so far (``first_bad`` holds the first such step, 0 for none) or a parameter is. Loss and
    step are reduced over the ranks: every rank raises alike."""
    first, value = int(world.first_bad(first_bad)), world.mean(loss).item()
    if first or not math.isfinite(value):
        where = f"{label} loss is {value} at step {k}" + (
            f" (first non-finite at step {first})" if first and first != k else "")
    elif not torch.stack([p.isfinite().all() for p in params]).all():
        where = f"{label} parameters or their EMA are not finite at step {k}"
    else:
        return value
    hint = "" if resume is None else f"; {resume.last_good()}"
    raise FloatingPointError(f"{where}; lower the lr first, then check the target's mu, the "
                             f"ema and diffusion.sigma_data{hint}")


def fit(model, loss_fn, opt, log, after_step=None, echo=print, label="", resume=None,
        start=None, world=None, seed=0, net=None, meter=None):
    """Run ``opt['iters']`` steps of loss_fn(k, rng) -> (loss, stats); return (ema, optimizer,
    snapshots), the last holding the EMA's state every ``opt['snapshot_every']`` steps.

    Per step: lr warm-up, backward, optional gradient clipping, optimizer step, after_step(k)
    (the target-network update), then the evaluation EMA with decay min(ema, (1+k)/(10+k)).
    ``resume`` (a ResumeFile) saves the state after every ``resume.every`` steps and after the
    step in which a stop signal arrived (then raises Preempted); ``start``, such a saved state,
    is where the loop continues. A non-finite loss raises FloatingPointError at the next log
    row or save, before either is written, so the resume file keeps the last good state.
    ``world`` (cmcore.training.distributed.World), ``seed``, ``label`` and ``net``: TrainStep
    (the step's random numbers and micro-batches); logged losses are global means; a stop
    signal stops all. ``meter`` (cmcore.training.compute.Meter) counts the FLOPs of a
    thrown-away gradient pass of the first step and adds the fit's steps, images and wall time.
    ``opt``'s precision, tf32, fused and compile: cmcore.training.fast (module docstring).
    """
    world = world or World()
    step = TrainStep(model, loss_fn, opt, after_step, world, seed, label, net)
    optimizer, ema, params, device = step.optimizer, step.ema, step.params, step.device
    watched = params + step.ema_params  # checked finite at every log row and save
    K, k0, t0 = opt["iters"], 0, time.time()
    if start is not None:
        model.load_state_dict(start["model"])
        ema.load_state_dict(start["ema"])
        optimizer.load_state_dict(start["optimizer"])
        k0, t0 = start["k"], t0 - start["seconds"]
    # The first step with a non-finite loss (0: none), kept on the device: no host sync.
    first_bad = torch.zeros((), dtype=torch.long, device=device)
    # EMA snapshots every ``snapshot_every`` steps, for FID against training iterations.
    snapshots = dict(start.get("snapshots", {})) if start else {}
    every = opt.get("snapshot_every", 0)
    model.train()
    # A progress bar with ETA on a terminal (none in log files, where each row has an ETA).
    steps = tqdm(range(k0, K), desc=label, initial=k0, total=K, mininterval=2, leave=False,
                 disable=None if world.is_main else True)
    t_loop = time.time()
    with fast.tf32(opt, device), fast.compiled(model, opt):
        if meter is not None:
            if k0 < K:  # the FLOPs of a step: a gradient pass of step k0, thrown away
                meter.count(lambda: step.gradient(k0), not opt.get("compile"))
            meter.start(start["seconds"] if start else 0.0)
        for k in steps:
            loss, stats, lr = step(k)
            first_bad = torch.where((first_bad == 0) & ~loss.detach().isfinite(), k + 1,
                                    first_bad)
            if every and (k + 1) % every == 0:
                snapshots[str(k + 1)] = {n: v.clone() for n, v in ema.state_dict().items()}
            log_now = (k + 1) % opt["log_every"] == 0 or k + 1 == K
            if log_now:  # a host-device sync, as is the check before saving
                value = _check_finite(first_bad, loss, watched, label, k + 1, resume, world)
                row = {"stage": label, "step": k + 1, "loss": value, "lr": lr, **stats,
                       "seconds": round(time.time() - t0, 2)}
                log.write(row)
                eta = (time.time() - t_loop) / (k + 1 - k0) * (K - k - 1)
                echo(" ".join(f"{key}={val:.5g}" if isinstance(val, float) else f"{key}={val}"
                              for key, val in row.items()) + f" eta={eta:.0f}s")
            # Whether to write the resume file, decided once for every rank: the stop requests
            # of all ranks so far (a signal arriving later, say during the save, counts for the
            # next step).
            stop = None if resume is None else world.agree_stop(resume.stop)
            if resume is not None and (stop is not None or resume.every > 0
                                       and (k + 1) % resume.every == 0):
                if not log_now:
                    _check_finite(first_bad, loss, watched, label, k + 1, resume, world)
                resume.save({"label": label, "k": k + 1, "model": model.state_dict(),
                             "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                             "log": list(log.rows), "snapshots": dict(snapshots),
                             "meter": None if meter is None else meter.state(),
                             "seconds": round(time.time() - t0, 2)})
                if stop is not None:
                    resume.stop = resume.stop or stop  # the signal another rank received
                    world.barrier()  # rank 0 wrote the resume file before any rank exits
                    raise resume.preempted()
    if meter is not None:
        meter.stop(K, opt["batch"])
    return ema, optimizer, snapshots


@dataclass
class Run:
    """What the training of one method shares: the config view, teacher D (or None),
    batch(rng), the Karras grid, the CSV log, the echo function, the network settings, the
    device, the resume file and the state it holds (or None), the process group, the compute
    meter."""

    cfg: dict
    teacher: object
    batch: object
    grid: dict
    log: object
    echo: object
    net_cfg: dict
    device: object
    resume: object
    start: object
    world: object
    meter: object


def train(cfg, method, data_path, out_path, teacher_path=None, log_path=None, ckpt_every=0,
          echo=print, workers=0):
    """Train ``method`` on the prepared data and write its checkpoint to ``out_path`` and its
    CSV log to ``log_path`` (default: train_log.csv beside the checkpoint; none for the
    untrained baseline, which takes no step). ``cfg`` needs the keys of
    ``cmcore.dag.settings(cfg, "train", method=method)`` only.

    Writes the resume file ``<out_path>.partial`` every ``ckpt_every`` iterations (0: only on a
    stop signal) and continues from it when one of this run exists (a
    foreign, stale or unreadable one is a CheckpointError saying to delete it) and deletes it
    once ``out_path`` is written. SIGTERM/SIGUSR1/SIGINT raise Preempted after saving it
    (exit status 128 + signal number when uncaught). Under torchrun: data parallel over the
    ranks, the config's batch being global (a ValueError unless divisible by the world size);
    rank 0 writes the files, every rank returns the payload. The data are read from
    ``data_path`` by rows, ``workers`` DataLoader processes ahead (cmcore.training.batches).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    section = dag.section(method)
    if section and section not in cfg:
        raise ValueError(f"the config has no {section!r} section to train {method} with; add one "
                         "(config/config.yaml has every method's)")
    world = World.from_env()
    if method != "untrained":
        own = cfg[section]
        world.check_batch(own["batch"], f"{section}.batch", own.get("batch_gpu"))
    device = world.start(pick_device(cfg["device"]))
    cuda = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    try:
        # Initialisation, dropout and the losses' draws use torch's generator (torch gives module
        # initialisation and dropout no generator argument), seeded with the run's seed inside a
        # fork: the caller's generator state is left as it was.
        lock = output_lock(out_path) if world.is_main else contextlib.nullcontext()
        with lock, torch.random.fork_rng(devices=cuda):
            torch.manual_seed(cfg["seed"])
            return _train(cfg, method, data_path, out_path, teacher_path, log_path, ckpt_every,
                          echo, world, device, workers)
    finally:
        world.close()


def _teacher_checkpoint(path, method, net_cfg):
    """The teacher checkpoint at ``path``, refused in one line unless it holds a denoiser D of
    the network ``net_cfg`` this run trains (CD's ODE solver needs D, not a consistency model
    f; PD's students and CD's initialisation copy the teacher's network)."""
    ckpt = load_checkpoint(path)
    if ckpt["kind"] != "denoiser":
        raise ValueError(f"{path} holds a {ckpt['method']} consistency model; {method} needs the "
                         "teacher's denoiser D (cm train --method teacher)")
    diff = sorted(k for k in set(ckpt["net"]) | set(net_cfg)
                  if k != "dropout" and ckpt["net"].get(k) != net_cfg.get(k))
    if diff:  # the dropout rate is each method's own
        raise ValueError(f"{path}: the teacher's network differs from this config's in "
                         f"{', '.join(diff)}; train the teacher with this config's network")
    return ckpt


def check_labels(labels, label_dim):
    """ValueError (one line) unless the data's class labels index a ``label_dim``-way label."""
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= label_dim:
        raise ValueError(f"network.label_dim is {label_dim}, but the data's class labels span "
                         f"{lo}..{hi}; set it to the data set's number of classes")


def _train(cfg, method, data_path, out_path, teacher_path, log_path, ckpt_every, echo, world,
           device, workers):
    data = PreparedFile(data_path)  # read by rows: the data set never sits in memory
    net_cfg = network_config(cfg["network"], to_model_space(data.rows([0])).shape)
    own = cfg.get(dag.section(method), {})  # None (untrained): no section
    if "dropout" in own and "dropout" in net_cfg:  # the method's own dropout (paper configs)
        net_cfg["dropout"] = own["dropout"]
    label_dim = net_cfg.get("label_dim", 0)
    if label_dim:  # class-conditional: every step's networks see the drawn points' labels
        check_labels(data.all_labels(), label_dim)
    diff = cfg["diffusion"]
    grid = dict(eps=diff["sigma_min"], T=diff["sigma_max"], rho=diff["rho"])
    teacher = None
    if method in dag.NEEDS_TEACHER:
        teacher = model_from_checkpoint(_teacher_checkpoint(teacher_path, method, net_cfg))
        teacher = teacher.to(device)
    identity = run_identity(cfg, method, data.fingerprint(),
                            None if teacher is None else teacher.state_dict())
    teacher = None if teacher is None else for_training(teacher, device)
    resume = (ResumeFile if world.is_main else _FollowerResume)(out_path, identity, ckpt_every)
    start = resume.load()
    if not world.is_main:
        echo = lambda line: None  # noqa: E731

    cuda = torch.device(device).type == "cuda"
    rows = Batches(data_path, world.rank, world.size, cfg["dataset"]["xflip"], workers, cuda)

    def batch(rng):  # the data points of this micro-batch's rows of the global batch
        x, y, flip = rows(rng)
        x = to_model_space(x.to(device, non_blocking=True))
        if flip is not None:
            flip = flip.to(device, non_blocking=True).view(-1, *[1] * (x.ndim - 1))
            x = torch.where(flip, x.flip(-1), x)
        return (x, one_hot(y.to(device, non_blocking=True), label_dim)) if label_dim else x

    if world.is_main:
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    if log_path is None and method != "untrained":
        log_path = os.path.join(os.path.dirname(out_path) or ".", "train_log.csv")
    log = CSVLog(log_path if world.is_main else None)
    payload = {"format": FORMAT, "method": method, "net": net_cfg,
               "config": dag.settings(cfg, "train", method=method),
               "seed": cfg["seed"], "code_version": code_version()}
    meter = Meter(world.size, device)
    if start is not None and start.get("meter"):  # the stages a resumed PD run finished
        meter.load(start["meter"])
    run = Run(cfg, teacher, batch, grid, log, echo, net_cfg, device, resume, start, world, meter)
    with resume.catching_signals():
        try:
            if start is not None:
                log.restore(start["log"])
                echo(f"resuming {method} from {resume.path} at {resume.saved}")
            if method == "pd":
                payload.update(_train_pd(run))
            else:
                payload.update(_train_single(method, run))
            payload["compute"] = meter.record()
        finally:
            log.close()
        if world.is_main:
            save_checkpoint(out_path, payload)
            resume.remove()
    return payload


def _train_single(method, run):
    """Every method but PD: one run of ``fit`` on the method's loss (cmcore.methods.registry)."""
    spec = registry.METHODS[method]
    model = for_training(make_model(run.net_cfg, spec.kind, run.cfg["diffusion"]).to(run.device),
                         run.device)
    if method == "untrained":  # the initialisation, as its own evaluation EMA
        state = model.state_dict()
        return {"kind": spec.kind, "model": state, "ema": state, "snapshots": {},
                "target": None, "optimizer": None, "step": 0, "train_iters": 0}
    opt = run.cfg[method]
    if spec.from_teacher:  # the paper initialises CD from the teacher; so does ECT
        init_from_teacher(model, run.teacher)
    target, after, distance = None, None, None
    if spec.target:
        target = copy.deepcopy(model).train().requires_grad_(False)  # dropout replay
        if run.start is not None:
            target.load_state_dict(run.start["target"])
        run.resume.extra = lambda: {"target": target.state_dict()}
        after = target_update(target, model)
    if "distance" in opt:
        distance = get_distance(opt["distance"], **run.cfg.get("distance_options", {}))
        distance = distance.to(run.device) if hasattr(distance, "to") else distance
    net = run.world.wrap(model)  # after the initialisation; DDP broadcasts rank 0's
    context = registry.Context(net, target, run.teacher, run.batch, run.grid, distance,
                               run.cfg["diffusion"]["sigma_data"])
    loss_fn = spec.build(opt, context)
    ema, optimizer, snapshots = fit(model, loss_fn, opt, run.log, after, run.echo, label=method,
                                    resume=run.resume, start=run.start, world=run.world,
                                    seed=run.cfg["seed"], net=net, meter=run.meter)
    return {"kind": spec.kind, "model": model.state_dict(), "ema": ema.state_dict(),
            "snapshots": snapshots,
            "target": None if target is None else target.state_dict(),
            "optimizer": optimizer.state_dict(), "step": opt["iters"], "train_iters": opt["iters"]}


def _train_pd(run):
    """Progressive distillation: halve the sampling steps per stage, each student initialised
    from (and then teacher of the next) the EMA of the previous stage."""
    opt, sd = run.cfg["pd"], run.cfg["diffusion"]["sigma_data"]
    stages, current, steps = {}, run.teacher, opt["start_steps"] // 2
    start = run.start
    if start is not None:  # resume inside stage ``steps``, after the stages already finished
        stages, steps = dict(start["stages"]), start["stage_steps"]
        if str(2 * steps) in stages:
            current = copy.deepcopy(run.teacher)
            current.load_state_dict(stages[str(2 * steps)])
    while steps >= 1:
        student = copy.deepcopy(current).train().requires_grad_(True)
        if "dropout" in opt and "dropout" in run.net_cfg:
            set_dropout(student, opt["dropout"])  # PD's own, not its teacher's
        net = run.world.wrap(student)

        context = registry.Context(net, None, current, run.batch, run.grid, None, sd)

        def loss_fn(k, rng, context=context, steps=steps):
            x, student, _, teacher = context.draw(rng)
            return objectives.progressive_distillation_loss(
                student, teacher, x, steps, sd, **run.grid, rng=rng), {"steps": steps}
        run.resume.extra = lambda steps=steps: {"stage_steps": steps, "stages": dict(stages)}
        ema, _, _ = fit(student, loss_fn, opt, run.log, None, run.echo, label=f"pd{steps}",
                        resume=run.resume, start=start, world=run.world, seed=run.cfg["seed"],
                        net=net, meter=run.meter)
        start = None
        stages[str(steps)] = ema.state_dict()
        current, steps = ema, steps // 2
    return {"kind": "denoiser", "model": None, "ema": stages["1"], "target": None,
            "optimizer": None, "stages": stages, "step": opt["iters"] * len(stages),
            "train_iters": opt["iters"] * len(stages)}
