"""The paper's Fig. 3 ablations at small scale: runs, their configs, FID at EMA snapshots, and
tables and figures over seeds.

A run is one training configuration, named canonically so runs shared by several panels are
trained once per seed:

    cd-{solver}-N{N}-{distance}   consistency distillation (Fig. 3a-c)
    ct-adaptive                   consistency training with the N(k), mu(k) curriculum (Fig. 3d)
    ct-fixed-N{N}-mu{mu}          consistency training with constant N and mu (Fig. 3d baseline)
    ict                           improved CT (cmcore.methods.ict) beside them, when
                                  ablations.ict is on

Panels: (a) CD distance at cd.solver and cd.N, FID against iterations; (b) Euler vs Heun over N;
(c) Heun over N; (d) adaptive vs fixed CT, FID against iterations. Each run differs from the
config's cd / ct section in its named settings only, with the budget of ``ablations.cd`` /
``ablations.ct`` (iterations, batch, snapshot interval). A snapshot is the evaluation EMA at that
iteration, scored by the FID of ``ablations.num_samples`` one-step samples.
"""

import copy
import re

import numpy as np
import pandas as pd

from cmcore.evaluation.reports import write_markdown

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
    """{panel: [(run, variant label, N or None)]} of the enabled ablations."""
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
    """The config of one ablation run: the method's section with the run's settings and the
    ablation budget, and ``seed``; (method, config)."""
    method, settings = parse_run(run)
    out = copy.deepcopy(cfg)
    # iCT runs on CT's budget; s1 means its own curriculum's end there, so it is not copied.
    budget = {k: v for k, v in cfg["ablations"]["ct" if method == "ict" else method].items()
              if v is not None and not (method == "ict" and k == "s1")}
    out[method].update({**budget, **settings})
    out["seed"] = seed
    return method, out


def score_snapshots(ckpt, cfg, reference, classifier):
    """FID (and IS, precision, recall) of one-step samples of every EMA snapshot of ``ckpt``,
    one row per snapshot iteration, the final EMA included."""
    from cmcore.evaluation.metrics import compute_metrics
    from cmcore.models import pick_device
    from cmcore.sampling.samplers import sample_checkpoint, training_distance

    ev = cfg["evaluation"]
    sample_cfg = copy.deepcopy(cfg)
    sample_cfg["sampling"]["num_samples"] = cfg["ablations"]["num_samples"]
    snapshots = {**ckpt.get("snapshots", {}), str(ckpt["train_iters"]): ckpt["ema"]}
    rows = []
    for k in sorted(snapshots, key=int):
        images, _ = sample_checkpoint({**ckpt, "ema": snapshots[k]}, sample_cfg, 1)
        m = compute_metrics(images, reference, extractor=ev["feature_extractor"],
                            weights_path=classifier, prc_neighborhood=ev["prc_neighborhood"],
                            device=pick_device(cfg["device"]))
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
        write_markdown(_markdown(summary, panel, cfg), f"{tables_dir}/{base}.md", PANELS[panel])
        _plot(sub, panel, f"{plots_dir}/{base}.png")
        written.append(base)
    return written
