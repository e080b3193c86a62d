"""The data points of each training step, read from the prepared file by a DataLoader.

Step k's examples are drawn by its own generator, seeded by (seed, stage, k, "data"):

    i = U{0, ..., n-1}^B,  flip = U[0, 1)^B < 1/2      (the global batch of B; numpy Philox)

and a rank reads only its rows [r B/P, (r+1) B/P) of them from disk (cmcore.prepared: one
pread per row), with their labels. A DataLoader prefetches the steps to come in ``workers``
processes (0: in the training process). Nothing depends on what was read before: a resumed run
continues with the sample order of an uninterrupted one, and so does every number of ranks and
every micro-batch split (cmcore.diffusion.rng.Draws carries each step's key and rows).
"""

import numpy as np
import torch

from cmcore.diffusion.rng import step_seed
from cmcore.prepared import PreparedFile


class StepRows(torch.utils.data.Dataset):
    """Item j: (k, rows, labels, flips) of step k = k0 + j, this rank's ``rows`` of its global
    batch of ``size`` examples (numpy arrays, tensors once through the DataLoader: rows uint8
    or float as stored; flips bool, or None)."""

    def __init__(self, path, key, k0, size, rows, xflip):
        self.file, self.key, self.k0 = PreparedFile(path), key, k0
        self.size, self.rows, self.xflip = size, rows, xflip

    def __len__(self):
        return 1 << 40  # steps until the loop stops asking

    def __getitem__(self, j):
        k = self.k0 + j
        gen = np.random.Generator(np.random.Philox(step_seed(*self.key, k, "data")))
        i = gen.integers(0, self.file.n, self.size)[self.rows]
        flip = (gen.random(self.size) < 0.5)[self.rows] if self.xflip else None
        return k, self.file.rows(i), self.file.labels(i), flip


class Batches:
    """batch(rng) of the training loop: the stored rows of the micro-batch ``rng.rows`` of step
    ``rng.step`` = (seed, stage, k), from a DataLoader of StepRows started at the first step
    asked for (again after a jump: a resume, the next PD stage)."""

    def __init__(self, path, rank, size, xflip, workers=0, pin=False):
        self.path, self.rank, self.world_size, self.xflip = path, rank, size, xflip
        self.workers, self.pin = workers, pin
        self.loader, self.key, self.item = None, None, None

    def _start(self, seed, stage, k, size):
        b = size // self.world_size
        rows = slice(self.rank * b, (self.rank + 1) * b)
        data = StepRows(self.path, (seed, stage), k, size, rows, self.xflip)
        # The loader's own seed (workers' torch/random seeds, unused) from an explicit generator.
        gen = torch.Generator().manual_seed(step_seed(seed, stage, k, "loader"))
        loader = torch.utils.data.DataLoader(
            data, batch_size=None, num_workers=self.workers, pin_memory=self.pin,
            prefetch_factor=2 if self.workers else None, generator=gen)
        self.loader, self.key, self.rank_start = iter(loader), (seed, stage, size), rows.start

    def __call__(self, rng):
        """(rows, labels, flips) of this micro-batch (CPU tensors)."""
        seed, stage, k = rng.step
        same_run = self.key == (seed, stage, rng.size) and self.item is not None
        if not (same_run and self.item[0] == k):  # not this step's rows (micro-batch 2, ...)
            if not (same_run and self.item[0] == k - 1):  # nor the loader's next step
                self._start(seed, stage, k, rng.size)
            self.item = next(self.loader)
        _, x, y, flip = self.item
        part = slice(rng.rows.start - self.rank_start, rng.rows.stop - self.rank_start)
        return x[part], y[part], None if flip is None else flip[part]
