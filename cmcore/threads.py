"""Thread settings: run a block of work with a given number of torch intra-op threads.

At the bottom of the layers (torch only), so the metrics, the classifier and the Theorem 1
experiment share it without importing one another.
"""

import contextlib

import torch


@contextlib.contextmanager
def torch_threads(num_threads):
    """Run the body with ``torch.set_num_threads(num_threads)`` (None: unchanged), then restore.

    Tiny networks gain little from a second intra-op thread, and on a busy 2-core machine
    (Snakemake running jobs side by side) two spinning threads can be 5-10x slower than one.
    """
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
