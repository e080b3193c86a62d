# Config validation, the resolved config, run enumeration, input functions and flag builders;
# no rules. Torch-free: `snakemake -n` builds the DAG on a login node without torch.
import os
import shlex
import sys

import snakemake.benchmark

from cmcore import dag
from cmcore.config import ConfigError, read_yaml, validate, write_resolved

try:
    # Snakemake's loader keeps the last of two equal keys: read each file strictly too.
    for path in workflow.configfiles:
        read_yaml(path)
    CFG = validate(config)
except ConfigError as error:
    sys.exit(f"config error: {error}")

OUT = CFG["outdir"]
ENV = "../envs/cmcore.yaml"
DATA = f"{OUT}/data/train.npz"
CLASSIFIER = f"{OUT}/classifier/classifier.pt"
# The resolved config (defaults filled) that every step reads. No rule takes it as input, so an
# edit reruns only the steps whose settings it changes: each rule's `params.settings` holds
# exactly the values its outputs depend on (cmcore.dag). It is written when jobs are about to
# run (never by a dry run), and only when its content changes.
RESOLVED = f"{OUT}/config.yaml"

# Snakemake's benchmark samples a job's memory every 0.5 s for its first 30 samples, then every
# 30 s: a job of 15-45 s (most Fig. 3 runs) ends before its peak is sampled (788 MB recorded for
# jobs that reach 845-886), and every sample is psutil's walk of /proc/PID/smaps_rollup, 5-9 ms
# of kernel time for a torch process, on the jobs' cores. Every 2 s for the first 30 samples:
# the peaks of jobs up to a minute long, and a 20 s job sampled 11 times, not 31 (README).
snakemake.benchmark.BENCHMARK_INTERVAL_SHORT = 2


onstart:
    write_resolved(CFG, RESOLVED)


localrules:
    all,
    reproduce_table,
    reproduce_extras,
    evaluate_published,
    table2_published,
    table1,
    table_extended,
    figure4,
    ablation_report,
    edits,


def settings(step, **keys):
    """params of a rule: the config values that shape the step's outputs (cmcore.dag.settings).
    ``keys`` name the job (method, steps, run, seed): a value, or the type to read the job's
    wildcard of that name as."""

    def of_job(wildcards):
        named = {k: v(wildcards[k]) if callable(v) else v for k, v in keys.items()}
        return dag.settings_key(dag.settings(CFG, step, **named))

    return of_job


def flag(name, key):
    """A params function: `--name PATH` when the optional input `key` is there, else ''."""
    return lambda wildcards, input: (
        f"--{name} {shlex.quote(str(input[key]))}" if input[key] else ""
    )


def res(kind, one_node=False):
    """Resources of one kind of step (gpu, mem_mb, runtime, nodes) from the config. A training
    job on several nodes also asks Slurm for one task per node and runs its command once
    (mpi: cm train's own srun starts a torchrun on each node); ``one_node``: that kind's
    resources on one node, its GPUs those of one node (the ablation runs, one process).
    """
    r = dict(CFG["resources"][kind])
    if one_node:
        r.update(gpu=r["gpu"] // r["nodes"], nodes=1)
    if r["nodes"] > 1:
        r.update(tasks=r["nodes"], mpi="srun")
    return r


def sampler_steps(method):
    """Step counts sampled for a method: the teacher's Heun steps, 1 for the untrained net."""
    if method == "teacher":
        return [CFG["teacher"]["sampler_steps"]]
    if method == "untrained":
        return [1]
    return sorted(set(CFG["sampling"]["steps"]) | set(CFG["sampling"]["curve_steps"]))


PAPER_METHODS = list(dag.PAPER_METHODS)
# Later recipes (iCT, ECT, continuous time), trained only for the reproduce_extras target, when
# the config has their section.
EXTRA_METHODS = [m for m in dag.EXTRA_METHODS if m in CFG]
METHODS = PAPER_METHODS + EXTRA_METHODS
# Released consistency models (config `published`), sampled and scored as published_<name>.
PUBLISHED = {f"{dag.PUBLISHED}{name}": spec for name, spec in CFG["published"].items()}
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
TEACHER = f"{OUT}/runs/teacher/checkpoint.pt"


def teacher_of(wildcards):
    """The teacher checkpoint of a method that starts from it, the converted teacher file for
    the teacher when teacher.pretrained names one; nothing otherwise."""
    if wildcards.method == "teacher":
        return [CFG["teacher"]["pretrained"]] if CFG["teacher"]["pretrained"] else []
    return [TEACHER] if wildcards.method in dag.NEEDS_TEACHER else []


def train_priority(wildcards):
    """The teacher first, then every other method: the long chains of the DAG (train, search,
    sample, evaluate) go before the many short ablation runs, which fill the cores around them
    (left at priority 0, a 5-minute CT run was once scheduled last, with one core idle).
    """
    return 2 if wildcards.method == "teacher" else 1


# Sampling, the tau search and evaluation: ahead of the ablation runs as soon as they can run.
CHAIN_PRIORITY = 1


def extractor_weights(wildcards):
    """The evaluation classifier for the digits; nothing for Inception (a configured file)."""
    return (
        [CLASSIFIER] if CFG["evaluation"]["feature_extractor"] == "classifier" else []
    )


def evaluator_weights(wildcards):
    """The files of cm evaluators beyond evaluate's: clean-fid's Inception (for the inception
    extractor; the classifier needs none) and the DINOv2 checkpoint, when configured; a missing
    clean-fid Inception is an error that names its key (only when this target is asked for).
    """
    ev = CFG["evaluation"]
    if ev["feature_extractor"] == "inception" and not ev["cleanfid_inception"]:
        raise ValueError(
            "evaluators: evaluation.cleanfid_inception is null; set it to clean-fid's"
            " inception-2015-12-05.pt (config/README.md says where to get it)"
        )
    cleanfid = (
        [ev["cleanfid_inception"]] if ev["feature_extractor"] == "inception" else []
    )
    return cleanfid + ([ev["dinov2_weights"]] if ev["dinov2_weights"] else [])


def published_metrics(wildcards):
    """The metrics of every released model at every Table 2 step count; none listed: an error
    that says where to list them (only when this target is asked for)."""
    if not PUBLISHED:
        raise ValueError(
            "evaluate_published: the config lists no released models under `published`;"
            " add them (config/imagenet64.yaml shows how)"
        )
    steps = CFG["sampling"]["steps"]
    return [f"{OUT}/metrics/{m}/steps{n}.json" for m in PUBLISHED for n in steps]


def reference_batch(wildcards):
    """The published reference batch FID is computed against (evaluation.reference), if any."""
    return [CFG["evaluation"]["reference"]] if CFG["evaluation"]["reference"] else []


ABLATIONS = CFG["ablations"]
ABLATION_PANELS = (
    [p for p, rows in dag.panels(CFG).items() if rows] if ABLATIONS["enabled"] else []
)
ABLATION_SCORES = (
    [
        f"{OUT}/ablations/{r}/seed{s}/scores.csv"
        for r in dag.runs(CFG)
        for s in ABLATIONS["seeds"]
    ]
    if ABLATIONS["enabled"]
    else []
)


def ablation_teacher(wildcards):
    """The teacher checkpoint for CD runs; nothing for CT runs."""
    return [TEACHER] if wildcards.run.startswith("cd-") else []


SEARCH_TAUS = CFG["sampling"]["tau_search"]["enabled"]


def searched_taus(wildcards):
    """The searched taus of a consistency model's multistep sampling, when the config asks."""
    searched = wildcards.method not in dag.DENOISERS + ("untrained",) + tuple(PUBLISHED)
    if SEARCH_TAUS and searched and int(wildcards.steps) > 1:
        return [f"{OUT}/taus/{wildcards.method}.json"]
    return []


wildcard_constraints:
    method="|".join(METHODS + list(PUBLISHED)),
    steps=r"\d+",
