"""What a training run cost: steps, images seen, wall time, device-hours and FLOPs.

FLOPs are counted, not estimated: torch's FlopCounterMode over one extra gradient pass of the
first step of each fit, made before it and thrown away (counting may change the rounding of
what it watches, so no step of the run is counted): the forward, backward and JVP matrix
products and convolutions of this process's rows, times the number of ranks (the global
batch); the same counter as ``cm bench``. A compiled step is not counted (None). The record
goes into the checkpoint (``compute``), the samples' and metrics' JSON, Table 1 and the
FID-against-compute plot (cmcore.evaluation.reports).
"""

import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn):
    """(fn()'s result, the FLOPs it dispatches: 2 per multiply-add, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, counter.get_total_flops()


def device_name(device):
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class Meter:
    """Sums the fits of one run: ``fit`` calls count(fn) and start(seconds), then
    stop(steps, batch); ``record()`` is the run's compute."""

    def __init__(self, world_size=1, device="cpu"):
        self.devices, self.device = world_size, device_name(device)
        self.steps = self.images = 0
        self.seconds, self.flops, self.counted = 0.0, 0, True

    def start(self, seconds_before=0.0):
        self.t0 = time.time() - seconds_before

    def count(self, fn, count=True):
        """The FLOPs of fn(), a step's gradient pass whose result is thrown away."""
        if not count:
            self.counted = False
            return
        self.per_step = count_flops(fn)[1] * self.devices

    def stop(self, steps, batch):
        self.steps += steps
        self.images += steps * batch
        self.seconds += time.time() - self.t0
        self.flops += getattr(self, "per_step", 0) * steps

    def state(self):
        """The totals of the fits finished so far (a resume file keeps them)."""
        return {k: getattr(self, k) for k in ("steps", "images", "seconds", "flops", "counted")}

    def load(self, state):
        for k, v in state.items():
            setattr(self, k, v)

    def record(self):
        seconds = round(self.seconds, 2)
        return {"steps": self.steps, "images": self.images, "seconds": seconds,
                "devices": self.devices, "device": self.device,
                "device_hours": round(seconds * self.devices / 3600, 6),
                "tflop": self.flops / 1e12 if self.counted else None}
