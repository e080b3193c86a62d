"""The handlers of the ``cm`` subcommands: handler(args, cfg) -> one-line message.

Each DAG step first narrows the config to its settings (cmcore.dag.settings), the values its
rule declares as params, then calls the library with plain arguments.
"""

import json
import os

import numpy as np

from cmcore import config as config_mod
from cmcore import dag
from cmcore.errors import CheckpointError, DataError
from cmcore.files import atomic


def cmd_prepare_data(args, cfg):
    from cmcore.data import dataset_rows
    from cmcore.prepared import write_prepared

    cfg = dag.settings(cfg, "prepare-data")
    if args.dry_run:
        return f"would load data set {cfg['dataset']['name']!r} and write {args.out}"
    labels, row_shape, dtype, rows = dataset_rows(cfg["dataset"], cfg["seed"])
    write_prepared(args.out, labels, row_shape, dtype, rows)
    return f"wrote {args.out}: {len(labels)} items of shape {tuple(row_shape)}"


def cmd_train_classifier(args, cfg):
    from cmcore.evaluation.classifier import save_classifier, train_classifier
    from cmcore.prepared import load_prepared

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


def cmd_train(args, cfg):
    from cmcore.evaluation.reports import plot_train_log
    from cmcore.training.distributed import World
    from cmcore.training.loop import train

    pretrained = cfg["teacher"]["pretrained"] if args.method == "teacher" else None
    section = dag.section(args.method)
    ckpt_every = cfg[section]["ckpt_every"] if section in cfg else 0
    workers = cfg["resources"]["train"]["data_workers"]
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
          log_path=None if untrained else log_path, ckpt_every=ckpt_every, workers=workers)
    if not untrained and World.from_env().is_main:  # rank 0 wrote the log
        plot_train_log(log_path, loss_plot)
    return f"wrote {args.out}"


def cmd_sample(args, cfg):
    from cmcore.evaluation.reports import save_grid
    from cmcore.models import pick_device
    from cmcore.sampling.samplers import sample_checkpoint
    from cmcore.training.checkpoints import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    method = ckpt.get("published") or ckpt["method"]  # a released model: its config entry
    cfg = dag.settings(cfg, "sample", method=method, steps=args.steps)
    smp = cfg["sampling"]
    if args.dry_run:
        return f"would draw {smp['num_samples']} {args.steps}-step samples -> {args.out}"
    taus, source = smp.get("tau", {}).get(str(args.steps), []), "sampling.tau of the config"
    if own := dag.published_taus(cfg, method):
        entry = cfg["published"][method[len(dag.PUBLISHED):]]
        taus, source = entry["taus"][:args.steps - 1], own
    if args.taus:  # searched taus of this model (cm search-tau): the first steps - 1
        with open(args.taus) as f:
            taus, source = json.load(f)["taus"][:args.steps - 1], args.taus
    images, meta, labels = sample_checkpoint(
        ckpt, args.steps, smp["num_samples"], smp["batch"], cfg["seed"],
        pick_device(cfg["device"]), taus, labels=smp.get("labels", "balanced"))
    meta["tau_source"] = source if meta["taus"] else "-"
    with atomic(args.out, ".npz") as tmp:  # openai's layout: images arr_0, class labels arr_1
        np.savez(tmp, arr_0=images, **({} if labels is None else {"arr_1": labels}))
    meta.update(checkpoint=args.checkpoint, code_version=config_mod.code_version())
    if "source" in ckpt:  # converted from published weights (cm convert)
        meta["source"] = os.path.basename(ckpt["source"]["file"])
    with atomic(args.meta or os.path.splitext(args.out)[0] + ".json") as tmp, \
            open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    if args.grid:
        save_grid(images[:100], args.grid)
    return f"wrote {args.out}: {images.shape[0]} samples, NFE {meta['nfe']}"


def _metrics_of(args, cfg, reference_path, batch=None):
    """(metrics(images, fid_only=False) -> compute_metrics's dict, extractor weights) against the
    reference; with ``batch`` (a published ReferenceBatch) FID against its statistics and
    precision/recall against its images, if it has them."""
    from cmcore.evaluation.metrics import compute_metrics
    from cmcore.models import pick_device
    from cmcore.prepared import load_prepared

    ev = cfg["evaluation"]
    weights = args.classifier if ev["feature_extractor"] == "classifier" else \
        ev["inception_weights"]
    if not weights or not os.path.isfile(weights):
        raise DataError(f"feature-extractor weights {weights!r} not found (evaluation settings)")
    if batch is not None and batch.images is not None:
        reference = batch.images
    else:
        reference, _ = load_prepared(reference_path)
    stats = None if batch is None else (batch.mu, batch.sigma)

    def metrics(images, fid_only=False):
        return compute_metrics(images, reference, extractor=ev["feature_extractor"],
                               weights_path=weights, prc_neighborhood=ev["prc_neighborhood"],
                               device=pick_device(cfg["device"]), fid_only=fid_only,
                               reference_stats=stats)
    return metrics, weights


def cmd_evaluate(args, cfg):
    from cmcore.evaluation.reference import load_reference_batch

    cfg = dag.settings(cfg, "evaluate")
    batch = load_reference_batch(args.reference_batch) if args.reference_batch else None
    metrics_of, weights = _metrics_of(args, cfg, args.reference, batch)
    with np.load(args.samples) as f:
        samples = f["arr_0"]
        labels = f["arr_1"] if "arr_1" in f else None  # the requested classes, if conditional
    if args.dry_run:
        return f"would evaluate {samples.shape[0]} samples -> {args.out}"
    metrics = metrics_of(samples)
    with open(args.meta or os.path.splitext(args.samples)[0] + ".json") as f:
        meta = json.load(f)
    if cfg["evaluation"]["feature_extractor"] == "classifier":
        from cmcore.evaluation.classifier import label_accuracy, load_classifier

        metrics["extractor_accuracy"] = load_classifier(weights)[1].get("holdout_accuracy")
        if labels is not None:  # does the sample show the class it was asked for?
            metrics["label_accuracy"] = label_accuracy(weights, samples, labels)
    name = cfg["dataset"]["name"]
    reference = batch.describe() if batch else f"{name} training set ({args.reference})"
    record = {**meta, **metrics, "dataset": name, "reference_set": reference}
    with atomic(args.out) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    return f"wrote {args.out}: FID {metrics['fid']:.3f}"


def cmd_table(args, cfg):
    from cmcore.evaluation.reports import write_table

    if args.dry_run:
        return f"would gather {len(args.metrics)} metric files into {args.out}"
    stem = os.path.splitext(args.out)[0]
    df = write_table(args.metrics, args.out, args.md or f"{stem}.md", args.html or f"{stem}.html",
                     args.paper_md, args.paper_html or (args.paper_md and
                                                        os.path.splitext(args.paper_md)[0] +
                                                        ".html"), published=args.published,
                     compute_png=args.compute_plot)
    return f"wrote {args.out} with {len(df)} rows"


def cmd_theorem1(args, cfg):
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


def cmd_figure4(args, cfg):
    from cmcore.evaluation.reports import write_steps_figure

    if args.dry_run:
        return f"would plot FID against steps from {len(args.metrics)} files into {args.plot}"
    stem = os.path.splitext(args.out)[0]
    write_steps_figure(args.metrics, args.out, args.md or f"{stem}.md",
                       args.html or f"{stem}.html", args.plot)
    return f"wrote {args.out} and {args.plot}"


def cmd_search_tau(args, cfg):
    from cmcore.models import pick_device
    from cmcore.sampling.tau_search import search_checkpoint_taus
    from cmcore.training.checkpoints import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    cfg = dag.settings(cfg, "search-tau", method=ckpt["method"])
    metrics_of, _ = _metrics_of(args, cfg, args.data)
    if ckpt["kind"] == "denoiser":
        raise ValueError(f"{args.checkpoint} holds a {ckpt['method']} model; taus are searched "
                         "for consistency models only")
    if args.dry_run:
        return f"would search the taus of {args.checkpoint} -> {args.out}"
    smp, ts = cfg["sampling"], cfg["sampling"]["tau_search"]
    n_taus = max(set(smp["steps"]) | set(smp["curve_steps"])) - 1
    taus, trace = search_checkpoint_taus(
        ckpt, n_taus, lambda images: metrics_of(images, fid_only=True)["fid"],
        num_samples=ts["num_samples"], batch=smp["batch"], seed=ts["seed"],
        device=pick_device(cfg["device"]), iters=ts["iters"],
        labels=smp.get("labels", "balanced"))
    record = {"taus": taus, "method": ckpt["method"], "checkpoint": args.checkpoint,
              "search": ts, "score": "FID",
              "trace": [{"taus": list(t), "fid": v} for t, v in trace],
              "code_version": config_mod.code_version()}
    with atomic(args.out) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    return f"wrote {args.out}: taus {', '.join(f'{t:.3g}' for t in taus)}"


def cmd_edit(args, cfg):
    import torch

    from cmcore.data import to_model_space, to_uint8
    from cmcore.diffusion.precond import one_hot
    from cmcore.evaluation.reports import save_grid
    from cmcore.experiments.edit_demos import demo
    from cmcore.models import model_from_checkpoint
    from cmcore.prepared import load_prepared
    from cmcore.training.checkpoints import load_checkpoint

    cfg = dag.settings(cfg, "edit")
    ckpt = load_checkpoint(args.checkpoint)
    if ckpt["kind"] == "denoiser":
        raise ValueError(f"{args.checkpoint} holds a {ckpt['method']} model; editing needs a "
                         "consistency model (editing.method)")
    ed = cfg["editing"]
    images, classes = load_prepared(args.data)
    if args.dry_run:
        return f"would write {args.task} edits of {ed['num_images']} images -> {args.out}"
    f = model_from_checkpoint(ckpt)
    x = to_model_space(images[: ed["num_images"]])
    y = one_hot(torch.as_tensor(classes[: ed["num_images"]]), ckpt["net"].get("label_dim", 0))
    rows, labels = demo(f, args.task, x, ed["taus"], seed=cfg["seed"], class_labels=y)
    save_grid(np.concatenate([to_uint8(r) for r in rows]), args.out, ncol=x.shape[0])
    return f"wrote {args.out}: rows {', '.join(labels)}"


def cmd_ablate(args, cfg):
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
    with atomic(args.out) as tmp:
        df.to_csv(tmp, index=False)
    return f"wrote {args.out}: final FID {df['fid'].iloc[-1]:.2f} at {df['iters'].iloc[-1]} it"


def cmd_ablation_report(args, cfg):
    from cmcore.experiments.ablations import write_reports

    cfg = dag.settings(cfg, "ablation-report")
    if args.dry_run:
        return f"would summarise {len(args.scores)} runs into {args.out}/ and {args.plots}/"
    written = write_reports(args.scores, cfg, args.out, args.plots)
    return f"wrote {', '.join(written)} into {args.out}/ and {args.plots}/"


def cmd_bench(args, cfg):
    from cmcore.experiments.bench import FIGURES, NETS, run_bench

    only = args.only.split(",") if args.only else None
    if args.dry_run:
        return (f"would time {only or list(FIGURES)} for net {args.net!r} at batch "
                f"{args.batch or NETS[args.net]['batch']} on {args.device} -> {args.out}")
    records = run_bench(cfg, net=args.net, batch=args.batch, device=args.device,
                        repeats=args.repeats, warmup=args.warmup, bf16=args.bf16, tf32=args.tf32,
                        compile=args.compile, lpips=args.lpips, classifier=args.classifier,
                        inception=args.inception_weights, reference_edm=args.reference_edm,
                        only=only, out=args.out, batch_gpu=args.batch_gpu)
    timed = sum("img_per_s" in r for r in records)
    return f"wrote {args.out}: {timed} timed figures, {len(records) - timed} other lines"


def cmd_export(args, cfg):
    from cmcore.export import export
    from cmcore.training.checkpoints import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    metrics = []
    for path in args.metrics:
        with open(path) as f:
            metrics.append(json.load(f))
    if args.dry_run:
        return f"would export {args.checkpoint} with {len(metrics)} metrics files -> {args.out}/"
    export(ckpt, metrics, args.out)
    return f"wrote {args.out}/: model.safetensors, config.json, README.md"


def cmd_convert(args, cfg):
    from cmcore import convert
    from cmcore.training.checkpoints import save_checkpoint

    if bool(args.edm_pickle) == bool(args.openai):
        raise ValueError("give exactly one of --edm-pickle PATH or --openai PATH")
    if args.openai:
        if not args.arch_config:
            raise ValueError("--openai needs --arch-config (imagenet64, lsun256 or a YAML file)")
        source = args.openai
        payload = convert.openai_teacher(args.openai, args.arch_config, cfg, args.method)
        if args.name:  # the config's entry published.NAME (its taus, the DAG's rule)
            payload["published"] = f"{dag.PUBLISHED}{args.name}"
    else:
        source = args.edm_pickle
        if args.method != "teacher":
            raise ValueError("--method cd / ct applies to --openai files (the released CD and "
                             "CT models); NVlabs/edm pickles hold teachers")
        if args.dry_run:  # unpickling runs code: a dry run checks the inputs only
            convert.check_edm_inputs(args.edm_pickle, args.edm_code, args.allow_pickle)
            return f"would unpickle {source} with {args.edm_code} and write {args.out}"
        payload = convert.edm_teacher(args.edm_pickle, args.edm_code, args.allow_pickle, cfg)
    net = payload["net"]
    what = f"{net['arch']} " + ("teacher" if args.method == "teacher" else
                                f"{args.method.upper()} model")
    if args.dry_run:
        return f"would write {args.out}: {source} as a {what}"
    save_checkpoint(args.out, payload)
    size = sum(v.numel() for v in payload["ema"].values()) / 1e6
    note = "" if cfg["network"]["arch"] == net["arch"] or args.method != "teacher" else (
        f"; note: the config's network.arch is {cfg['network']['arch']!r}, students need "
        f"{net['arch']!r}")
    return f"wrote {args.out}: {source} as a {what} ({size:.1f}M values){note}"
