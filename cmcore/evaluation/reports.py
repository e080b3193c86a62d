"""Reports: tables gathered from metric JSON files (CSV + Markdown) and sample grids (PNG)."""

import csv
import json
import os

import numpy as np
import pandas as pd

from cmcore.files import atomic

METHOD_ORDER = {"teacher": 0, "cd": 1, "ct": 2, "pd": 3, "ict": 4, "ect": 5, "cd_cont": 6,
                "ct_cont": 7, "sct": 8, "scd": 9, "untrained": 10}
COLUMNS = ["dataset", "method", "steps", "nfe", "fid", "isc", "isc_std", "precision", "recall",
           "label_accuracy", "labels", "source", "num_samples", "feature_extractor",
           "extractor_accuracy", "reference_set",
           "train_iters", "images", "train_seconds", "devices", "device", "device_hours",
           "train_tflop", "distance", "sampler", "taus", "seed", "code_version"]
# The training compute of a row's model (cmcore.training.compute), from its metrics file.
COMPUTE = {"images": "images", "train_seconds": "seconds", "devices": "devices",
           "device": "device", "device_hours": "device_hours", "train_tflop": "tflop"}
LABELS = {"teacher": "EDM teacher (Heun)", "cd": "CD", "ct": "CT", "pd": "PD",
          "ict": "iCT (2023)", "ect": "ECT (2024)", "cd_cont": "CD, continuous time",
          "ct_cont": "CT, continuous time", "sct": "sCT (2024)", "scd": "sCD (2024)",
          "untrained": "untrained network"}


def gather(paths):
    """One row per metric file, sorted by method then steps."""
    rows = []
    for path in paths:
        with open(path) as f:
            m = json.load(f)
        m["isc"], m["isc_std"] = m.pop("isc_mean"), m.get("isc_std")
        m["taus"] = " ".join(f"{t:g}" for t in m.get("taus", [])) or "-"
        compute = m.get("compute") or {}
        m.update({column: compute.get(key) for column, key in COMPUTE.items()})
        rows.append({c: m.get(c) for c in COLUMNS})
    df = pd.DataFrame(rows, columns=COLUMNS)
    df = df.sort_values(["method", "steps"], key=lambda s: s.map(METHOD_ORDER) if s.name ==
                        "method" else s, kind="stable")
    return df.reset_index(drop=True)


def markdown(df):
    """A readable Markdown table: the headline columns, numbers rounded, provenance below."""
    named = df.assign(method=df["method"].map(LABELS).fillna(df["method"]))
    conditional = bool(df["label_accuracy"].notna().any())
    compute = bool(df["images"].notna().any())
    view = named[["method", "steps", "nfe", "fid", "isc", "precision", "recall"]
                + ["label_accuracy"] * conditional + ["distance", "taus", "train_iters"]
                + ["images", "device_hours", "train_tflop"] * compute]
    if compute:  # counts as integers, hours and TFLOP to 3 digits, '-' where not recorded
        view = view.assign(**{
            c: view[c].map(lambda v, f=f: "-" if pd.isna(v) else f(v))
            for c, f in (("images", lambda v: f"{int(v):,}"), ("device_hours", "{:.3g}".format),
                         ("train_tflop", "{:.3g}".format))})
    table = view.to_markdown(index=False, floatfmt=".3f")
    accuracy = named.assign(extractor_accuracy=named["extractor_accuracy"].map(
        lambda v: "-" if pd.isna(v) else f"{v:.3f}"))
    labels = named[named["label_accuracy"].notna()]
    notes = [
        "Compute: the training of the row's own model (images seen, device-hours, TFLOP counted "
        f"over a step by torch's FlopCounterMode, on {_devices(df)}); CD, PD, ECT and sCD also "
        "used the teacher's (its row); '-': not recorded (trained before it was)."
    ] * compute + [
        "Class-conditional samples: label_accuracy is the fraction the feature extractor "
        f"classifies as the requested class ({per_row(labels, 'labels')} labels; chance is 1 / "
        "classes)."
    ] * conditional + [
        f"Data set: {per_row(named, 'dataset')}; {per_row(named, 'num_samples')} samples per row "
        f"against the {per_row(named, 'reference_set')}.",
        f"Feature extractor: {per_row(named, 'feature_extractor')}"
        + (f" (held-out accuracy {per_row(accuracy, 'extractor_accuracy')})."
           if df["extractor_accuracy"].notna().any() else "."),
        f"Seed {per_row(named, 'seed')}; code version {per_row(named, 'code_version')}.",
    ]
    return table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def per_row(df, column):
    """The column's value when all rows share it, else each value with the methods (df's
    "method" column) it holds for: a table gathered from runs of several code versions or seeds
    says which row came from which."""
    groups = df.groupby(df[column].astype(str), sort=False)["method"].unique()
    if len(groups) == 1:
        return groups.index[0]
    return "; ".join(f"{value} ({', '.join(methods)})" for value, methods in groups.items())


def _devices(df):
    names = sorted({f"{int(n)} x {d}" for n, d in zip(df["devices"], df["device"], strict=True)
                    if pd.notna(d)})
    return ", ".join(names) or "-"


def write_compute_plot(df, png_path):
    """FID of each method's 1- and 2-step samples (joined by a line) against its training TFLOP
    (log axes), the teacher's multistep FID as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = df[df["train_tflop"].notna() & (df["train_tflop"] > 0)]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (method, part) in enumerate(rows.groupby("method", sort=False)):
        label, color = LABELS.get(method, method), f"C{i % 10}"
        if method == "teacher":
            r = part.iloc[0]
            ax.scatter(r.train_tflop, r.fid, marker="*", s=90, color=color,
                       label=f"{label}, {r.steps} steps")
            continue
        part = part[part["steps"].isin([1, 2])].sort_values("steps")
        ax.plot(part["train_tflop"], part["fid"], "-", color=color, lw=1, alpha=0.6)
        for r, marker in zip(part.itertuples(), ("o", "s"), strict=False):
            ax.scatter(r.train_tflop, r.fid, marker=marker, color=color,
                       label=label if marker == "o" else None)
    ax.set(xscale="log", yscale="log", xlabel="training compute of the row's own model (TFLOP)",
           ylabel="FID", title="FID against training compute (circle: 1 step, square: 2)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic(png_path, ".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


# Song et al. (2023), Table 1 (CIFAR-10, FID / IS); PD as re-run by the authors with the same
# EDM teacher; the teacher is EDM's Heun sampler with 18 steps (35 NFE).
PAPER_TABLE1 = {("teacher", None): (2.04, 9.84), ("cd", 1): (3.55, 9.48), ("cd", 2): (2.93, 9.75),
                ("ct", 1): (8.70, 8.49), ("ct", 2): (5.83, 8.85), ("pd", 1): (8.34, 8.69),
                ("pd", 2): (5.58, 9.05)}


def markdown_paper(df):
    """Our rows beside the paper's CIFAR-10 numbers, labelled as different data and scale."""
    rows = []
    for r in df.itertuples():
        paper = PAPER_TABLE1.get((r.method, None if r.method == "teacher" else r.steps))
        rows.append({"method": LABELS.get(r.method, r.method), "steps": r.steps, "nfe": r.nfe,
                     "paper FID (CIFAR-10)": f"{paper[0]:.2f}" if paper else "-",
                     "paper IS (CIFAR-10)": f"{paper[1]:.2f}" if paper else "-",
                     f"our FID ({r.dataset})": f"{r.fid:.2f}",
                     f"our IS ({r.dataset})": f"{r.isc:.2f}"})
    table = pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)
    note = ("The paper's columns are CIFAR-10 at 32x32 with Inception features and 50k samples; "
            "ours are the configured data set, extractor and sample count (see table1.md). The "
            "values are not comparable; only the orderings within each column are. The paper's "
            "teacher is EDM's Heun sampler with 18 steps (35 NFE).")
    return f"{note}\n\n{table}\n"


def html_page(md, title):
    """Our Markdown (pipe tables, '- ' notes, paragraphs) as a small HTML page for the report."""
    from html import escape

    body, rows = [], []

    def flush():
        if rows:
            head, *data = [[escape(c.strip()) for c in r.strip().strip("|").split("|")]
                           for r in rows if not set(r) <= set("|:- ")]
            body.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>"
                                  for r in data) + "</table>")
            rows.clear()
    for line in md.splitlines():
        if line.startswith("|"):
            rows.append(line)
            continue
        flush()
        if line.startswith("- "):
            body.append(f"<li>{escape(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{escape(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;font-size:14px}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{style}</style></head><body><h3>{escape(title)}</h3>{''.join(body)}"
            "</body></html>\n")


def write_markdown(md, md_path, html_path, title):
    """The Markdown table ``md`` at ``md_path`` and the same content as HTML at ``html_path``."""
    with open(md_path, "w") as f:
        f.write(md)
    with open(html_path, "w") as f:
        f.write(html_page(md, title))


def _write_csv(df, path):
    with atomic(path) as tmp:
        df.to_csv(tmp, index=False)


# Song et al. (2023), Table 2: FID of the released models' rows at 1 and 2 steps (LPIPS CD),
# by the file name of the release; 2-step LSUN values are not in our reference notes: left out.
PAPER_TABLE2 = {("cd_imagenet64_lpips.pt", 1): 6.20, ("cd_imagenet64_lpips.pt", 2): 4.70,
                ("ct_imagenet64.pt", 1): 13.0, ("ct_imagenet64.pt", 2): 11.1,
                ("cd_bedroom256_lpips.pt", 1): 7.80, ("ct_bedroom256.pt", 1): 16.0,
                ("cd_cat256_lpips.pt", 1): 11.0, ("ct_cat256.pt", 1): 20.7}


def markdown_published(df):
    """Released models (cm convert --openai) beside the paper's Table 2 FID of the same file."""
    rows = []
    for r in df.itertuples():
        paper = PAPER_TABLE2.get((r.source, r.steps))
        rows.append({"model": r.source, "method": r.method.upper(),
                     "steps": r.steps, "taus": r.taus, "our FID": f"{r.fid:.2f}",
                     "paper FID": f"{paper:.2f}" if paper else "-",
                     "precision": f"{r.precision:.3f}", "recall": f"{r.recall:.3f}",
                     "IS": f"{r.isc:.2f}"})
    table = pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)
    note = ("Released consistency models sampled with the configured taus, "
            f"{per_row(df, 'num_samples')} samples per row against the "
            f"{per_row(df, 'reference_set')}; feature extractor: "
            f"{per_row(df, 'feature_extractor')}. The paper's numbers come from openai's TF "
            "evaluator (users of the released ImageNet 64 LPIPS CD model report 8.7 where the "
            "paper says 6.20); ours from torch-fidelity. Code version "
            f"{per_row(df, 'code_version')}.")
    return f"{note}\n\n{table}\n"


def write_table(paths, csv_path, md_path, html_path, paper_md=None, paper_html=None,
                published=False, compute_png=None):
    """Table 1 of the metric files ``paths``: CSV, Markdown and HTML, and, when ``paper_md`` /
    ``paper_html`` are given, our rows beside the paper's CIFAR-10 numbers. ``published``:
    the released models beside the paper's Table 2 instead. ``compute_png``: FID against
    training compute."""
    df = gather(paths)
    _write_csv(df, csv_path)
    if compute_png:
        write_compute_plot(df, compute_png)
    if published:
        write_markdown(markdown_published(df), md_path, html_path,
                       "Released consistency models beside the paper's Table 2")
        return df
    write_markdown(markdown(df), md_path, html_path,
                   f"Table 1 ({os.path.basename(csv_path)})")
    if paper_md:
        write_markdown(markdown_paper(df), paper_md, paper_html,
                       "Ours beside the paper's CIFAR-10 Table 1 (not comparable values)")
    return df


def write_steps_figure(paths, csv_path, md_path, html_path, png_path):
    """Fig. 4 counterpart: FID against the number of sampling steps per method (CSV, Markdown,
    HTML, PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    df = gather(paths)
    view = df.assign(method=df["method"].map(LABELS))
    view = view[["method", "steps", "nfe", "fid", "isc", "precision", "recall", "taus"]]
    _write_csv(df, csv_path)
    write_markdown(view.to_markdown(index=False, floatfmt=".3f") + "\n", md_path, html_path,
                   "FID against sampling steps (Fig. 4)")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    sns.lineplot(data=df.assign(method=df["method"].map(LABELS)), x="steps", y="fid",
                 hue="method", marker="o", ax=ax)
    ax.set(xscale="log", yscale="log", xlabel="sampling steps", ylabel="FID",
           title=f"FID vs sampling steps ({df['dataset'].iloc[0]})")
    ax.set_xticks(sorted(df["steps"].unique()), [str(s) for s in sorted(df["steps"].unique())])
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return df


def save_grid(images, path, ncol=10):
    """Tile uint8 NHWC images into one PNG (grayscale or RGB), upscaled for viewing."""
    from PIL import Image

    n, h, w, c = images.shape
    nrow = -(-n // ncol)
    canvas = np.full((nrow * (h + 1) + 1, ncol * (w + 1) + 1, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = img
    scale = max(1, 512 // (ncol * (w + 1)))
    pil = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST).save(path)


def plot_loss(rows, path):
    """Training loss against iterations from the CSV log's rows, one line per stage (PD's
    halvings); log scale unless a pseudo-loss (continuous time) goes non-positive."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for stage, d in df.groupby("stage", sort=False):
        ax.plot(d["step"], d["loss"], label=str(stage))
    ax.set(xlabel="iteration (per stage)", ylabel="loss",
           yscale="log" if (df["loss"] > 0).all() else "linear")
    if df["stage"].nunique() > 1:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_train_log(log_path, png_path):
    """The loss curve ``png_path`` of the training log ``log_path`` (CSV rows of the training
    loop), drawn by ``plot_loss``; the caller of the loop draws it after training."""
    with open(log_path, newline="") as f:
        rows = [{"stage": r["stage"], "step": int(r["step"]), "loss": float(r["loss"])}
                for r in csv.DictReader(f)]  # the values fit wrote: float(repr(x)) == x
    plot_loss(rows, png_path)


def plot_note(path, text):
    """A small PNG holding one line of text (where a plot has nothing to show)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
