# Config validation, run enumeration and input functions; no rules.
import os
import sys

from cmcore.ablations import panels, runs
from cmcore.config import ConfigError, validate
from cmcore.methods import NEEDS_TEACHER

try:
    CFG = validate(config)
except ConfigError as error:
    sys.exit(f"config error: {error}")

OUT = CFG["outdir"]
ENV = "../envs/cmcore.yaml"
RESOLVED = f"{OUT}/config.yaml"
DATA = f"{OUT}/data/train.npz"
CLASSIFIER = f"{OUT}/classifier/classifier.pt"


def res(kind):
    """Resources of one kind of step (gpu, mem_mb, runtime) from the config."""
    return CFG["resources"][kind]


def sampler_steps(method):
    """Step counts sampled for a method: the teacher's Heun steps, 1 for the untrained net."""
    if method == "teacher":
        return [CFG["teacher"]["sampler_steps"]]
    if method == "untrained":
        return [1]
    return sorted(set(CFG["sampling"]["steps"]) | set(CFG["sampling"]["curve_steps"]))


def train_loss_plot(method):
    """The loss plot a training run writes beside its CSV log, shown in the report."""
    return report(
        f"{OUT}/runs/{method}/loss.png",
        caption="../report/loss.rst",
        category="Training",
        labels={"method": method, "figure": "loss"},
    )


def train_rule_io(method):
    """Checkpoint, log and benchmark paths of one training rule."""
    return dict(
        output=f"{OUT}/runs/{method}/checkpoint.pt",
        log=f"{OUT}/logs/train_{method}.log",
        benchmark=f"{OUT}/benchmarks/train_{method}.tsv",
    )


# Training with several GPUs in one job runs data-parallel under torchrun (cmcore.distributed).
_GPUS = CFG["resources"]["train"]["gpu"]
TRAIN_CM = (
    f"torchrun --standalone --nproc_per_node={_GPUS} -m cmcore" if _GPUS > 1 else "cm"
)

PAPER_METHODS = ["teacher", "cd", "ct", "pd", "untrained"]
# Later recipes (iCT, ECT, continuous time), trained only for the reproduce_extras target, when
# the config has their section.
EXTRA_METHODS = [m for m in ("ict", "ect", "cd_cont", "ct_cont") if m in CFG]
METHODS = PAPER_METHODS + EXTRA_METHODS
RUNS = [(m, n) for m in PAPER_METHODS for n in sampler_steps(m)]
EXTRA_RUNS = [(m, n) for m in EXTRA_METHODS for n in CFG["sampling"]["steps"]]
TABLE1_RUNS = [
    (m, n)
    for m, n in RUNS
    if m in ("teacher", "untrained") or n in CFG["sampling"]["steps"]
]
CURVE_RUNS = [
    (m, n) for m in ("cd", "ct", "pd") for n in CFG["sampling"]["curve_steps"]
]


def extractor_weights(wildcards):
    """The evaluation classifier for the digits; nothing for Inception (a configured file)."""
    return (
        [CLASSIFIER] if CFG["evaluation"]["feature_extractor"] == "classifier" else []
    )


ABLATIONS = CFG["ablations"]
ABLATION_PANELS = (
    [p for p, rows in panels(CFG).items() if rows] if ABLATIONS["enabled"] else []
)
ABLATION_SCORES = (
    [
        f"{OUT}/ablations/{r}/seed{s}/scores.csv"
        for r in runs(CFG)
        for s in ABLATIONS["seeds"]
    ]
    if ABLATIONS["enabled"]
    else []
)


def ablation_teacher(wildcards):
    """The teacher checkpoint for CD runs; nothing for CT runs."""
    return [rules.train_teacher.output[0]] if wildcards.run.startswith("cd-") else []


SEARCH_TAUS = CFG["sampling"]["tau_search"]["enabled"]


def searched_taus(wildcards):
    """The searched taus of a consistency model's multistep sampling, when the config asks."""
    searched = wildcards.method not in ("teacher", "pd", "untrained")
    if SEARCH_TAUS and searched and int(wildcards.steps) > 1:
        return [f"{OUT}/taus/{wildcards.method}.json"]
    return []


def extra_teacher(wildcards):
    """The teacher checkpoint for methods that start from it (ECT, continuous-time CD)."""
    return [rules.train_teacher.output[0]] if wildcards.method in NEEDS_TEACHER else []


wildcard_constraints:
    method="|".join(METHODS),
    steps=r"\d+",
