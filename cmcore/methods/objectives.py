"""Training objectives over the D / f contract. Each returns the batch-mean loss.

Per-example random numbers come from ``rng`` (cmcore.diffusion.rng.Draws: in training, the
loop's draws at the global batch; by default torch's own generators). CD and CT
run the target network theta^- in train mode under the online network's dropout masks
(cmcore.diffusion.rng.same_randomness): with theta^- = theta and t_n -> t_{n+1} the loss then
goes to 0, as it must; with dropout 0 (the published CD and CT runs) nothing changes.
Teacher and target passes run under torch.inference_mode (no autograd bookkeeping at all); their
result is cloned into an ordinary tensor before it meets the online network's output, since an
inference tensor cannot be saved for backward. Time grids are copied to the device once per
(N, device), not every step: a host-to-device copy makes the host wait for the device.
"""

import functools

import torch

from cmcore.diffusion.precond import _per_sample
from cmcore.diffusion.rng import Draws, same_randomness
from cmcore.diffusion.schedules import karras_grid, pd_grid


def edm_loss(D, x0, sigma_data=0.5, P_mean=-1.2, P_std=1.2, rng=None):
    """E_{s, n}[ lambda(s) ||D(x0 + n, s) - x0||^2 ], ln s ~ N(P_mean, P_std^2), n ~ N(0, s^2 I),
    lambda(s) = (s^2 + sd^2) / (s sd)^2 (EDM denoising score matching, the teacher's loss).
    """
    rng = rng or Draws()
    sigma = (rng.randn(x0.shape[0], x0.device) * P_std + P_mean).exp()
    s = _per_sample(sigma, x0)
    weight = (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    D_x = D(x0 + s * rng.randn_like(x0), sigma)
    return (weight * (D_x - x0).square()).mean()


@functools.lru_cache(maxsize=256)
def _grid_on(grid, N, eps, T, rho, device, dtype):
    # An ordinary tensor, made once; non_blocking: the host does not wait for the device (the
    # source is pageable memory, staged by CUDA before the call returns: safe to free).
    with torch.inference_mode(False), torch.no_grad():
        return grid(N, eps, T, rho).to(device, dtype, non_blocking=True)


def _device_grid(grid, N, eps, T, rho, x0):
    """``grid(N, eps, T, rho)`` on x0's device in x0's dtype (the same values, cached)."""
    return _grid_on(grid, N, eps, T, rho, x0.device, x0.dtype)


def _pair_indices(x0, N, rng):
    """n ~ U{1, ..., N-1} as 0-based indices into the ascending grid: (t_n, t_{n+1})."""
    return rng.randint(N - 1, x0.shape[0], x0.device)


def consistency_distillation_loss(f, f_target, D_teacher, x0, N, solver, distance,
                                  eps=0.002, T=80.0, rho=7.0, weighting=None, rng=None):
    """L_CD^N = E[ lambda(t_n) d(f_theta(x_{t_{n+1}}, t_{n+1}), f_theta-(x^phi_{t_n}, t_n)) ]
    (paper, Algorithm 2), x_{t_{n+1}} = x + t_{n+1} z, x^phi_{t_n} one ODE-solver step of the
    teacher from t_{n+1} to t_n.
    """
    rng = rng or Draws()
    t = _device_grid(karras_grid, N, eps, T, rho, x0)
    n = _pair_indices(x0, N, rng)
    t_n, t_n1 = t[n], t[n + 1]
    # Sample x_{t_{n+1}} ~ N(x, t_{n+1}^2 I).
    x_n1 = x0 + _per_sample(t_n1, x0) * rng.randn_like(x0)
    with torch.inference_mode():
        # One step of the teacher's PF-ODE solver gives x^phi_{t_n}.
        x_phi = solver(D_teacher, x_n1, t_n1, t_n)

    def target():  # the target net maps x^phi_{t_n}
        with torch.inference_mode():
            return f_target(x_phi, t_n)
    # The online and target nets under the same dropout masks (as openai's code runs them).
    online, target = same_randomness(x0.device, lambda: f(x_n1, t_n1), target)
    d = distance(online, target.clone())
    return (d if weighting is None else weighting(t_n, t_n1) * d).mean()


def consistency_training_loss(f, f_target, x0, N, distance, eps=0.002, T=80.0, rho=7.0,
                              weighting=None, rng=None):
    """L_CT^N = E[ lambda(t_n) d(f_theta(x + t_{n+1} z, t_{n+1}), f_theta-(x + t_n z, t_n)) ]
    (paper, Algorithm 3): the teacher step replaced by the unbiased estimate x + t_n z.
    """
    rng = rng or Draws()
    t = _device_grid(karras_grid, N, eps, T, rho, x0)
    n = _pair_indices(x0, N, rng)
    t_n, t_n1 = t[n], t[n + 1]
    # One z shared by both points of the pair: the Tweedie estimate of the ODE step.
    z = rng.randn_like(x0)

    def target():
        with torch.inference_mode():
            return f_target(x0 + _per_sample(t_n, x0) * z, t_n)
    # The online and target nets under the same dropout masks (as openai's code runs them).
    online, target = same_randomness(
        x0.device, lambda: f(x0 + _per_sample(t_n1, x0) * z, t_n1), target)
    d = distance(online, target.clone())
    return (d if weighting is None else weighting(t_n, t_n1) * d).mean()


def ddim_step(D, x, t, t_next):
    """x_{t'} = D(x, t) + (t'/t) (x - D(x, t)): the DDIM (= Euler) step of the VE PF-ODE."""
    D_x = D(x, t)
    return D_x + _per_sample(t_next, x) / _per_sample(t, x) * (x - D_x)


def progressive_distillation_loss(D_student, D_teacher, x0, steps, sigma_data=0.5,
                                  eps=0.002, T=80.0, rho=7.0, rng=None):
    """E[ w(t) ||D_s(x_t, t) - x0~||^2 ] (Salimans & Ho 2022, in EDM's sigma parameterisation).

    One student DDIM step t -> t'' on the ``steps``-step grid must match two teacher DDIM steps
    t -> t' -> t'' on the nested 2*steps grid; x0~ is the denoised value that makes the student's
    step land on the teacher's x'': x0~ = (x'' - r x_t) / (1 - r), r = t''/t. The weight
    w(t) = max(sd^2 / t^2, 1) is the truncated-SNR weighting of the PD paper.
    """
    rng = rng or Draws()
    grid = _device_grid(pd_grid, 2 * steps, eps, T, rho, x0)
    i = rng.randint(steps, x0.shape[0], x0.device)
    t, t_mid, t_end = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
    x_t = x0 + _per_sample(t, x0) * rng.randn_like(x0)
    with torch.inference_mode():
        # Two teacher DDIM steps t -> t' -> t''.
        x_end = ddim_step(D_teacher, ddim_step(D_teacher, x_t, t, t_mid), t_mid, t_end)
        r = _per_sample(t_end / t, x0)
        x0_target = (x_end - r * x_t) / (1 - r)
    w = torch.clamp(sigma_data**2 / _per_sample(t, x0) ** 2, min=1.0)
    return (w * (D_student(x_t, t) - x0_target.clone()).square()).mean()
