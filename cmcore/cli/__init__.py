"""Command line: ``python -m cmcore <step>`` (also ``cm <step>``), one subcommand per DAG step.

Every subcommand takes --config, --out, --seed and --dry-run; a dry run validates the config and
the inputs, says what it would do, and writes nothing. Errors are one line on stderr, exit 2.
Each step gets nothing of the config but its settings (cmcore.dag.settings); the handlers are in
cmcore.cli.steps.
"""

import argparse
import contextlib
import gc
import importlib
import os
import socket
import sys

from cmcore import config as config_mod
from cmcore import dag
from cmcore.cli.evaluators import cmd_evaluators
from cmcore.cli.steps import (
    cmd_ablate,
    cmd_ablation_report,
    cmd_bench,
    cmd_convert,
    cmd_edit,
    cmd_evaluate,
    cmd_export,
    cmd_figure4,
    cmd_prepare_data,
    cmd_sample,
    cmd_search_tau,
    cmd_table,
    cmd_theorem1,
    cmd_train,
    cmd_train_classifier,
)
from cmcore.errors import CheckpointError, DataError

# What a step imports anyway, besides torch: every fit imports torch._dynamo (torch.optim's
# optimizers, the FLOP count's dispatch mode); torch-fidelity imports it through torchvision.
FIT = ("torch._dynamo",)
SCORE = ("torch_fidelity",)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (no usage block): `cm sample: error: ...`."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _at_least(minimum):
    """An argparse type: an integer of at least ``minimum``."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value
    return parse


def build_parser():
    parser = _Parser(prog="cm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    # tensors=False: a step that only reads tables (no torch); preload: the heavy modules the
    # step imports anyway, imported with torch (main: _imports_frozen).
    def add(name, func, help, tensors=True, preload=()):
        p = sub.add_parser(name, help=help)
        p.add_argument("--config", required=True, help="YAML config (config/config.yaml)")
        p.add_argument("--out", required=True, help="output file")
        p.add_argument("--seed", type=int, default=None,
                       help="override the config's seed (validated as the config's)")
        p.add_argument("--threads", type=int, default=None,
                       help="CPU threads for torch (overrides the config's threads)")
        p.add_argument("--dry-run", action="store_true", help="validate and describe only")
        p.set_defaults(func=func, tensors=tensors, preload=preload)
        return p

    def tables(p):  # a CSV table (--out) with its Markdown and HTML forms
        p.add_argument("--metrics", nargs="+", required=True, help="JSON files of cm evaluate")
        p.add_argument("--md", default=None, help="Markdown table (default: --out with .md)")
        p.add_argument("--html", default=None, help="HTML table (default: --out with .html)")

    add("prepare-data", cmd_prepare_data, "load the data set and write it as npz")
    p = add("train-classifier", cmd_train_classifier, "train the evaluation feature extractor",
            preload=FIT)
    p.add_argument("--data", required=True)
    p = add("train", cmd_train, "train the teacher, CD, CT, PD or the untrained baseline",
            preload=FIT)
    p.add_argument("--method", required=True, choices=dag.METHODS)
    p.add_argument("--data", required=True)
    p.add_argument("--teacher", default=None,
                   help="teacher checkpoint (cd, pd, ect, cd_cont); for --method teacher: a "
                   "converted teacher to adopt (default: teacher.pretrained)")
    p.add_argument("--train-log", default=None, help="CSV log (default: beside --out)")
    p.add_argument("--loss-plot", default=None, help="PNG loss curve (default: beside --out)")
    p.add_argument("--gpus", type=_at_least(0), default=1,
                   help="processes of a data-parallel run under torchrun when > 1, all nodes "
                   "together (resources.train.nodes > 1: gpus / nodes per node, via srun)")
    p = add("sample", cmd_sample, "draw samples from a checkpoint (npz arr_0 uint8 NHWC)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--steps", type=_at_least(1), required=True, help="sampling steps")
    p.add_argument("--grid", default=None, help="also write a PNG grid of 100 samples")
    p.add_argument("--taus", default=None, help="JSON of cm search-tau (default: sampling.tau)")
    p.add_argument("--meta", default=None, help="JSON sidecar (default: --out with .json)")
    p = add("edit", cmd_edit, "zero-shot editing of data-set images: one PNG grid per task")
    p.add_argument("--checkpoint", required=True, help="a consistency model")
    p.add_argument("--data", required=True, help="prepared data set (npz)")
    p.add_argument("--task", required=True, help="inpaint, superres, colorize, sdedit, ...")
    p = add("search-tau", cmd_search_tau, "greedy search of the multistep taus on FID (JSON)",
            preload=SCORE)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="prepared data set (npz)")
    p.add_argument("--classifier", default=None, help="classifier checkpoint (digits)")
    p = add("evaluate", cmd_evaluate, "FID, IS, precision and recall through torch-fidelity",
            preload=SCORE)
    p.add_argument("--samples", required=True)
    p.add_argument("--meta", default=None, help="sidecar of cm sample (default: beside)")
    p.add_argument("--reference", required=True, help="prepared data set (npz)")
    p.add_argument("--reference-batch", default=None,
                   help="published reference batch (npz with mu, sigma): FID against it")
    p.add_argument("--classifier", default=None, help="classifier checkpoint (digits)")
    p = add("evaluators", cmd_evaluators,
            "score samples with torch-fidelity and clean-fid side by side (CSV; FD-DINOv2)",
            preload=SCORE)
    p.add_argument("--samples", nargs="+", required=True,
                   help="npz files of cm sample")
    p.add_argument("--meta", nargs="+", default=None,
                   help="the sidecar JSON of each samples file, in order (default: beside it)")
    p.add_argument("--reference", required=True, help="prepared data set (npz)")
    p.add_argument("--reference-batch", default=None,
                   help="published reference batch (npz with mu, sigma): FID against it")
    p.add_argument("--classifier", default=None, help="classifier checkpoint (digits)")
    p.add_argument("--md", default=None, help="Markdown table (default: --out with .md)")
    p.add_argument("--html", default=None, help="HTML table (default: --out with .html)")
    p = add("table", cmd_table, "gather metric JSON files into CSV, Markdown and HTML tables",
            tensors=False)
    tables(p)
    p.add_argument("--paper-md", default=None, help="also ours beside the paper's (Markdown)")
    p.add_argument("--compute-plot", default=None, help="also FID against training compute (PNG)")
    p.add_argument("--paper-html", default=None, help="... and as HTML")
    p.add_argument("--published", action="store_true",
                   help="released models beside the paper's Table 2 (in --md and --html)")
    p = add("figure4", cmd_figure4, "FID against sampling steps: CSV and Markdown tables, a plot",
            tensors=False)
    tables(p)
    p.add_argument("--plot", required=True, help="PNG of FID against steps")
    p = add("ablate", cmd_ablate, "train one Fig. 3 ablation run and score its EMA snapshots (CSV)",
            preload=SCORE)
    p.add_argument("--run", required=True, help="e.g. cd-heun-N18-l2, ct-adaptive")
    p.add_argument("--data", required=True, help="prepared data set (npz)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (CD runs)")
    p.add_argument("--classifier", default=None, help="classifier checkpoint (digits)")
    p.add_argument("--checkpoint", default=None, help="the run's checkpoint (default: beside)")
    p.add_argument("--train-log", default=None, help="the run's CSV log (default: beside)")
    p = add("ablation-report", cmd_ablation_report, "Fig. 3 tables (--out: folder) and plots",
            tensors=False)
    p.add_argument("--scores", nargs="+", required=True, help="CSV files of cm ablate")
    p.add_argument("--plots", required=True, help="folder of the PNG figures")
    add("theorem1", cmd_theorem1, "Theorem 1 and 2 on an exact Gaussian mixture (--out: folder)",
        preload=FIT)
    p = add("convert", cmd_convert, "import published weights (EDM pickle; openai teacher, CD, CT)")
    p.add_argument("--edm-pickle", default=None, help="NVlabs/edm network pickle (.pkl)")
    p.add_argument("--edm-code", default=None, help="NVlabs/edm checkout (dnnlib, torch_utils)")
    p.add_argument("--allow-pickle", action="store_true", help="trust the pickle (runs its code)")
    p.add_argument("--openai", default=None, help="openai/consistency_models state dict (.pt)")
    p.add_argument("--arch-config", default=None,
                   help="ADM of the --openai file: imagenet64, lsun256 or a YAML file")
    p.add_argument("--method", default="teacher", choices=["teacher", "cd", "ct"],
                   help="what the --openai file holds: the EDM teacher or a released CD / CT")
    p.add_argument("--name", default=None,
                   help="the config's published.NAME entry the file is (its own taus)")
    p = add("export", cmd_export, "a checkpoint as safetensors with a model card (--out: folder)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--metrics", nargs="*", default=[], help="JSON files of cm evaluate")
    p = add("bench", cmd_bench, "time every training and sampling step (--out: JSON lines)")
    p.add_argument("--net", default="embedded", choices=["embedded", "cifar10", "imagenet64"])
    p.add_argument("--batch", type=_at_least(1), default=None,
                   help="default: the net's (128 / 512 / 256)")
    p.add_argument("--batch-gpu", type=_at_least(1), default=None,
                   help="training steps in passes of this many rows (default: one pass)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--repeats", type=_at_least(1), default=None,
                   help="timed steps (5 CPU, 20 GPU)")
    p.add_argument("--warmup", type=_at_least(0), default=None,
                   help="untimed steps (1 CPU, 3 GPU)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                   help="TF32 matmuls and convolutions (default: on for CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the trained networks")
    p.add_argument("--lpips", action="store_true", help="also time CD with LPIPS (slow on CPU)")
    p.add_argument("--classifier", default=None, help="digits classifier (default: random)")
    p.add_argument("--inception-weights", default=None, help="time Inception features too")
    p.add_argument("--reference-edm", default=None, help="NVlabs/edm checkout to compare with")
    p.add_argument("--only", default=None, help="comma-separated figures (default: all)")
    return parser


def torchrun_command(argv, nproc, nodes=1, endpoint=None, run_id=None):
    """The command that reruns ``cm argv`` as ``nproc`` data-parallel processes: torchrun
    --standalone on one node; on each of ``nodes`` > 1, a torchrun of nproc / nodes processes,
    all meeting at the c10d rendezvous ``endpoint`` (host:port) under ``run_id``."""
    launch = [sys.executable, "-m", "torch.distributed.run"]
    if nodes == 1:
        launch += ["--standalone", f"--nproc_per_node={nproc}"]
    else:
        launch += [f"--nnodes={nodes}", f"--nproc_per_node={nproc // nodes}",
                   "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", f"--rdzv_id={run_id}"]
    return [*launch, "-m", "cmcore", *argv]


def slurm_command(argv, nproc, nodes, env, gpus_per_task=True):
    """srun starting one torchrun_command per node of this Slurm job; the rendezvous is on this
    host (the job's first node, where its batch script runs), at a port of the job id."""
    job = env.get("SLURM_JOB_ID")
    if not job:
        raise ValueError(f"resources.train.nodes is {nodes}: training on several nodes runs "
                         f"inside a Slurm job of {nodes} nodes (snakemake --profile slurm, or "
                         f"salloc --nodes={nodes}); SLURM_JOB_ID is not set here")
    if nproc % nodes:
        raise ValueError(f"--gpus {nproc} does not split over {nodes} nodes; give a multiple "
                         f"of {nodes} (resources.train.gpu counts all nodes' GPUs)")
    endpoint = f"{socket.gethostname()}:{29500 + int(job) % 10000}"
    srun = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
            "--kill-on-bad-exit=1"]
    if gpus_per_task:
        srun.append(f"--gpus-per-task={nproc // nodes}")
    return srun + torchrun_command(argv, nproc, nodes, endpoint, f"cm-{job}")


def _launch(argv, args, cfg):
    """Exec the data-parallel launch of ``cm train`` (torchrun, or srun + torchrun on several
    nodes) when it asks for more than one process and is not one of them already."""
    nodes = cfg["resources"]["train"]["nodes"]
    if args.command != "train" or args.dry_run or "LOCAL_RANK" in os.environ:
        return
    if nodes > 1:
        command = slurm_command(argv, args.gpus, nodes, os.environ, cfg["device"] != "cpu")
    elif args.gpus > 1:
        command = torchrun_command(argv, args.gpus)
    else:
        return
    os.execvp(command[0], command)  # DDP: cmcore.training


@contextlib.contextmanager
def _imports_frozen(own_process):
    """Import with the garbage collector paused, then freeze what was imported (gc.freeze):
    torch's million long-lived objects make no garbage, yet every collection (at exit too)
    would walk them again. With torch-fidelity too, a 3.3 s `cm evaluate` takes 2.1 s (measured).
    Only for a process of its own: a caller's (a test's) objects are not frozen with them."""
    if not own_process or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def main(argv=None):
    """Run ``cm ARGV``; argv None: this process is the command (sys.argv) and owns its garbage
    collector (torch's imports are kept out of its passes); returns the exit status."""
    own_process = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        # Overrides join the file before validation: `--seed -5` is refused as `seed: -5` is.
        raw = config_mod.read_yaml(args.config)
        overrides = {key: value for key, value in (("seed", args.seed),
                                                   ("threads", args.threads)) if value is not None}
        cfg = config_mod.validate({**raw, **overrides} if isinstance(raw, dict) else raw)
        _launch(argv, args, cfg)  # a bad config is refused once, before any process starts
        args.threads = cfg["threads"]
        if args.tensors:  # the steps that only read tables start without torch (1.3 s)
            with _imports_frozen(own_process):
                import torch

                from cmcore.models import pick_device

                for module in args.preload:
                    importlib.import_module(module)
            pick_device(cfg["device"])  # a device this machine lacks fails here, before work
            torch.set_num_threads(args.threads)
        message = args.func(args, cfg)
    except (config_mod.ConfigError, DataError, CheckpointError, FileNotFoundError,
            FloatingPointError, ValueError) as e:
        print(f"cm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only folder, a full disk: the path and the reason
        where = f"{e.filename}: " if e.filename else ""
        print(f"cm {args.command}: error: cannot write or read {where}{e.strerror or e}",
              file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        print(("[dry run] " if args.dry_run else "") + message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
