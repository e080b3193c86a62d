"""Training methods: what each one trains and the loss it minimises per step.

A method names its model kind (a denoiser D or a consistency function f), whether it starts
from the teacher's weights, whether it keeps a target network theta^- (updated after each step
as theta^- <- mu theta^- + (1 - mu) theta), and its loss builder. A builder takes the method's
settings ``opt`` and a Context and returns loss_fn(k, rng) -> (loss, stats) for
cmcore.training.loop.fit, ``rng`` the step's per-example draws (cmcore.diffusion.rng.Draws:
the rows of this process's micro-batch); ``stats['mu']`` is the target's decay.
Class-conditional data: each step's networks (online, target, teacher and so its ODE step) see
the labels of the step's data points (Context.draw).

    teacher   EDM denoising loss (the teacher of CD and PD)
    cd, ct    the paper's Algorithms 2 and 3
    ict       improved CT (Song & Dhariwal 2023): theta^- = stopgrad(theta), cmcore.methods.ict
    ect       easy consistency tuning (Geng et al. 2024) from the teacher, cmcore.methods.ect
    cd_cont   continuous-time CD (N -> infinity, one JVP per step), cmcore.methods.continuous
    ct_cont   continuous-time CT, cmcore.methods.continuous
    sct, scd  sCM (Lu & Song 2024): TrigFlow, tangent normalisation, adaptive weighting,
              tangent warm-up; from scratch or distilled from the teacher, cmcore.methods.scm
    untrained the random initialisation of a consistency model (no steps)
PD is a sequence of fits (cmcore.training.loop), not a single loss. Which methods start from
the teacher is cmcore.dag.NEEDS_TEACHER (the DAG reads it without torch).
"""

from dataclasses import dataclass

from cmcore.diffusion import schedules
from cmcore.diffusion.precond import conditioned
from cmcore.diffusion.solvers import get_solver
from cmcore.methods import continuous, ect, ict, objectives, scm


@dataclass(frozen=True)
class Method:
    kind: str  # "denoiser", "consistency" or "trigflow" (a consistency model, sCM's f)
    from_teacher: bool  # initialise the backbone from the teacher's (CD, ECT)
    target: bool  # keep an EMA target network theta^-
    build: object = None  # (opt, Context) -> loss_fn


@dataclass(frozen=True)
class Context:
    """What a loss builder works with: the online network (f_theta or D_theta), the target
    f_theta^- (None without one), the teacher D_phi (None without one), batch(rng) -> the data
    points x of the step's rows ``rng.rows``, or (x, y) with their one-hot class labels y, the
    Karras grid (eps, T, rho), the distance d and sigma_data."""

    net: object
    target: object
    teacher: object
    batch: object
    grid: dict
    distance: object
    sigma_data: float

    def draw(self, rng):
        """(x, f_theta, f_theta^-, D_phi) for the step's data points x (drawn by ``rng``): the
        networks given the points' class labels, the same to all three."""
        out = self.batch(rng)
        x, y = out if isinstance(out, tuple) else (out, None)
        return x, *(None if m is None else conditioned(m, y)
                    for m in (self.net, self.target, self.teacher))


def _teacher(opt, c):
    def loss_fn(k, rng):
        x, D, _, _ = c.draw(rng)
        return objectives.edm_loss(D, x, c.sigma_data, rng=rng), {}
    return loss_fn


def _cd(opt, c):
    solver = get_solver(opt["solver"])

    def loss_fn(k, rng):
        x, f, f_target, D = c.draw(rng)
        loss = objectives.consistency_distillation_loss(f, f_target, D, x, opt["N"], solver,
                                                        c.distance, **c.grid, rng=rng)
        return loss, {"N": opt["N"], "mu": opt["target_mu"]}
    return loss_fn


def _ct(opt, c):
    def loss_fn(k, rng):
        if opt["curriculum"] == "fixed":  # the baseline of Fig. 3d: constant N and mu
            N, mu = opt["N"], opt["mu"]
        else:  # the adaptive curriculum: N(k) grows and mu(k) follows it
            N = schedules.ct_N(k, opt["iters"], opt["s0"], opt["s1"])
            mu = schedules.ct_mu(k, opt["iters"], opt["s0"], opt["s1"], opt["mu0"],
                                 opt["schedule_variant"])
        x, f, f_target, _ = c.draw(rng)
        loss = objectives.consistency_training_loss(f, f_target, x, N, c.distance, **c.grid,
                                                    rng=rng)
        return loss, {"N": N, "mu": mu}
    return loss_fn


def _ict(opt, c):
    def loss_fn(k, rng):
        # Exponential curriculum N(k); lognormal pair index; 1 / dt weighting; theta^- = theta.
        N = ict.ict_N(k, opt["iters"], opt["s0"], opt["s1"])
        x, f, _, _ = c.draw(rng)
        loss = ict.ict_loss(f, x, N, P_mean=opt["P_mean"],
                            P_std=opt["P_std"], distance=c.distance, **c.grid, rng=rng)
        return loss, {"N": N}
    return loss_fn


def _ect(opt, c):
    d = max(1, round(opt["iters"] / opt["stages"]))  # iterations per halving of t - r

    def loss_fn(k, rng):
        x, f, _, _ = c.draw(rng)
        loss = ect.ect_loss(f, x, k, d, q=opt["q"],
                            P_mean=opt["P_mean"], P_std=opt["P_std"], eps=c.grid["eps"],
                            T=c.grid["T"], distance=c.distance, rng=rng)
        return loss, {"ect_stage": ect.ect_stage(k, d)}
    return loss_fn


def _cd_cont(opt, c):
    def loss_fn(k, rng):
        x, f, _, D = c.draw(rng)
        return continuous.continuous_cd_loss(f, D, x, c.distance, **c.grid, rng=rng), {}
    return loss_fn


def _ct_cont(opt, c):
    def loss_fn(k, rng):
        x, f, _, _ = c.draw(rng)
        return continuous.continuous_ct_loss(f, x, c.distance, **c.grid, rng=rng), {}
    return loss_fn


def _scm(distill):
    def build(opt, c):
        def loss_fn(k, rng):
            x, f, _, D = c.draw(rng)
            if distill:  # the teacher's PF-ODE in TrigFlow
                def velocity(x_t, t, x0, z):
                    return scm.trigflow_velocity(D, x_t, t, c.sigma_data)
            else:
                velocity = scm.ct_velocity
            r = min(1.0, k / opt["tangent_warmup"]) if opt["tangent_warmup"] else 1.0
            loss = scm.scm_loss(f, x, velocity, r, c.sigma_data, opt["P_mean"], opt["P_std"],
                                c.grid["eps"], c.grid["T"], opt["tangent_c"],
                                opt["adaptive_weight"], rng=rng)
            return loss, {"r": r}
        return loss_fn
    return build


METHODS = {
    "teacher": Method("denoiser", False, False, _teacher),
    "cd": Method("consistency", True, True, _cd),
    "ct": Method("consistency", False, True, _ct),
    "ict": Method("consistency", False, False, _ict),
    "ect": Method("consistency", True, False, _ect),
    "cd_cont": Method("consistency", True, False, _cd_cont),
    "ct_cont": Method("consistency", False, False, _ct_cont),
    "sct": Method("trigflow", False, False, _scm(distill=False)),
    "scd": Method("trigflow", True, False, _scm(distill=True)),
    "untrained": Method("consistency", False, False, None),
}
