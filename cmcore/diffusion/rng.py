"""Random numbers of a training step: per-example draws from explicit generators (Draws), and
the replay that gives a student and its stop-gradient teacher the same dropout masks.

Draws: every per-example random number of a step (data indices, flips, noise z, pair indices
n, times t) is drawn at the GLOBAL batch B by generators seeded with the step's seed, and a
process keeps its rows (its rank's part of its micro-batch). So example i of the global batch
gets the same numbers whatever the number of ranks and the micro-batch size: a split of the
batch changes an update by float rounding only (tests/test_microbatch.py, tests/test_ddp.py).
A draw costs one tensor of the global batch's input size per process (transient); the
networks' own randomness (dropout) comes from torch's generator, seeded per step and rank by
the training loop (cmcore.training.step.TrainStep), and so depends on the split.

iCT (Song & Dhariwal 2023, Section 3.1) synchronises the dropout RNG of the student f_theta and
the teacher f_theta- = stopgrad(f_theta); ECT (Geng et al. 2024) does the same. With one network
evaluated twice, that means starting both evaluations from one generator state.

API:
    step_seed(*key) -> int                  a 63-bit seed for a key (run seed, stage, step, ...)
    seed_device(seed, device)               seed torch's generator of ``device`` (dropout)
    Draws(seed, size, rows, step)           a step's draws (Draws(): torch's own generators)
    same_randomness(device, *fns) -> list   run each fn() from the same RNG state
"""

import hashlib

import torch


def step_seed(*key):
    """A 63-bit seed determined by ``key``: distinct keys give independent streams."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_device(seed, device):
    """torch.manual_seed(seed) for the generators a network on ``device`` draws from: the CPU
    one, and on a CUDA device CUDA's. torch.manual_seed also queues seeds for the accelerators
    not in use, formatting a traceback for each on a CUDA build without a GPU (0.06-0.3 ms a
    call, measured, once per training step)."""
    torch.default_generator.manual_seed(seed)
    if torch.device(device).type == "cuda":
        torch.cuda.manual_seed_all(seed)


class Draws:
    """draw(B)[rows]: the rows ``rows`` of per-example draws made at the global batch ``size``.

    ``seed``: one generator per device type, seeded step_seed(seed, type), consumed in call
    order (the j-th call of a step is the same draw for every process and micro-batch). Without
    ``seed``, torch's default generators; without ``size``, draws at the requested size (a
    library call outside training: ``Draws()`` is then torch's own randn, rand, ...).
    ``step``: the training step's key (run seed, stage, k), which names its data
    (cmcore.training.batches).
    """

    def __init__(self, seed=None, size=None, rows=None, step=None):
        self.seed, self.size, self.step = seed, size, step
        self.rows = slice(0, size) if rows is None and size is not None else rows
        self.generators = {}

    @property
    def n(self):
        """The number of rows this process draws for (None: any)."""
        return None if self.rows is None else len(range(*self.rows.indices(self.size)))

    def generator(self, device):
        """This step's generator of ``device``'s type (None: torch's default one)."""
        if self.seed is None:
            return None
        kind = torch.device(device).type
        if kind not in self.generators:
            gen = torch.Generator(device).manual_seed(step_seed(self.seed, kind))
            self.generators[kind] = gen
        return self.generators[kind]

    def draw(self, fn, n, device):
        """fn(m, generator) -> a tensor of m leading rows, drawn at the global batch; this
        process's n rows of it."""
        gen = self.generator(device)
        if self.size is None:
            return fn(n, gen)
        if n != self.n:
            raise ValueError(f"a per-example draw of {n} rows where this process has {self.n}")
        return fn(self.size, gen)[self.rows]

    def randn_like(self, x):
        """z ~ N(0, I) shaped like x (its dtype, device and memory format)."""
        z = self.draw(lambda m, g: torch.randn((m, *x.shape[1:]), generator=g, device=x.device,
                                               dtype=x.dtype), x.shape[0], x.device)
        if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return z.contiguous(memory_format=torch.channels_last)
        return z

    def randn(self, n, device=None, dtype=None):
        return self.draw(lambda m, g: torch.randn(m, generator=g, device=device, dtype=dtype),
                         n, device or "cpu")

    def rand(self, n, device=None, dtype=None):
        return self.draw(lambda m, g: torch.rand(m, generator=g, device=device, dtype=dtype),
                         n, device or "cpu")

    def randint(self, high, n, device=None):
        """U{0, ..., high - 1}, n of them."""
        return self.draw(lambda m, g: torch.randint(0, high, (m,), generator=g, device=device),
                         n, device or "cpu")

    def multinomial(self, p, n):
        """n category indices drawn from probabilities p (with replacement)."""
        return self.draw(lambda m, g: torch.multinomial(p, m, True, generator=g), n, p.device)


def _get_state(device):
    """The CPU generator state, and the CUDA one of ``device`` when it is a CUDA device."""
    state = [torch.get_rng_state()]
    if device.type == "cuda":
        state.append(torch.cuda.get_rng_state(device))
    return state


def _set_state(device, state):
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def same_randomness(device, *fns):
    """[fn_1(), ..., fn_m()], every fn_i started from the generator state that fn_1 started from.

    Networks with dropout then use one mask for all calls (for equal shapes). Afterwards the
    generators are where the last call left them, which is where the first one did when the calls
    draw the same random numbers; a seeded run stays reproducible either way.
    """
    device = torch.device(device)
    start = _get_state(device)
    outs = []
    for i, fn in enumerate(fns):
        if i > 0:
            _set_state(device, start)  # replay the random numbers the first call drew
        outs.append(fn())
    return outs
