"""One training step of cmcore.training.loop.fit (and of cm bench): the gradient over this
rank's rows of the global batch in micro-batches, the optimizer step with warm-up, decay and
clipping, the target network's update and the evaluation EMA.

    TrainStep(model, loss_fn, opt, after_step, world, seed, label, net)(k) -> (loss, stats, lr)
    target_update(target, model) -> after_step: theta^- <- mu theta^- + (1 - mu) theta
"""

import contextlib
import copy

import torch

from cmcore.diffusion import schedules
from cmcore.diffusion.rng import Draws, seed_device, step_seed
from cmcore.training import fast, flat
from cmcore.training.distributed import World


def _optimizer(model, opt):
    """Adam or RAdam over the model's parameters, fused as ``opt['fused']`` says
    (cmcore.training.fast)."""
    params = list(model.parameters())
    return fast.optimizer(params, opt, params[0].device if params else "cpu")


class TrainStep:
    """step(k): training step k of ``fit``, with the optimizer and evaluation EMA it updates.

        lr_k = lr min(1, (k + 1) / warmup)                (lr when warmup is 0)
        lr_k = lr (1 - k / iters)                         (opt["lr_decay"] == "linear")
        L = (1/M) sum_m loss_fn(k, rng_m), g = grad L, clipped to norm grad_clip when set
        theta <- optimizer step(theta, g, lr_k);  after_step(k, stats)  (the target update)
        ema <- d ema + (1 - d) theta,  d = min(ema, (1 + k) / (10 + k))

    Micro-batches (``opt["batch_gpu"]``, default the rank's whole share): this rank's B/P rows
    of the global batch B in M pieces, gradients accumulated (DDP synchronises after the last);
    rng_m draws the step's per-example numbers at B and keeps piece m's rows
    (cmcore.diffusion.rng.Draws, seeded by (seed, label, k)), so every split of B over ranks
    and micro-batches gives the same update up to float rounding. The networks' own randomness
    (dropout) comes from torch's generators, seeded by (seed, label, k, rank) at each step.

    ``opt``: the method's section (cmcore.training.fast for its fast-step options); ``net``:
    the network loss_fn calls (a DDP wrapper, or the model). Returns (loss in fp32, stats,
    lr_k) without waiting for the device: lr, decays and clipping norms stay Python floats or
    device tensors (tests/test_fast_step.py). cm bench times it as is.
    """

    def __init__(self, model, loss_fn, opt, after_step=None, world=None, seed=0, label="",
                 net=None):
        self.loss_fn, self.opt, self.after_step = loss_fn, opt, after_step
        self.world, self.seed, self.label, self.net = world or World(), seed, label, net
        self.optimizer = _optimizer(model, opt)
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)  # before compiling: eager
        # Each network's parameters in one buffer: its optimizer and EMA updates are one op each.
        self.flat, self.ema_flat = flat.Flat(model.parameters()), flat.Flat(self.ema.parameters())
        self.params, self.ema_params = self.flat.params, self.ema_flat.params
        self.device = self.params[0].device if self.params else torch.device("cpu")
        B = opt["batch"]
        b = B // self.world.size
        g = opt.get("batch_gpu") or b
        self.world.check_batch(B, f"{label} batch", g)
        self.rows = [slice(self.world.rank * b + m * g, self.world.rank * b + (m + 1) * g)
                     for m in range(b // g)]

    def gradient(self, k):
        """Zero the gradients, then accumulate g = grad L over the micro-batches; (L, stats)."""
        opt, M = self.opt, len(self.rows)
        self.optimizer.zero_grad(set_to_none=True)
        seed_device(step_seed(self.seed, self.label, k, self.world.rank), self.device)  # dropout
        key, total = (self.seed, self.label, k), 0.0
        seed = step_seed(*key)
        # DDP averages the accumulated gradients once, after the last micro-batch.
        no_sync = getattr(self.net, "no_sync", None)
        for m, rows in enumerate(self.rows):
            rng = Draws(seed, opt["batch"], rows, step=key)
            with contextlib.nullcontext() if m == M - 1 or no_sync is None else no_sync():
                with fast.autocast(opt, self.device):
                    loss, stats = self.loss_fn(k, rng)
                loss = loss.float()  # bf16 autocast: backward from an fp32 loss; fp32: itself
                (loss / M if M > 1 else loss).backward()
            total = total + loss.detach() / M if M > 1 else loss
        return total, stats

    def __call__(self, k):
        opt, params = self.opt, self.params
        lr = opt["lr"] * min(1.0, (k + 1) / opt["warmup"]) if opt["warmup"] else opt["lr"]
        if opt.get("lr_decay") == "linear":  # no warm-up: as torch's LambdaLR(1 - k / iters)
            lr = opt["lr"] * (1 - k / opt["iters"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, stats = self.gradient(k)
        if opt["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(params, opt["grad_clip"])
        self.optimizer.step()
        if self.after_step is not None:
            self.after_step(k, stats)
        decay = schedules.ema_warmup_decay(opt["ema"], k)
        with torch.no_grad():
            flat.lerp_(self.ema_flat, self.flat, 1 - decay)
        return loss, stats, lr


def target_update(target, model):
    """after_step(k, stats) for ``fit``: theta^- <- stopgrad(mu theta^- + (1 - mu) theta), mu =
    stats["mu"], over parameter lists taken once."""
    target_flat, model_flat = flat.Flat(target.parameters()), flat.Flat(model.parameters())

    def after(k, stats):
        with torch.no_grad():
            flat.lerp_(target_flat, model_flat, 1 - stats["mu"])
    return after
