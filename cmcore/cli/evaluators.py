"""The handler of ``cm evaluators``: Table 1's samples scored by torch-fidelity and clean-fid side
by side (and FD-DINOv2 when configured), one row per samples file (cmcore.evaluation.evaluators).
"""

import importlib.util
import json
import os

import numpy as np

from cmcore import config as config_mod
from cmcore import dag
from cmcore.errors import DataError


def cmd_evaluators(args, cfg):
    from cmcore.evaluation.dinov2 import check_weights as check_dinov2
    from cmcore.evaluation.evaluators import check_cleanfid_weights
    from cmcore.evaluation.reference import load_reference_batch

    cfg = dag.settings(cfg, "evaluators")
    ev = cfg["evaluation"]
    # Every package and file is checked before any work: a missing one is one line naming it.
    for package, name, needed in (("cleanfid", "clean-fid", True),
                                  ("timm", "timm", bool(ev["dinov2_weights"]))):
        if needed and importlib.util.find_spec(package) is None:
            raise DataError(f"cm evaluators needs {name}: pip install -e '.[peers]'")
    check_cleanfid_weights(ev["feature_extractor"], ev["cleanfid_inception"])
    check_dinov2(ev["dinov2_weights"])
    classifier = ev["feature_extractor"] == "classifier"
    weights = args.classifier if classifier else ev["inception_weights"]
    if not weights or not os.path.isfile(weights):
        raise DataError(f"feature-extractor weights {weights!r} not found (evaluation settings"
                        + ("; give --classifier)" if classifier else ")"))
    metas = args.meta or [os.path.splitext(s)[0] + ".json" for s in args.samples]
    if len(metas) != len(args.samples):
        raise DataError(f"--meta: {len(metas)} files for {len(args.samples)} samples files; "
                        "give one sidecar per samples file, in the same order")
    for path in [args.reference, *args.samples, *metas]:
        if not os.path.isfile(path):
            raise DataError(f"{path} not found (cm sample writes samples and their sidecars)")
    batch = load_reference_batch(args.reference_batch) if args.reference_batch else None
    what = "torch-fidelity and clean-fid" + (" and FD-DINOv2" if ev["dinov2_weights"] else "")
    if args.dry_run:
        return f"would score {len(args.samples)} sample files with {what} -> {args.out}"
    rows = _score(args, metas, cfg, batch, weights)
    from cmcore.evaluation.evaluators import write_table

    stem = os.path.splitext(args.out)[0]
    write_table(rows, args.out, args.md or f"{stem}.md", args.html or f"{stem}.html")
    worst = max(abs(r["fid_rel_diff"]) for r in rows)
    return (f"wrote {args.out}: {len(rows)} rows scored with {what}; largest relative FID "
            f"difference {worst:.2e}")


def _score(args, metas, cfg, batch, weights):
    """One row per samples file: SideBySide's scores, the sidecar's method and steps, and the
    provenance of the reference set, the evaluators and the code."""
    from cmcore.evaluation.dinov2 import FDDINOv2
    from cmcore.evaluation.evaluators import SideBySide, versions
    from cmcore.models import pick_device
    from cmcore.prepared import load_prepared

    ev, device = cfg["evaluation"], pick_device(cfg["device"])
    if batch is not None and batch.images is not None:
        reference = batch.images
    else:
        reference, _ = load_prepared(args.reference)
    name = cfg["dataset"]["name"]
    reference_set = batch.describe() if batch else f"{name} training set ({args.reference})"
    if ev["dinov2_weights"] and batch is not None:
        reference_set += "; FD-DINOv2: its images or the training set"
    dinov2 = None if not ev["dinov2_weights"] else FDDINOv2(
        ev["dinov2_weights"], reference, ev["dinov2_arch"], device, args.threads)
    side = SideBySide(reference, extractor=ev["feature_extractor"], weights_path=weights,
                      cleanfid_inception=ev["cleanfid_inception"],
                      reference_stats=None if batch is None else (batch.mu, batch.sigma),
                      prc_neighborhood=ev["prc_neighborhood"], device=device, dinov2=dinov2)
    rows, common = [], dict(reference_set=reference_set, versions=versions(),
                            code_version=config_mod.code_version())
    for path, meta_path in zip(args.samples, metas, strict=True):
        with np.load(path) as f:
            samples = f["arr_0"]
        with open(meta_path) as f:
            meta = json.load(f)
        rows.append({**side(samples), **common, "method": meta["method"],
                     "steps": meta["steps"], "nfe": meta.get("nfe"), "seed": meta.get("seed"),
                     "samples": f"{path} (code {meta.get('code_version', '-')})"})
    return rows
