"""Replaying random numbers: the student and its stop-gradient teacher draw the same dropout masks.

iCT (Song & Dhariwal 2023, Section 3.1) synchronises the dropout RNG of the student f_theta and
the teacher f_theta- = stopgrad(f_theta); ECT (Geng et al. 2024) does the same. With one network
evaluated twice, that means starting both evaluations from one generator state.

API:
    same_randomness(device, *fns) -> list   run each fn() from the same RNG state
"""

import torch


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
