# Config validation, run enumeration and input functions; no rules.
import os
import sys

from cmcore.config import ConfigError, validate

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


def train_rule_io(method):
    """Checkpoint, log and benchmark paths of one training rule."""
    return dict(
        output=f"{OUT}/runs/{method}/checkpoint.pt",
        log=f"{OUT}/logs/train_{method}.log",
        benchmark=f"{OUT}/benchmarks/train_{method}.tsv",
    )


METHODS = ["teacher", "cd", "ct", "pd", "untrained"]
RUNS = [(m, n) for m in METHODS for n in sampler_steps(m)]
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


wildcard_constraints:
    method="|".join(METHODS),
    steps=r"\d+",
