"""Command line: ``python -m cmcore <step>`` (also ``cm <step>``), one subcommand per DAG step.

Every subcommand takes --config, --out, --seed and --dry-run; a dry run validates the config and
the inputs, says what it would do, and writes nothing. Errors are one line on stderr, exit 2.
"""

import argparse
import json
import os
import sys

import numpy as np

from cmcore import config as config_mod
from cmcore import dag
from cmcore.data import DataError
from cmcore.training.checkpoints import CheckpointError


def _prepare_data(args, cfg):
    from cmcore.data import load_dataset, save_prepared

    cfg = dag.settings(cfg, "prepare-data")
    if args.dry_run:
        return f"would load data set {cfg['dataset']['name']!r} and write {args.out}"
    x, labels = load_dataset(cfg["dataset"], cfg["seed"])
    save_prepared(args.out, x, labels)
    return f"wrote {args.out}: {x.shape[0]} items of shape {tuple(x.shape[1:])}"


def _train_classifier(args, cfg):
    from cmcore.data import load_prepared
    from cmcore.evaluation.classifier import save_classifier, train_classifier

    cfg = dag.settings(cfg, "train-classifier")
    images, labels = load_prepared(args.data)
    if args.dry_run:
        return f"would train the evaluation classifier on {len(labels)} images -> {args.out}"
    c = cfg["evaluation"]["classifier"]
    state, metrics = train_classifier(images, labels, iters=c["iters"], batch=c["batch"],
                                      lr=c["lr"], seed=cfg["seed"],
                                      holdout_fraction=c["holdout_fraction"])
    save_classifier(args.out, state, metrics)
    return f"wrote {args.out}: held-out accuracy {metrics['holdout_accuracy']:.4f}"


def _beside(path, name):
    return os.path.join(os.path.dirname(path) or ".", name)


def _check_teacher(args, method, what):
    """Fail before any work when a method that starts from the teacher has no good one."""
    from cmcore.training.checkpoints import load_checkpoint

    if method in dag.NEEDS_TEACHER:
        if not args.teacher:
            raise CheckpointError(f"--teacher is required for {what}")
        load_checkpoint(args.teacher)


def _train(args, cfg):
    from cmcore.evaluation.reports import plot_train_log
    from cmcore.training.distributed import World
    from cmcore.training.loop import train

    pretrained = cfg["teacher"]["pretrained"] if args.method == "teacher" else None
    section = dag.section(args.method)
    ckpt_every = cfg[section]["ckpt_every"] if section in cfg else 0
    cfg = dag.settings(cfg, "train", method=args.method)
    _check_teacher(args, args.method, f"method {args.method}")
    if not os.path.isfile(args.data):
        raise DataError(f"prepared data {args.data} is missing; run `cm prepare-data` first")
    pretrained = args.teacher if args.method == "teacher" and args.teacher else pretrained
    log_path = args.train_log or _beside(args.out, "train_log.csv")
    loss_plot = args.loss_plot or _beside(args.out, "loss.png")
    if args.dry_run:
        return f"would {'adopt ' + pretrained if pretrained else 'train'} {args.method} -> " \
            f"{args.out}"
    if pretrained:
        from cmcore.convert import adopt_teacher

        adopt_teacher(cfg, args.data, args.out, pretrained, log_path, loss_plot)
        return f"wrote {args.out}: the pretrained teacher {pretrained}"
    untrained = args.method == "untrained"
    train(cfg, args.method, args.data, args.out, args.teacher,
          log_path=None if untrained else log_path, ckpt_every=ckpt_every)
    if not untrained and World.from_env().is_main:  # rank 0 wrote the log
        plot_train_log(log_path, loss_plot)
    return f"wrote {args.out}"


def _sample(args, cfg):
    from cmcore.evaluation.reports import save_grid
    from cmcore.models import pick_device
    from cmcore.sampling.samplers import sample_checkpoint
    from cmcore.training.checkpoints import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    cfg = dag.settings(cfg, "sample", method=ckpt["method"], steps=args.steps)
    smp = cfg["sampling"]
    if args.dry_run:
        return f"would draw {smp['num_samples']} {args.steps}-step samples -> {args.out}"
    taus, source = smp.get("tau", {}).get(str(args.steps), []), "sampling.tau of the config"
    if args.taus:  # searched taus of this model (cm search-tau): the first steps - 1
        with open(args.taus) as f:
            taus, source = json.load(f)["taus"][:args.steps - 1], args.taus
    images, meta = sample_checkpoint(ckpt, args.steps, smp["num_samples"], smp["batch"],
                                     cfg["seed"], pick_device(cfg["device"]), taus)
    meta["tau_source"] = source if meta["taus"] else "-"
    np.savez(args.out, arr_0=images)
    meta.update(checkpoint=args.checkpoint, code_version=config_mod.code_version())
    with open(args.meta or os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    if args.grid:
        save_grid(images[:100], args.grid)
    return f"wrote {args.out}: {images.shape[0]} samples, NFE {meta['nfe']}"


def _metrics_of(args, cfg, reference_path):
    """(metrics(images) -> torch-fidelity's dict, extractor weights) against the reference."""
    from cmcore.data import load_prepared
    from cmcore.evaluation.metrics import compute_metrics
    from cmcore.models import pick_device

    ev = cfg["evaluation"]
    weights = args.classifier if ev["feature_extractor"] == "classifier" else \
        ev["inception_weights"]
    if not weights or not os.path.isfile(weights):
        raise DataError(f"feature-extractor weights {weights!r} not found (evaluation settings)")
    reference, _ = load_prepared(reference_path)

    def metrics(images):
        return compute_metrics(images, reference, extractor=ev["feature_extractor"],
                               weights_path=weights, prc_neighborhood=ev["prc_neighborhood"],
                               device=pick_device(cfg["device"]))
    return metrics, weights


def _evaluate(args, cfg):
    cfg = dag.settings(cfg, "evaluate")
    metrics_of, weights = _metrics_of(args, cfg, args.reference)
    with np.load(args.samples) as f:
        samples = f["arr_0"]
    if args.dry_run:
        return f"would evaluate {samples.shape[0]} samples -> {args.out}"
    metrics = metrics_of(samples)
    with open(args.meta or os.path.splitext(args.samples)[0] + ".json") as f:
        meta = json.load(f)
    if cfg["evaluation"]["feature_extractor"] == "classifier":
        from cmcore.evaluation.classifier import load_classifier

        metrics["extractor_accuracy"] = load_classifier(weights)[1].get("holdout_accuracy")
    name = cfg["dataset"]["name"]
    record = {**meta, **metrics, "dataset": name,
              "reference_set": f"{name} training set ({args.reference})"}
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    return f"wrote {args.out}: FID {metrics['fid']:.3f}"


def _table(args, cfg):
    from cmcore.evaluation.reports import write_table

    if args.dry_run:
        return f"would gather {len(args.metrics)} metric files into {args.out}"
    stem = os.path.splitext(args.out)[0]
    df = write_table(args.metrics, args.out, args.md or f"{stem}.md", args.html or f"{stem}.html",
                     args.paper_md, args.paper_html or (args.paper_md and
                                                        os.path.splitext(args.paper_md)[0] +
                                                        ".html"))
    return f"wrote {args.out} with {len(df)} rows"


def _theorem1(args, cfg):
    from cmcore.experiments.theorem import run_theorem1

    cfg = dag.settings(cfg, "theorem1")
    s = {k: v for k, v in cfg["theorem1"].items() if k != "enabled"}
    d = cfg["diffusion"]
    s.update(eps=d["sigma_min"], T=d["sigma_max"], rho=d["rho"], seed=cfg["seed"],
             threads=args.threads)
    if args.dry_run:
        return f"would measure Theorem 1 for {s['solvers']} into {args.out}/"
    summary = run_theorem1(s, args.out)
    slopes = ", ".join(f"{k} {v:.2f}" for k, v in summary["slopes"].items())
    return f"wrote {args.out}/: slopes {slopes}"


def _figure4(args, cfg):
    from cmcore.evaluation.reports import write_steps_figure

    if args.dry_run:
        return f"would plot FID against steps from {len(args.metrics)} files into {args.plot}"
    stem = os.path.splitext(args.out)[0]
    write_steps_figure(args.metrics, args.out, args.md or f"{stem}.md",
                       args.html or f"{stem}.html", args.plot)
    return f"wrote {args.out} and {args.plot}"


def _search_tau(args, cfg):
    from cmcore.models import pick_device
    from cmcore.sampling.tau_search import search_checkpoint_taus
    from cmcore.training.checkpoints import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    cfg = dag.settings(cfg, "search-tau", method=ckpt["method"])
    metrics_of, _ = _metrics_of(args, cfg, args.data)
    if ckpt["kind"] != "consistency":
        raise ValueError(f"{args.checkpoint} holds a {ckpt['method']} model; taus are searched "
                         "for consistency models only")
    if args.dry_run:
        return f"would search the taus of {args.checkpoint} -> {args.out}"
    smp, ts = cfg["sampling"], cfg["sampling"]["tau_search"]
    n_taus = max(set(smp["steps"]) | set(smp["curve_steps"])) - 1
    taus, trace = search_checkpoint_taus(
        ckpt, n_taus, lambda images: metrics_of(images)["fid"], num_samples=ts["num_samples"],
        batch=smp["batch"], seed=ts["seed"], device=pick_device(cfg["device"]), iters=ts["iters"])
    record = {"taus": taus, "method": ckpt["method"], "checkpoint": args.checkpoint,
              "search": ts, "score": "FID",
              "trace": [{"taus": list(t), "fid": v} for t, v in trace],
              "code_version": config_mod.code_version()}
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    return f"wrote {args.out}: taus {', '.join(f'{t:.3g}' for t in taus)}"


def _edit(args, cfg):
    from cmcore.data import load_prepared, to_model_space, to_uint8
    from cmcore.evaluation.reports import save_grid
    from cmcore.experiments.edit_demos import demo
    from cmcore.models import model_from_checkpoint
    from cmcore.training.checkpoints import load_checkpoint

    cfg = dag.settings(cfg, "edit")
    ckpt = load_checkpoint(args.checkpoint)
    if ckpt["kind"] != "consistency":
        raise ValueError(f"{args.checkpoint} holds a {ckpt['method']} model; editing needs a "
                         "consistency model (editing.method)")
    ed = cfg["editing"]
    images, _ = load_prepared(args.data)
    if args.dry_run:
        return f"would write {args.task} edits of {ed['num_images']} images -> {args.out}"
    f = model_from_checkpoint(ckpt)
    x = to_model_space(images[: ed["num_images"]])
    rows, labels = demo(f, args.task, x, ed["taus"], seed=cfg["seed"])
    save_grid(np.concatenate([to_uint8(r) for r in rows]), args.out, ncol=x.shape[0])
    return f"wrote {args.out}: rows {', '.join(labels)}"


def _ablate(args, cfg):
    import pandas as pd

    from cmcore.experiments.ablations import score_snapshots
    from cmcore.models import pick_device
    from cmcore.training.loop import train

    method, _ = dag.parse_run(args.run)
    ckpt_every = cfg[method]["ckpt_every"]
    cfg = dag.settings(cfg, "ablate", run=args.run, seed=cfg["seed"])
    metrics_of, _ = _metrics_of(args, cfg, args.data)
    _check_teacher(args, method, f"the CD run {args.run}")
    checkpoint = args.checkpoint or _beside(args.out, "checkpoint.pt")
    if args.dry_run:
        return f"would train {args.run} (seed {cfg['seed']}) -> {checkpoint} and score it"
    ckpt = train(cfg, method, args.data, checkpoint, args.teacher,
                 log_path=args.train_log or _beside(args.out, "train_log.csv"),
                 ckpt_every=ckpt_every)
    rows = score_snapshots(ckpt, metrics_of, num_samples=cfg["ablations"]["num_samples"],
                           batch=cfg["sampling"]["batch"], seed=cfg["seed"],
                           device=pick_device(cfg["device"]))
    df = pd.DataFrame(rows).assign(run=args.run, method=method, seed=cfg["seed"],
                                   feature_extractor=cfg["evaluation"]["feature_extractor"],
                                   code_version=config_mod.code_version())
    df.to_csv(f"{args.out}.tmp", index=False)
    os.replace(f"{args.out}.tmp", args.out)
    return f"wrote {args.out}: final FID {df['fid'].iloc[-1]:.2f} at {df['iters'].iloc[-1]} it"


def _ablation_report(args, cfg):
    from cmcore.experiments.ablations import write_reports

    cfg = dag.settings(cfg, "ablation-report")
    if args.dry_run:
        return f"would summarise {len(args.scores)} runs into {args.out}/ and {args.plots}/"
    written = write_reports(args.scores, cfg, args.out, args.plots)
    return f"wrote {', '.join(written)} into {args.out}/ and {args.plots}/"


def _bench(args, cfg):
    from cmcore.experiments.bench import FIGURES, NETS, run_bench

    only = args.only.split(",") if args.only else None
    if args.dry_run:
        return (f"would time {only or list(FIGURES)} for net {args.net!r} at batch "
                f"{args.batch or NETS[args.net]['batch']} on {args.device} -> {args.out}")
    records = run_bench(cfg, net=args.net, batch=args.batch, device=args.device,
                        repeats=args.repeats, warmup=args.warmup, bf16=args.bf16, tf32=args.tf32,
                        compile=args.compile, lpips=args.lpips, classifier=args.classifier,
                        inception=args.inception_weights, reference_edm=args.reference_edm,
                        only=only, out=args.out)
    timed = sum("img_per_s" in r for r in records)
    return f"wrote {args.out}: {timed} timed figures, {len(records) - timed} other lines"


def _convert(args, cfg):
    from cmcore import convert
    from cmcore.training.checkpoints import save_checkpoint

    if bool(args.edm_pickle) == bool(args.openai):
        raise ValueError("give exactly one of --edm-pickle PATH or --openai PATH")
    if args.openai:
        if not args.arch_config:
            raise ValueError("--openai needs --arch-config (imagenet64, lsun256 or a YAML file)")
        source = args.openai
        payload = convert.openai_teacher(args.openai, args.arch_config, cfg)
    else:
        source = args.edm_pickle
        if args.dry_run:  # unpickling runs code: a dry run checks the inputs only
            convert.check_edm_inputs(args.edm_pickle, args.edm_code, args.allow_pickle)
            return f"would unpickle {source} with {args.edm_code} and write {args.out}"
        payload = convert.edm_teacher(args.edm_pickle, args.edm_code, args.allow_pickle, cfg)
    net = payload["net"]
    if args.dry_run:
        return f"would write {args.out}: {source} as a {net['arch']} teacher"
    save_checkpoint(args.out, payload)
    size = sum(v.numel() for v in payload["ema"].values()) / 1e6
    note = "" if cfg["network"]["arch"] == net["arch"] else (
        f"; note: the config's network.arch is {cfg['network']['arch']!r}, students need "
        f"{net['arch']!r}")
    return f"wrote {args.out}: {source} as a {net['arch']} teacher ({size:.1f}M values){note}"


def build_parser():
    parser = argparse.ArgumentParser(prog="cm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, help):
        p = sub.add_parser(name, help=help)
        p.add_argument("--config", required=True, help="YAML config (config/config.yaml)")
        p.add_argument("--out", required=True, help="output file")
        p.add_argument("--seed", type=int, default=None, help="override the config's seed")
        p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
        p.add_argument("--dry-run", action="store_true", help="validate and describe only")
        p.set_defaults(func=func)
        return p

    add("prepare-data", _prepare_data, "load the data set and write it as npz")
    p = add("train-classifier", _train_classifier, "train the evaluation feature extractor")
    p.add_argument("--data", required=True)
    p = add("train", _train, "train the teacher, CD, CT, PD or the untrained baseline")
    p.add_argument("--method", required=True, choices=dag.METHODS)
    p.add_argument("--data", required=True)
    p.add_argument("--teacher", default=None,
                   help="teacher checkpoint (cd, pd, ect, cd_cont); for --method teacher: a "
                   "converted teacher to adopt (default: teacher.pretrained)")
    p.add_argument("--train-log", default=None, help="CSV log (default: beside --out)")
    p.add_argument("--loss-plot", default=None, help="PNG loss curve (default: beside --out)")
    p.add_argument("--gpus", type=int, default=1,
                   help="processes of a data-parallel run under torchrun when > 1")
    p = add("sample", _sample, "draw samples from a checkpoint (npz arr_0 uint8 NHWC)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--steps", type=int, required=True, help="sampling steps")
    p.add_argument("--grid", default=None, help="also write a PNG grid of 100 samples")
    p.add_argument("--taus", default=None, help="JSON of cm search-tau (default: sampling.tau)")
    p.add_argument("--meta", default=None, help="JSON sidecar (default: --out with .json)")
    p = add("edit", _edit, "zero-shot editing of data-set images: one PNG grid per task")
    p.add_argument("--checkpoint", required=True, help="a consistency model")
    p.add_argument("--data", required=True, help="prepared data set (npz)")
    p.add_argument("--task", required=True, help="inpaint, superres, colorize, sdedit, ...")
    p = add("search-tau", _search_tau, "greedy search of the multistep taus on FID (JSON)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="prepared data set (npz)")
    p.add_argument("--classifier", default=None, help="classifier checkpoint (digits)")
    p = add("evaluate", _evaluate, "FID, IS, precision and recall through torch-fidelity")
    p.add_argument("--samples", required=True)
    p.add_argument("--meta", default=None, help="sidecar of cm sample (default: beside)")
    p.add_argument("--reference", required=True, help="prepared data set (npz)")
    p.add_argument("--classifier", default=None, help="classifier checkpoint (digits)")
    p = add("table", _table, "gather metric JSON files into CSV, Markdown and HTML tables")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--md", default=None, help="Markdown table (default: --out with .md)")
    p.add_argument("--html", default=None, help="HTML table (default: --out with .html)")
    p.add_argument("--paper-md", default=None, help="also ours beside the paper's (Markdown)")
    p.add_argument("--paper-html", default=None, help="... and as HTML")
    p = add("figure4", _figure4, "FID against sampling steps: CSV and Markdown tables, a plot")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--plot", required=True, help="PNG of FID against steps")
    p.add_argument("--md", default=None, help="Markdown table (default: --out with .md)")
    p.add_argument("--html", default=None, help="HTML table (default: --out with .html)")
    p = add("ablate", _ablate, "train one Fig. 3 ablation run and score its EMA snapshots (CSV)")
    p.add_argument("--run", required=True, help="e.g. cd-heun-N18-l2, ct-adaptive")
    p.add_argument("--data", required=True, help="prepared data set (npz)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (CD runs)")
    p.add_argument("--classifier", default=None, help="classifier checkpoint (digits)")
    p.add_argument("--checkpoint", default=None, help="the run's checkpoint (default: beside)")
    p.add_argument("--train-log", default=None, help="the run's CSV log (default: beside)")
    p = add("ablation-report", _ablation_report, "Fig. 3 tables (--out: folder) and plots")
    p.add_argument("--scores", nargs="+", required=True, help="CSV files of cm ablate")
    p.add_argument("--plots", required=True, help="folder of the PNG figures")
    add("theorem1", _theorem1, "Theorem 1 and 2 on an exact Gaussian mixture (--out: folder)")
    p = add("convert", _convert, "import an NVlabs/edm pickle or an openai state dict as teacher")
    p.add_argument("--edm-pickle", default=None, help="NVlabs/edm network pickle (.pkl)")
    p.add_argument("--edm-code", default=None, help="NVlabs/edm checkout (dnnlib, torch_utils)")
    p.add_argument("--allow-pickle", action="store_true", help="trust the pickle (runs its code)")
    p.add_argument("--openai", default=None, help="openai/consistency_models state dict (.pt)")
    p.add_argument("--arch-config", default=None,
                   help="ADM of the --openai file: imagenet64, lsun256 or a YAML file")
    p = add("bench", _bench, "time every training and sampling step (--out: JSON lines)")
    p.add_argument("--net", default="embedded", choices=["embedded", "cifar10"])
    p.add_argument("--batch", type=int, default=None, help="default: the net's (128 / 512)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=None, help="timed steps (5 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (1 CPU, 3 GPU)")
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


def torchrun_command(argv, nproc):
    """The command that reruns ``cm argv`` as ``nproc`` data-parallel processes (torchrun)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "cmcore", *argv]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "gpus", 1) > 1 and "LOCAL_RANK" not in os.environ and not args.dry_run:
        os.execv(sys.executable, torchrun_command(argv, args.gpus))  # DDP: cmcore.training
    try:
        cfg = config_mod.load(args.config)
        if args.seed is not None:
            cfg["seed"] = args.seed
        args.threads = args.threads or cfg["threads"]
        import torch

        torch.set_num_threads(args.threads)
        message = args.func(args, cfg)
    except (config_mod.ConfigError, DataError, CheckpointError, FileNotFoundError,
            FloatingPointError, ValueError) as e:
        print(f"cm {args.command}: error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        print(("[dry run] " if args.dry_run else "") + message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
