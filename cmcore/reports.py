"""Reports: tables gathered from metric JSON files (CSV + Markdown) and sample grids (PNG)."""

import json
import os

import numpy as np
import pandas as pd

METHOD_ORDER = {"teacher": 0, "cd": 1, "ct": 2, "pd": 3, "untrained": 4}
COLUMNS = ["dataset", "method", "steps", "nfe", "fid", "isc", "isc_std", "precision", "recall",
           "num_samples", "feature_extractor", "extractor_accuracy", "reference_set",
           "train_iters", "sampler", "taus", "seed", "code_version"]
LABELS = {"teacher": "EDM teacher (Heun)", "cd": "CD", "ct": "CT", "pd": "PD",
          "untrained": "untrained network"}


def gather(paths):
    """One row per metric file, sorted by method then steps."""
    rows = []
    for path in paths:
        with open(path) as f:
            m = json.load(f)
        m["isc"], m["isc_std"] = m.pop("isc_mean"), m.get("isc_std")
        m["taus"] = " ".join(f"{t:g}" for t in m.get("taus", [])) or "-"
        rows.append({c: m.get(c) for c in COLUMNS})
    df = pd.DataFrame(rows, columns=COLUMNS)
    df = df.sort_values(["method", "steps"], key=lambda s: s.map(METHOD_ORDER) if s.name ==
                        "method" else s, kind="stable")
    return df.reset_index(drop=True)


def markdown(df):
    """A readable Markdown table: the headline columns, numbers rounded, provenance below."""
    view = df.assign(method=df["method"].map(LABELS).fillna(df["method"]))
    view = view[["method", "steps", "nfe", "fid", "isc", "precision", "recall", "taus",
                 "train_iters"]]
    table = view.to_markdown(index=False, floatfmt=".3f")
    first = df.iloc[0]
    notes = [
        f"Data set: {first['dataset']}; {first['num_samples']} samples per row against the "
        f"{first['reference_set']}.",
        f"Feature extractor: {first['feature_extractor']}"
        + (f" (held-out accuracy {first['extractor_accuracy']:.3f})."
           if pd.notna(first["extractor_accuracy"]) else "."),
        f"Seed {first['seed']}; code version {first['code_version']}.",
    ]
    return table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def write_table(paths, out_csv):
    """Write ``out_csv`` and the Markdown table beside it (same stem, .md); return the frame."""
    df = gather(paths)
    tmp = f"{out_csv}.tmp"
    df.to_csv(tmp, index=False)
    os.replace(tmp, out_csv)
    with open(os.path.splitext(out_csv)[0] + ".md", "w") as f:
        f.write(markdown(df))
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
