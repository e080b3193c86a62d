"""The paper's Fig. 3 ablations at small scale: FID at the EMA snapshots of one run, and the
panels' tables and figures over seeds. The runs, their names and configs are cmcore.dag's.

A snapshot is the evaluation EMA at an iteration, scored by the FID of ``ablations.num_samples``
one-step samples. Panels: (a) CD distance at cd.solver and cd.N, FID against iterations; (b)
Euler vs Heun over N; (c) Heun over N; (d) adaptive vs fixed CT, FID against iterations.
"""

import numpy as np
import pandas as pd

from cmcore.dag import PANELS, panels
from cmcore.evaluation.reports import write_markdown


def score_snapshots(ckpt, metrics_of, *, num_samples, batch, seed, device):
    """``metrics_of(images)`` (FID, IS, precision, recall) of ``num_samples`` one-step samples of
    every EMA snapshot of ``ckpt``, one row per snapshot iteration, the final EMA included."""
    from cmcore.sampling.samplers import sample_checkpoint, training_distance

    snapshots = {**ckpt.get("snapshots", {}), str(ckpt["train_iters"]): ckpt["ema"]}
    rows = []
    for k in sorted(snapshots, key=int):
        images, _, _ = sample_checkpoint({**ckpt, "ema": snapshots[k]}, 1, num_samples, batch,
                                         seed, device)
        m = metrics_of(images)
        rows.append({"iters": int(k), "fid": m["fid"], "isc": m["isc_mean"],
                     "precision": m["precision"], "recall": m["recall"],
                     "num_samples": m["num_samples"], "distance": training_distance(ckpt)})
    return rows


def summarize(df):
    """Mean, sample standard deviation and count of FID over seeds per (panel, variant, N,
    iters); the seed-to-seed spread is the std (ddof 1; NaN for one seed)."""
    keys = ["panel", "run", "variant", "N", "iters", "distance"]
    g = df.groupby(keys, dropna=False, sort=False)["fid"]
    out = g.agg(fid_mean="mean", fid_std="std", seeds="count").reset_index()
    return out


def gather(paths, cfg):
    """All per-seed rows of the runs' CSV files, one copy per panel that shows the run."""
    per_run = {}
    for path in paths:
        d = pd.read_csv(path)
        per_run.setdefault(d["run"].iloc[0], []).append(d)
    frames = []
    for panel, rows in panels(cfg).items():
        for run, variant, N in rows:
            for d in per_run.get(run, []):
                frames.append(d.assign(panel=panel, variant=variant, N=N))
    if not frames:
        raise ValueError(f"none of the runs {sorted(per_run)} is an ablation of this config")
    return pd.concat(frames, ignore_index=True)


def _plot(rows, panel, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(5, 3.5))
    if panel in ("a", "d"):  # FID against training iterations, band = one std over seeds
        sns.lineplot(data=rows, x="iters", y="fid", hue="variant", marker="o",
                     errorbar="sd", ax=ax)
        ax.set(xlabel="training iterations")
    else:  # FID of the final snapshot against N
        last = rows[rows["iters"] == rows["iters"].max()]
        sns.lineplot(data=last, x="N", y="fid", hue="variant", marker="o", errorbar="sd", ax=ax)
        ax.set(xscale="log", xlabel="N (grid points)")
        ns = sorted(last["N"].unique())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(ns, [str(int(n)) for n in ns])
    ax.set(yscale="log", ylabel="FID (1 step)", title=PANELS[panel])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(summary, panel, cfg):
    final = summary[summary["iters"] == summary["iters"].max()] if panel in ("b", "c") \
        else summary
    view = final.assign(
        N=["-" if pd.isna(n) else str(int(n)) for n in final["N"]],
        fid=[f"{m:.2f} ± {s:.2f}" if np.isfinite(s) else f"{m:.2f}"
             for m, s in zip(final["fid_mean"], final["fid_std"], strict=True)])
    cols = ["variant", "N", "iters", "fid", "seeds", "distance"]
    table = view[cols].rename(columns={"fid": "FID (mean ± std over seeds)"})
    notes = (f"{PANELS[panel]}. One-step FID of {cfg['ablations']['num_samples']} samples per "
             f"snapshot, feature extractor {cfg['evaluation']['feature_extractor']}; mean ± "
             f"sample std over the seeds {cfg['ablations']['seeds']}.")
    return f"{notes}\n\n{table.to_markdown(index=False, disable_numparse=True)}\n"


def write_reports(paths, cfg, tables_dir, plots_dir):
    """fig3{panel}.csv / .md under tables_dir and fig3{panel}.png under plots_dir per panel."""
    rows = gather(paths, cfg)
    written = []
    for panel in PANELS:
        sub = rows[rows["panel"] == panel]
        if sub.empty:
            continue
        summary = summarize(sub)
        base = f"fig3{panel}"
        summary.to_csv(f"{tables_dir}/{base}.csv", index=False)
        write_markdown(_markdown(summary, panel, cfg), f"{tables_dir}/{base}.md",
                       f"{tables_dir}/{base}.html", PANELS[panel])
        _plot(sub, panel, f"{plots_dir}/{base}.png")
        written.append(base)
    return written
