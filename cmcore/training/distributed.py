"""Data-parallel training inside one job: ``torchrun --nproc_per_node=P -m cmcore train ...``.

theta <- Adam(theta, (1/P) sum_r grad L_r), L_r the mean loss over rank r's B/P examples: the
gradient of the mean over the GLOBAL batch of B = the config's ``batch`` examples (the paper's
batch 512 is global; the learning rate is the config's, not scaled). B must be divisible by P.

How the runs of P processes and of one process stay equal (up to float noise):
1. Every rank seeds torch's global generator alike (the config's seed) and draws everything for
   the full global batch: the data indices and flips of B examples (``World.local`` then keeps
   rows [r B/P, (r+1) B/P)), and, inside the loss, every per-example random number. The
   objectives draw those with ``torch.randn_like(x0)``, ``torch.randn(B_local)``,
   ``torch.randint(lo, hi, (B_local,))``, ``torch.rand([B_local, 1])``,
   ``torch.multinomial(p, B_local, replacement=True)`` (iCT) and ``F.dropout`` on x0's local
   batch; ``World.global_draws`` is a TorchFunctionMode that turns each such call
   whose leading dimension is B/P into the same call at B and returns rank r's rows (dropout:
   ATen's dropout of ones at B gives the mask, rank r multiplies its rows by the mask's). So every
   rank consumes the generator exactly as one process does, the generator states of all ranks
   and of a one-process run stay equal, and the noise z, the indices n (hence t_n, sigma) and
   the dropout masks of example i are the same whatever P. No objective knows about ranks.
   Draws of another leading size (the batch draw itself at B, per-batch scalars) pass through:
   every rank draws them alike. Per-example draws through other calls (``Tensor.normal_``,
   ``torch.normal``, ``torch.bernoulli``) would be drawn at B/P on every rank (the same numbers
   on every rank): add them to the mode before an objective uses them.
2. DistributedDataParallel averages gradients over ranks: with equal local batches that is the
   gradient of the global mean. Optimizer, gradient clipping, EMA and target network follow the
   synchronised parameters, so they are identical on every rank. Logged losses are all-reduced
   to the global mean; the first non-finite step is reduced to its minimum over ranks.
3. Only rank 0 writes the checkpoint, the resume file, the CSV log and progress lines. Every
   rank reads the same resume file (its RNG states are those of every rank, see 1); a resume file
   of a P-process run resumes under any other P, and one process's under DDP. A stop signal
   seen by any rank stops every rank after the same step (a max-reduce over a CPU group each
   step); the others wait at a barrier until rank 0 has written the resume file.

Backends: nccl on CUDA (one device per rank, ``cuda:LOCAL_RANK``), gloo on CPU.
"""

import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_LIKE = (torch.randn_like, torch.rand_like, torch.randint_like)
_SIZED = (torch.randn, torch.rand, torch.randint)


class World:
    """This process's place among ``size`` data-parallel ranks (size 1: a plain run)."""

    def __init__(self, size=1, rank=0, local_rank=0):
        self.size, self.rank, self.local_rank = size, rank, local_rank
        self.owns_group, self.cpu_group, self.cuda = False, None, False

    @classmethod
    def from_env(cls):
        """The world torchrun describes in WORLD_SIZE, RANK and LOCAL_RANK (else size 1)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        return cls(size, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self):
        return self.rank == 0

    def check_batch(self, batch, name):
        """ValueError unless the global batch splits evenly over the ranks."""
        if batch % self.size:
            raise ValueError(f"{name} {batch} is not divisible by the world size {self.size} "
                             "(torchrun --nproc_per_node x nodes); the batch is global")

    def start(self, device):
        """Join the process group (nccl on CUDA, gloo on CPU); the device of this rank."""
        if self.size == 1:
            return device
        self.cuda = str(device).startswith("cuda")
        if self.cuda:
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(self.local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.cuda else "gloo")
            self.owns_group = True
        # Stop flags are reduced on the CPU, without a host-device sync.
        self.cpu_group = dist.new_group(backend="gloo") if self.cuda else None
        return device

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    def local(self, x):
        """Rows [rank B/P, (rank+1) B/P) of a global batch x of B rows."""
        if self.size == 1:
            return x
        b = x.shape[0] // self.size
        return x[self.rank * b:(self.rank + 1) * b]

    def wrap(self, model):
        """``model`` in DistributedDataParallel (gradients averaged over ranks), or itself."""
        if self.size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if self.cuda else None
        return DistributedDataParallel(model, device_ids=ids)

    def global_draws(self, batch):
        """Inside: per-example random draws at the local batch are made at ``batch``, sliced."""
        if self.size == 1:
            return contextlib.nullcontext()
        return _GlobalDraws(self, batch // self.size, batch)

    def mean(self, x):
        """The mean over ranks of a tensor (a loss: the global-batch mean)."""
        if self.size == 1:
            return x
        x = x.detach().clone()
        dist.all_reduce(x)
        return x / self.size

    def first_bad(self, first):
        """The smallest non-zero value over ranks of ``first`` (0 when zero everywhere)."""
        if self.size == 1:
            return first
        big = torch.iinfo(first.dtype).max
        x = torch.where(first == 0, big, first)
        dist.all_reduce(x, op=dist.ReduceOp.MIN)
        return torch.where(x == big, 0, x)

    def agree_stop(self, stop):
        """The stop signal number any rank has seen (max over ranks), else None."""
        if self.size == 1:
            return stop
        flag = torch.tensor([stop or 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return int(flag) or None

    def barrier(self):
        if self.size > 1:
            dist.barrier(group=self.cpu_group)

    def restore_rng(self, states):
        """After set_rng_states: every rank's CUDA generator takes rank 0's saved state."""
        if self.size > 1 and self.cuda and states["cuda"]:
            torch.cuda.set_rng_state(states["cuda"][0])


class _GlobalDraws(TorchFunctionMode):
    """Per-example random draws at the local batch b become draws at the global batch B,
    sliced to this rank's rows (step 1 of the module docstring)."""

    def __init__(self, world, b, B):
        super().__init__()
        self.world, self.b, self.B = world, b, B

    def _grow(self, size):
        size = list(size)
        if size and size[0] == self.b:
            return [self.B, *size[1:]]
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = None
        if func in _LIKE and args and isinstance(args[0], torch.Tensor):
            if self._grow(args[0].shape) is not None:
                out = func(self._global_like(args[0]), *args[1:], **kwargs)
        elif func in _SIZED:
            out = self._sized(func, args, kwargs)
        elif func is F.dropout:
            out = self._dropout(func, *args, **kwargs)
        elif func is torch.multinomial:
            out = self._multinomial(func, *args, **kwargs)
        if out is None:
            return func(*args, **kwargs)
        return out if func is F.dropout else self.world.local(out)

    def _global_like(self, x):
        """An empty tensor like x at the global batch, its dimensions in x's memory order (a
        CPU generator may fill tensors in memory order: channels-last ones differ)."""
        perm = sorted(range(x.ndim), key=lambda d: -x.stride(d))  # stable: ties by dimension
        size = [self.B, *x.shape[1:]]
        inverse = [perm.index(d) for d in range(x.ndim)]
        return x.new_empty([size[d] for d in perm]).permute(inverse)

    def _sized(self, func, args, kwargs):
        if "size" in kwargs:
            size = self._grow(kwargs["size"])
            return None if size is None else func(*args, **{**kwargs, "size": size})
        for i, a in enumerate(args):  # randint(high, size), randint(low, high, size), randn(size)
            if isinstance(a, list | tuple | torch.Size):
                size = self._grow(a)
                return None if size is None else func(*args[:i], size, *args[i + 1:], **kwargs)
        if func is not torch.randint and args and all(isinstance(a, int) for a in args):
            size = self._grow(args)  # randn(b, d, ...)
            return None if size is None else func(*size, **kwargs)
        return None

    def _multinomial(self, func, input, num_samples, replacement=False, **kwargs):
        # One category per example (iCT's noise index n): drawn at B, this rank's rows kept.
        if input.ndim != 1 or num_samples != self.b or not replacement:
            return None
        return func(input, self.B, True, **kwargs)

    def _dropout(self, func, input, p=0.5, training=True, inplace=False):
        # The mask (0 or 1/(1-p)) of ATen's own dropout of ones at the global batch: the same
        # random numbers and the same values as one process's dropout of its global batch.
        if not training or not 0 < p < 1 or not input.ndim or input.shape[0] != self.b:
            return None
        mask = self.world.local(func(self._global_like(input).fill_(1), p, True))
        return input.mul_(mask) if inplace else input * mask
