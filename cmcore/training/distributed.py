"""Data-parallel training inside one job: ``torchrun --nproc_per_node=P -m cmcore train ...``.

theta <- Adam(theta, (1/P) sum_r grad L_r), L_r the mean loss over rank r's B/P examples: the
gradient of the mean over the GLOBAL batch of B = the config's ``batch`` examples (the paper's
batch 512 is global; the learning rate is the config's, not scaled). B must be divisible by P.

How the runs of P processes and of one process stay equal (up to float noise):
1. Every per-example random number of a step (the data indices and flips of the B examples,
   and inside the loss the noise z, the indices n, the times t) is drawn at the global batch
   by generators seeded with the step's seed, and each rank keeps its rows
   (cmcore.diffusion.rng.Draws, made by cmcore.training.step.TrainStep): example i gets the
   same numbers whatever P (and whatever the micro-batch size). The networks' own randomness
   (dropout) comes from torch's generators, seeded per step and rank: it differs between ranks
   and depends on P, as in EDM.
2. DistributedDataParallel averages gradients over ranks: with equal local batches that is the
   gradient of the global mean. Optimizer, gradient clipping, EMA and target network follow the
   synchronised parameters, so they are identical on every rank. Logged losses are all-reduced
   to the global mean; the first non-finite step is reduced to its minimum over ranks.
3. Only rank 0 writes the checkpoint, the resume file, the CSV log and progress lines. Every
   rank reads the same resume file (a step's random numbers follow from its seed, see 1); a
   resume file of a P-process run resumes under any other P, and one process's under DDP. A
   stop signal seen by any rank stops every rank after the same step (a max-reduce over a CPU
   group each step); the others wait at a barrier until rank 0 has written the resume file.

Backends: nccl on CUDA (one device per rank, ``cuda:LOCAL_RANK``), gloo on CPU.
"""

import os

import torch
import torch.distributed as dist


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

    def check_batch(self, batch, name, batch_gpu=None):
        """ValueError unless the global batch splits evenly over the ranks and each rank's share
        into micro-batches of ``batch_gpu`` rows (None: one micro-batch)."""
        if batch % self.size:
            raise ValueError(f"{name} {batch} is not divisible by the world size {self.size} "
                             "(torchrun --nproc_per_node x nodes); the batch is global")
        if batch_gpu and (batch // self.size) % batch_gpu:
            raise ValueError(f"{name} {batch} over {self.size} rank(s) is {batch // self.size} "
                             f"rows per rank, not a multiple of batch_gpu {batch_gpu}; pick a "
                             "batch_gpu that divides it")

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

    def wrap(self, model):
        """``model`` in DistributedDataParallel (gradients averaged over ranks), or itself.

        Buffers are not re-broadcast at each forward: ours are constants (resampling filters,
        Fourier frequencies), equal on every rank from construction, and the broadcast is an
        in-place copy that torch.func.jvp refuses inside its transform (the continuous-time
        methods and sCM run the wrapped model under it)."""
        if self.size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if self.cuda else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

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
