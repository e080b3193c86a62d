"""Theorems 1 and 2 of the paper measured on a Gaussian mixture, where the truth is exact.

Theorem 1: if L_CD^N(theta, theta; phi) = 0 and the solver has local error O(dt^(p+1)), then
sup_{n, x} ||f_theta(x, t_n) - f(x, t_n; phi)||_2 = O(dt^p), dt = max_n (t_{n+1} - t_n).
The zero-loss solution is known in closed form (a composition of solver steps), the exact
consistency function comes from GaussianMixture.ode_solve (float64), so the order p is measured
directly; CD-trained MLPs are measured the same way beside it.
Theorem 2: with Euler and the exact score, L_CD^N = L_CT^N + o(dt); measured with common random
numbers for a fixed f.
"""

import copy
import json
import os
import time
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from cmcore.config import code_version
from cmcore.diffusion.analytic import ring_mixture
from cmcore.diffusion.precond import ConsistencyFunction, _per_sample
from cmcore.diffusion.schedules import karras_grid
from cmcore.diffusion.solvers import euler_step, get_solver
from cmcore.methods.distances import l2
from cmcore.methods.registry import METHODS, Context
from cmcore.networks import build_network
from cmcore.threads import torch_threads
from cmcore.training.log import CSVLog
from cmcore.training.loop import fit
from cmcore.training.step import target_update


class GridError(NamedTuple):
    """Error of a consistency model against the exact one over test points on a grid."""

    error: float  # sup over test points and grid times of ||f - f_exact||_2
    delta_t: float  # max_n (t_{n+1} - t_n)
    error_mean: float  # mean of ||f - f_exact||_2 over the same points


def _solver(solver):
    return get_solver(solver) if isinstance(solver, str) else solver


def _dtype(f):
    """The dtype f computes in: that of its parameters, float64 for a plain callable."""
    p = next(f.parameters(), None) if isinstance(f, torch.nn.Module) else None
    return torch.float64 if p is None else p.dtype


def zero_loss_consistency(D, solver, grid):
    """f(x, t_1) = x, f(x, t_{n+1}) = f(Phi(x, t_{n+1} -> t_n), t_n): the CD solution of zero loss.

    With theta^- = theta this f makes every term of L_CD^N vanish, so it is the f_theta of
    Theorem 1. Returns a callable f(x, t) for times t (float or (B,)) on the ascending ``grid``.
    """
    grid = torch.as_tensor(grid, dtype=torch.float64)
    solver = _solver(solver)

    @torch.no_grad()
    def f(x, t):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        # Index of each time on the grid (nearest in log t; off-grid times are an error).
        idx = (t.log()[:, None] - grid.log()[None]).abs().argmin(1)
        if ((grid[idx] - t).abs() > 1e-5 * t).any():
            raise ValueError("zero_loss_consistency: every t must be a point of the grid")
        # Step every sample still above t_k down to t_{k-1}, from the top of the grid.
        y = x.clone()
        for k in range(int(idx.max()), 0, -1):
            a = idx >= k
            y[a] = solver(D, y[a], grid[k].item(), grid[k - 1].item())
        return y

    return f


class GridReference(NamedTuple):
    """Test points x ~ p_{t_n} at grid times t_n, n = 2..N, and f_exact there (float64)."""

    x: torch.Tensor
    t: torch.Tensor
    ref: torch.Tensor
    grid: torch.Tensor


def grid_reference(gm, N, *, num_points, ref_steps, seed, eps, T, rho):
    """x_j(t_n) = x0_j + t_n z_j, x0_j ~ p_data, z_j ~ N(0, I), and f(x, t_n) = x_eps (exact ODE).

    ``num_points`` pairs (x0_j, z_j) drawn from a generator seeded with ``seed`` serve every t_n
    and every N (common random numbers across N); t_1 = eps is left out since f(x, eps) = x holds
    exactly for every f in question. f_exact: ``ref_steps`` RK4 steps of GaussianMixture.ode_solve
    on the Karras grid (N, eps, T, rho).
    """
    g = torch.Generator().manual_seed(seed)
    x0, z = gm.sample(num_points, g), torch.randn(num_points, gm.means.shape[1], generator=g,
                                                  dtype=torch.float64)
    grid = karras_grid(N, eps, T, rho)
    t = grid[1:].repeat_interleave(num_points)
    x = x0.repeat(N - 1, 1) + t[:, None] * z.repeat(N - 1, 1)
    # High-accuracy RK4 in ln t: error ~1e-8 at 500 steps, far below any solver's error here.
    return GridReference(x, t, gm.ode_solve(x, t, eps, ref_steps), grid)


def grid_error(f, reference):
    """sup and mean over the reference points of ||f(x, t_n) - f_exact(x, t_n)||_2, and dt."""
    with torch.no_grad():
        dtype = _dtype(f)
        y = f(reference.x.to(dtype), reference.t.to(dtype)).to(torch.float64)
    e = (y - reference.ref).norm(dim=1)
    dt = (reference.grid[1:] - reference.grid[:-1]).max().item()
    return GridError(e.max().item(), dt, e.mean().item())


def zero_loss_cd_error(gm, solver, reference):
    """sup_{n, x} ||f_zero(x, t_n) - f_exact(x, t_n)||_2 and dt (Theorem 1 with L_CD = 0).

    f_zero composes solver steps with the exact denoiser gm.denoiser (float64); x ~ p_{t_n} at
    every grid time t_2..t_N = T of ``reference`` (grid_reference).
    Returns GridError(error, delta_t, error_mean).
    """
    f = zero_loss_consistency(gm.denoiser, solver, reference.grid)
    return grid_error(f, reference)


def fit_slope(delta_t, errors):
    """p in log error = p log dt + c, least squares: the measured order of convergence."""
    x, y = np.asarray(delta_t, float), np.asarray(errors, float)
    if not (np.isfinite(x).all() and np.isfinite(y).all() and (x > 0).all() and (y > 0).all()):
        raise ValueError("fit_slope needs positive, finite delta_t and errors")
    if len(np.unique(x)) < 3:  # two points always lie on a line: no evidence of an order
        raise ValueError(f"fit_slope needs 3 distinct delta_t, got {np.unique(x).tolist()}; "
                         "give theorem1 three or more distinct N")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def train_cd_exact(gm, solver, N, train, *, seed, eps, T, rho):
    """min_theta L_CD^N(theta, theta^-; phi) with the exact teacher D = E[x0 | x_t], l2, float32.

    The cd method's loss (cmcore.methods.registry) with data x0 ~ gm, trained by
    cmcore.training.loop.fit: Adam with the learning rate ``lr`` decayed linearly to 0; after
    each step theta^- <- mu theta^- + (1 - mu) theta (mu = ``target_ema``; 0: theta^- = theta).
    f_theta = ConsistencyFunction(MLP(hidden, depth)). ``train``: iters, batch, lr, target_ema,
    hidden, depth; ``solver``: a name (euler, heun). Returns f_theta, frozen, in eval mode.
    """
    mu = train["target_ema"]
    opt = {"iters": train["iters"], "batch": train["batch"], "lr": train["lr"], "N": N,
           "solver": solver, "target_mu": mu, "optimizer": "adam", "warmup": 0,
           "lr_decay": "linear", "grad_clip": None, "ema": 0.0,  # f itself is measured
           "log_every": train["iters"]}
    def teacher(x, t):
        return gm.denoiser(x, t).to(x.dtype)  # exact in float64, cast for the network

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initialisation (each step's draws: fit, seeded by seed)
        net = build_network({"arch": "mlp", "in_channels": gm.means.shape[1],
                             "hidden": train["hidden"], "depth": train["depth"]})
        f = ConsistencyFunction(net, eps=eps)
        target, after = f, None
        if mu > 0:
            target = copy.deepcopy(f).requires_grad_(False)
            after = target_update(target, f)

        def batch(rng):  # x0 ~ gm, drawn with the step's other random numbers
            return rng.draw(lambda m, g: gm.sample(m, g).float(), rng.n, "cpu")
        context = Context(f, target, teacher, batch, dict(eps=eps, T=T, rho=rho), l2,
                          f.sigma_data)
        fit(f, METHODS["cd"].build(opt, context), opt, CSVLog(None), after,
            echo=lambda line: None, label=f"cd {solver} N={N}", seed=seed)
    return f.eval().requires_grad_(False)


@torch.no_grad()
def pair_distances(f, D, x0, n, z, grid, distance=l2):
    """Per-sample d(f(x_{n+1}, t_{n+1}), f(x_hat, t_n)) for CD (x_hat = Euler step of D) and CT
    (x_hat = x0 + t_n z), both with x_{n+1} = x0 + t_{n+1} z: the integrands of L_CD and L_CT.

    ``n`` holds 0-based indices into the ascending ``grid`` (t_n = grid[n], t_{n+1} = grid[n+1]).
    """
    t_n, t_n1 = grid[n].to(x0.dtype), grid[n + 1].to(x0.dtype)
    x_n1 = x0 + _per_sample(t_n1, x0) * z
    a = f(x_n1, t_n1)
    d_cd = distance(a, f(euler_step(D, x_n1, t_n1, t_n), t_n))
    d_ct = distance(a, f(x0 + _per_sample(t_n, x0) * z, t_n))
    return d_cd, d_ct


def ct_cd_gap(f, gm, N_values, *, num_samples, seed, eps, T, rho, distance=l2, chunk=50_000):
    """L_CD^N - L_CT^N = o(dt) (Theorem 2: Euler, exact score, lambda = 1, theta^- = theta).

    Both losses are estimated from the same x0, z and u ~ U(0, 1), n = floor(u (N - 1)), for
    every N (common random numbers), so their difference is resolved with few samples; f is
    evaluated in its own dtype (pass a float64 copy for the cleanest difference). Returns a
    DataFrame with N, delta_t, L_cd, L_ct, gap = L_cd - L_ct, its standard error gap_se, and
    gap_over_dt = |gap| / dt.
    """
    dtype, g = _dtype(f), torch.Generator().manual_seed(seed)
    x0 = gm.sample(num_samples, g)
    z = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    u = torch.rand(num_samples, generator=g, dtype=torch.float64)

    def D(x, t):
        return gm.denoiser(x, t).to(x.dtype)

    rows = []
    for N in N_values:
        grid = karras_grid(N, eps, T, rho)
        n = (u * (N - 1)).long().clamp(max=N - 2)
        parts = [pair_distances(f, D, x0[s].to(dtype), n[s], z[s].to(dtype), grid, distance)
                 for s in (slice(i, i + chunk) for i in range(0, num_samples, chunk))]
        d_cd, d_ct = (torch.cat([p[j] for p in parts]).double() for j in (0, 1))
        diff = d_cd - d_ct
        dt = (grid[1:] - grid[:-1]).max().item()
        rows.append({"N": N, "delta_t": dt, "L_cd": d_cd.mean().item(), "L_ct": d_ct.mean().item(),
                     "gap": diff.mean().item(), "gap_se": (diff.std() / num_samples**0.5).item(),
                     "gap_over_dt": abs(diff.mean().item()) / dt})
    return pd.DataFrame(rows)


def _slope_lines(ax, dt, x0, y0, slopes=(1, 2)):
    """Dashed reference lines y = y0 (dt / x0)^p over the range of ``dt``; plain log ticks."""
    from matplotlib.ticker import NullFormatter

    xs = np.array([np.min(dt), np.max(dt)])
    for p in slopes:
        ax.plot(xs, y0 * (xs / x0) ** p, ls="--", color="0.5", lw=1)
        ax.annotate(f"slope {p}", (xs[0], y0 * (xs[0] / x0) ** p), fontsize=8, color="0.4",
                    va="bottom")
    ax.set(xscale="log", yscale="log")
    ax.xaxis.set_minor_formatter(NullFormatter())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_orders(errors, path):
    import seaborn as sns

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    sns.lineplot(data=errors, x="delta_t", y="error_sup", hue="solver", style="kind",
                 markers=True, dashes=True, ax=ax)
    # Reference slopes 1 (Euler) and 2 (Heun), a factor 2 above each zero-loss curve.
    zl = errors[errors["kind"] == "zero_loss"]
    for p, solver in ((1, "euler"), (2, "heun")):
        df = zl[zl["solver"] == solver]
        if len(df):
            mid = df.iloc[len(df) // 2]
            _slope_lines(ax, zl["delta_t"], mid["delta_t"], 2 * mid["error_sup"], (p,))
    ax.set(xlabel=r"$\Delta t = \max_n (t_{n+1} - t_n)$",
           ylabel=r"$\sup_{n,x} \|f(x, t_n) - f^*(x, t_n)\|_2$",
           title="Theorem 1: consistency error vs step size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_gap(gap, path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    dt = gap["delta_t"].to_numpy()
    ax.plot(dt, gap["L_cd"], "o-", label=r"$L_{CD}^N$ (Euler, exact score)")
    ax.plot(dt, gap["L_ct"], "s-", label=r"$L_{CT}^N$")
    ax.plot(dt, gap["gap"].abs(), "^:", label=r"$|L_{CD}^N - L_{CT}^N|$")
    i = len(dt) // 2
    _slope_lines(ax, dt, dt[i], 0.3 * abs(gap["gap"].iloc[i]))
    ax.set(xlabel=r"$\Delta t$", ylabel="loss (l2)",
           title="Theorem 2: CD vs CT loss for a fixed f")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_theorem1(settings, out_dir):
    """Measure Theorem 1 (zero-loss and trained CD) and Theorem 2 on a ring of Gaussians.

    Writes orders.csv, errors.csv, ct_cd_gap.csv, orders.png, ct_cd_gap.png and summary.json in
    ``out_dir`` and returns the summary. ``settings``: every key of the config's ``theorem1``
    section but ``enabled`` (workflow/schemas/config.schema.yaml describes each), plus the
    Karras grid's eps, T, rho, the seed and ``threads`` (torch threads):
      solvers; N_zero_loss: grids of the zero-loss order fit; N_trained: grids of the trained
        models (zero-loss errors are also reported there, not fitted); N_gap, gap_samples: the
        CT-CD gap; num_points test points per grid time (the sup over x is over these);
        ref_steps RK4 steps of the exact ODE; mixture: components, radius, std; train: iters,
        batch, lr, target_ema, hidden, depth of the CD-trained MLPs (train_cd_exact). The model
        of the gap is the Euler one (else the first solver's) at the largest N_trained, in
        float64 with theta^- = theta.
    Why the schema's defaults: N = 8 (dt = 45) is left out of the zero-loss fit, Heun being far
    from its asymptotic regime there (pairwise order ~3 from 8 to 16). With std 0.1 the exact
    flow has a large Lipschitz constant near the component boundaries and Heun's sup error is
    not yet asymptotic at N <= 256 (slope ~1.75 over N = 16..256, Euler ~1.0); with std 0.3
    both solvers are from N = 16. One thread: tiny 2-D tensors gain nothing from more, and on a
    busy 2-core machine two spinning threads were measured 10-20x slower.
    """
    with torch_threads(settings["threads"]):
        return _run(settings, out_dir)


def _run(s, out_dir):
    start, cpu = time.perf_counter(), time.process_time()
    os.makedirs(out_dir, exist_ok=True)
    grid_kw = dict(eps=s["eps"], T=s["T"], rho=s["rho"])
    m = s["mixture"]
    gm = ring_mixture(K=m["components"], radius=m["radius"], std=m["std"])

    # Exact references, shared by all solvers and kinds at the same N.
    Ns = sorted(set(s["N_zero_loss"]) | set(s["N_trained"]))
    refs = {N: grid_reference(gm, N, num_points=s["num_points"], ref_steps=s["ref_steps"],
                              seed=s["seed"], **grid_kw) for N in Ns}

    # Zero-loss CD solutions, then CD-trained models, measured on the same points.
    rows, models = [], {}
    for solver in s["solvers"]:
        for N in Ns:
            e = zero_loss_cd_error(gm, solver, refs[N])
            rows.append({"solver": solver, "kind": "zero_loss", "N": N, "delta_t": e.delta_t,
                         "error_sup": e.error, "error_mean": e.error_mean})
        for N in s["N_trained"]:
            t0 = time.perf_counter()
            models[solver, N] = train_cd_exact(gm, solver, N, s["train"], seed=s["seed"],
                                               **grid_kw)
            e = grid_error(models[solver, N], refs[N])
            rows.append({"solver": solver, "kind": "trained", "N": N, "delta_t": e.delta_t,
                         "error_sup": e.error, "error_mean": e.error_mean,
                         "train_seconds": time.perf_counter() - t0})
    errors = pd.DataFrame(rows)

    # Orders: slopes of log error against log dt, zero-loss on N_zero_loss, trained on N_trained.
    orders = []
    for (solver, kind), df in errors.groupby(["solver", "kind"], sort=False):
        df = df[df["N"].isin(s["N_zero_loss"] if kind == "zero_loss" else s["N_trained"])]
        orders.append({"solver": solver, "kind": kind,
                       "slope": fit_slope(df["delta_t"], df["error_sup"]),
                       "slope_mean": fit_slope(df["delta_t"], df["error_mean"]),
                       "n_points": len(df), "N_min": df["N"].min(), "N_max": df["N"].max(),
                       "N_values": " ".join(str(n) for n in df["N"])})
    orders = pd.DataFrame(orders)

    # Theorem 2 for a fixed, trained f with theta^- = theta.
    f = copy.deepcopy(models["euler" if "euler" in s["solvers"] else s["solvers"][0],
                            max(s["N_trained"])]).double()
    gap = ct_cd_gap(f, gm, s["N_gap"], num_samples=s["gap_samples"], seed=s["seed"], **grid_kw)

    # Tables, plots and the summary.
    errors.to_csv(os.path.join(out_dir, "errors.csv"), index=False)
    orders.to_csv(os.path.join(out_dir, "orders.csv"), index=False)
    gap.to_csv(os.path.join(out_dir, "ct_cd_gap.csv"), index=False)
    _plot_orders(errors, os.path.join(out_dir, "orders.png"))
    _plot_gap(gap, os.path.join(out_dir, "ct_cd_gap.png"))
    summary = {
        "slopes": {f"{r.solver}/{r.kind}": r.slope for r in orders.itertuples()},
        "gap_slope": fit_slope(gap["delta_t"], gap["gap"].abs()),
        "L_ct_slope": fit_slope(gap["delta_t"], gap["L_ct"]),
        "settings": s,
        "code_version": code_version(),
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "threads": torch.get_num_threads(),
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary
