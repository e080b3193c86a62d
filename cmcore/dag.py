"""The DAG's view of a config: the methods, the Fig. 3 ablation runs, and the settings each step
depends on. Pure Python (no torch), so ``snakemake -n`` builds the DAG on a login node.

``settings(cfg, step, ...)`` is the one answer to "which config values shape this step's
outputs". The Snakefile gives each rule exactly these as ``params`` (Snakemake reruns a job when
its params change, and only then), the CLI hands each step nothing but this view of the config
(a key missing here is a KeyError, not a silent dependency), and a training run's resume file
must match the same view. Threads, resources, ``outdir`` and ``ckpt_every`` shape no output and
appear in no view.
"""

import copy
import json
import re

# What each training method is: a denoiser D or a consistency function f (Sec. 3), and whether
# it starts from the teacher. ``untrained`` is the random initialisation of a consistency model.
PAPER_METHODS = ("teacher", "cd", "ct", "pd", "untrained")
EXTRA_METHODS = ("ict", "ect", "cd_cont", "ct_cont", "sct", "scd")
METHODS = PAPER_METHODS + EXTRA_METHODS
NEEDS_TEACHER = ("cd", "pd", "ect", "cd_cont", "scd")
DENOISERS = ("teacher", "pd")  # every other method trains a consistency function

# Every trained model depends on these, besides its method's own section.
MODEL_KEYS = ("dataset", "seed", "device", "diffusion", "network")
# Keys of a training section that shape no output (the resume cadence), or change it by float
# rounding only (the micro-batch size, as the number of ranks does).
UNSHAPING = ("ckpt_every", "batch_gpu")
EXTRACTOR_KEYS = ("evaluation.feature_extractor", "evaluation.inception_weights",
                  "evaluation.prc_neighborhood")
# The second implementation and FD-DINOv2 of `cm evaluators` (cmcore.evaluation.evaluators).
PEER_KEYS = ("evaluation.cleanfid_inception", "evaluation.dinov2_weights",
             "evaluation.dinov2_arch")


def pick(cfg, paths):
    """The nested sub-dict of ``cfg`` holding just the dotted ``paths`` (absent ones skipped)."""
    out = {}
    for path in paths:
        node, dest, *keys = cfg, out, *path.split(".")
        *parents, last = keys
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
            dest = dest.setdefault(key, {})
        if isinstance(node, dict) and last in node:
            dest[last] = copy.deepcopy(node[last])
    return out


def section(method):
    """The config section of a method's training settings (``untrained`` has none)."""
    return None if method == "untrained" else method


def train_settings(cfg, method):
    """Sec. 3-5 settings of one training run: the model keys, the method's section (but its
    resume cadence), LPIPS options when the method trains with LPIPS."""
    own = section(method)
    view = pick(cfg, MODEL_KEYS + ((own,) if own else ()))
    if own in view:
        view[own] = {k: v for k, v in view[own].items() if k not in UNSHAPING}
        if view[own].get("distance") == "lpips":
            view.update(pick(cfg, ["distance_options"]))
    return view


PUBLISHED = "published_"  # method names of released models: published_<name> (their files)


def published_taus(cfg, method):
    """The config key of a released model's own taus (``published.NAME.taus``), else None."""
    if not method.startswith(PUBLISHED):
        return None
    name = method[len(PUBLISHED):]
    return f"published.{name}.taus" if "taus" in cfg.get("published", {}).get(name, {}) else None


def label_keys(cfg):
    """How a class-conditional model's sample labels are drawn (none for unconditional ones)."""
    return ["sampling.labels"] if cfg.get("network", {}).get("label_dim") else []


def sample_settings(cfg, method, steps, searched):
    """Drawing ``steps``-step samples: count, batch (it shapes the noise draws), seed, device,
    and the configured taus of Algorithm 1 unless a search supplies them."""
    paths = ["seed", "device", "sampling.num_samples", "sampling.batch", *label_keys(cfg)]
    own = published_taus(cfg, method)
    fixed = not searched or method.startswith(PUBLISHED)  # released models: the paper's taus
    if method not in DENOISERS + ("untrained",) and steps > 1 and fixed:
        paths.append(own or f"sampling.tau.{steps}")
    return pick(cfg, paths)


def settings(cfg, step, method=None, steps=None, run=None, seed=None):
    """The config values that shape the outputs of one DAG step, as a nested dict.

    ``step`` is a CLI subcommand; ``method`` / ``steps`` (train, sample, search-tau) and
    ``run`` / ``seed`` (ablate) name the job.
    """
    smp = cfg.get("sampling", {})
    searched = smp.get("tau_search", {}).get("enabled", False)
    if step == "prepare-data":
        return pick(cfg, ["dataset", "seed"])
    if step == "train-classifier":
        return pick(cfg, ["evaluation.classifier", "seed"])
    if step == "train":
        return train_settings(cfg, method)
    if step == "sample":
        return sample_settings(cfg, method, steps, searched)
    if step == "evaluate":
        return pick(cfg, ["device", "dataset.name", "evaluation.reference", *EXTRACTOR_KEYS])
    if step == "evaluators":
        return pick(cfg, ["device", "dataset.name", "evaluation.reference", *EXTRACTOR_KEYS,
                          *PEER_KEYS])
    if step == "search-tau":
        return pick(cfg, ["device", "sampling.steps", "sampling.curve_steps", "sampling.batch",
                          "sampling.tau_search", *label_keys(cfg), *EXTRACTOR_KEYS])
    if step == "ablate":
        run_method, run_cfg = run_config(cfg, run, seed)
        view = train_settings(run_cfg, run_method)
        view.update(pick(cfg, ["ablations.num_samples", "sampling.batch", *EXTRACTOR_KEYS]))
        return view
    if step == "ablation-report":
        return pick(cfg, ["ablations", "cd.solver", "cd.N", "cd.distance",
                          "evaluation.feature_extractor"])
    if step == "theorem1":
        return pick(cfg, ["theorem1", "diffusion", "seed"])
    if step == "edit":
        return pick(cfg, ["editing.taus", "editing.num_images", "seed"])
    if step == "convert":
        return pick(cfg, [f"published.{method[len(PUBLISHED):]}", "diffusion", "seed"])
    if step in ("table", "figure4"):
        return {}
    raise ValueError(f"no settings are defined for the step {step!r}")


def settings_key(view):
    """A canonical string of a settings view (the form a rule's params carry)."""
    return json.dumps(view, sort_keys=True, separators=(",", ":"))


# Fig. 3 ablation runs. A run is one training configuration, named canonically so that runs
# shared by several panels are trained once per seed:
#     cd-{solver}-N{N}-{distance}   consistency distillation (Fig. 3a-c)
#     ct-adaptive                   CT with the N(k), mu(k) curriculum (Fig. 3d)
#     ct-fixed-N{N}-mu{mu}          CT with constant N and mu (Fig. 3d baseline)
#     ict                           improved CT beside them, when ablations.ict is on
PANELS = {
    "a": "Fig. 3a: CD, distance metric",
    "b": "Fig. 3b: CD, Euler vs Heun over N",
    "c": "Fig. 3c: CD with Heun over N",
    "d": "Fig. 3d: CT, adaptive vs fixed N and mu",
}
_CD = re.compile(r"cd-(euler|heun)-N(\d+)-(l1|l2|pseudo_huber|lpips)$")
_CT_FIXED = re.compile(r"ct-fixed-N(\d+)-mu([0-9.]+)$")


def cd_run(solver, N, distance):
    return f"cd-{solver}-N{N}-{distance}"


def ct_run(N=None, mu=None):
    return "ct-adaptive" if N is None else f"ct-fixed-N{N}-mu{mu:g}"


def panels(cfg):
    """{panel: [(run, variant label, N or None)]} of the ablations: (a) CD distance at cd.solver
    and cd.N; (b) Euler vs Heun over N; (c) Heun over N; (d) adaptive vs fixed CT."""
    ab, cd = cfg["ablations"], cfg["cd"]
    return {
        "a": [(cd_run(cd["solver"], cd["N"], d), d, cd["N"]) for d in ab["distances"]],
        "b": [(cd_run(s, n, cd["distance"]), s, n) for s in ab["solvers"] for n in ab["solver_N"]],
        "c": [(cd_run("heun", n, cd["distance"]), "heun", n) for n in ab["heun_N"]],
        "d": [(ct_run(), "adaptive", None)]
        + [(ct_run(f["N"], f["mu"]), f"fixed N={f['N']}, mu={f['mu']:g}", f["N"])
           for f in ab["ct_fixed"]]
        + ([("ict", "iCT (2023)", None)] if ab["ict"] else []),
    }


def runs(cfg):
    """The distinct runs of every panel, in a stable order."""
    return sorted({run for rows in panels(cfg).values() for run, _, _ in rows})


def parse_run(run):
    """(method, {setting: value}) that a run name stands for; ValueError if it is not one."""
    if m := _CD.match(run):
        return "cd", {"solver": m[1], "N": int(m[2]), "distance": m[3]}
    if run == "ct-adaptive":
        return "ct", {"curriculum": "adaptive"}
    if m := _CT_FIXED.match(run):
        return "ct", {"curriculum": "fixed", "N": int(m[1]), "mu": float(m[2])}
    if run == "ict":
        return "ict", {}
    raise ValueError(f"{run!r} is not an ablation run; expected cd-SOLVER-N<int>-DISTANCE, "
                     "ct-adaptive or ct-fixed-N<int>-mu<float>")


def run_config(cfg, run, seed):
    """(method, config) of one ablation run: a new config whose method section carries the
    run's settings and the ablation budget, with ``seed``."""
    method, own = parse_run(run)
    out = copy.deepcopy(cfg)
    # iCT runs on CT's budget; s1 means its own curriculum's end there, so it is not copied.
    budget = {k: v for k, v in cfg["ablations"]["ct" if method == "ict" else method].items()
              if v is not None and not (method == "ict" and k == "s1")}
    out[method].update({**budget, **own})
    out["seed"] = seed
    return method, out
