"""cm export: a trained model as safetensors with a model card, for other tools.

Writes into a folder:
    model.safetensors   the EMA weights of the denoiser D or consistency function f (the
                        state dict of cmcore.models.make_model's module, float32, keys
                        ``model.*`` = the backbone), and in its metadata the network, the
                        diffusion settings, the method and the code version (JSON strings)
    config.json         the same metadata, readable without safetensors
    README.md           the model card: what was trained, on what, how it was scored (the
                        measured FID of each metrics file with its protocol), how to load it
    diffusers/          for a consistency model on the ADM U-Net: the same weights as a
                        ConsistencyModelPipeline (cmcore.diffusers_export); other models say
                        in the card why there is none
``load_exported(folder)`` rebuilds the module (cmcore.models) from the folder alone.
"""

import json
import os

from cmcore.config import code_version
from cmcore.diffusers_export import export_diffusers, exportable
from cmcore.diffusion.schedules import karras_grid
from cmcore.files import atomic

CARD_FIELDS = ("steps", "nfe", "fid", "isc_mean", "precision", "recall", "num_samples",
               "feature_extractor", "reference_set", "sampler", "taus", "seed")


def metadata(ckpt):
    """The settings a loader needs, as safetensors metadata (str -> str)."""
    return {"format": "cmcore-export/1", "method": ckpt["method"], "kind": ckpt["kind"],
            "net": json.dumps(ckpt["net"], sort_keys=True),
            "diffusion": json.dumps(ckpt["config"]["diffusion"], sort_keys=True),
            "train_iters": str(ckpt.get("train_iters")),
            "code_version": str(ckpt.get("code_version"))}


def _row(m):
    taus = " ".join(f"{t:g}" for t in m.get("taus") or []) or "-"
    values = {**m, "taus": taus}
    return "| " + " | ".join(
        f"{values.get(k):.4g}" if isinstance(values.get(k), float) else str(values.get(k, "-"))
        for k in CARD_FIELDS) + " |"


def _diffusers_section(ckpt, metrics):
    """The card's diffusers paragraph: how to load the pipeline, or why there is none."""
    from cmcore.diffusers_export import GRID_POINTS

    reason = exportable(ckpt)
    if reason:
        return ["", "## diffusers", "", f"No diffusers export: {reason}."]
    d = ckpt["config"]["diffusion"]  # the scheduler's sigmas, largest first
    grid = karras_grid(GRID_POINTS, d["sigma_min"], d["sigma_max"], d["rho"]).tolist()[::-1]
    lines = ["", "## diffusers", "", "`diffusers/` holds the same weights as a "
             "`ConsistencyModelPipeline` (UNet2DModel + CMStochasticIterativeScheduler; "
             "tests/test_export.py samples both from the same noise and compares):", "",
             "```python", "from diffusers import ConsistencyModelPipeline",
             "pipe = ConsistencyModelPipeline.from_pretrained('diffusers')",
             "x = pipe(batch_size=16, num_inference_steps=1).images  # one step", "```", ""]
    for m in metrics:
        for tau in m.get("taus") or []:
            i = min(range(1, GRID_POINTS), key=lambda i: abs(grid[i] - tau))
            lines.append(f"Our {m.get('steps')}-step tau = {tau:g} is closest to "
                         f"`timesteps=[{i}, 0]` (sigma {grid[i]:.4g}) of the scheduler's "
                         f"{GRID_POINTS}-point grid; `cm sample` takes tau exactly.")
    return lines


def model_card(ckpt, metrics, meta):
    """The README.md of an export: training, data, evaluation protocol and measured scores."""
    settings = ckpt["config"]
    data = settings.get("dataset", {})
    lines = [
        "---", "library_name: cmcore", "tags: [consistency-models, diffusion, "
        f"{ckpt['method']}]", "---", "",
        f"# {ckpt['method']} ({ckpt['kind']}) trained with cmcore", "",
        f"- Method: `{ckpt['method']}`, {ckpt.get('train_iters')} training iterations, seed "
        f"{ckpt.get('seed')}; code version {ckpt.get('code_version')} (exported by "
        f"{code_version()}).",
        f"- Data: `{data.get('name')}`" + (f" ({data['path']})" if data.get("path") else "")
        + f", network `{ckpt['net'].get('arch')}` "
        f"({json.dumps(ckpt['net'], sort_keys=True)}).",
        f"- Diffusion: {json.dumps(settings['diffusion'], sort_keys=True)}.", "",
        "## Measured scores", "",
    ]
    if metrics:
        lines += ["| " + " | ".join(CARD_FIELDS) + " |",
                  "|" + " --- |" * len(CARD_FIELDS)] + [_row(m) for m in metrics]
        lines += ["", "FID, IS and precision/recall as `cm evaluate` measured them: the feature "
                  "extractor and reference set of each row, num_samples samples."]
    else:
        lines.append("None given (`cm export --metrics` takes the JSON files of cm evaluate).")
    lines += ["", "## Loading", "", "```python", "from cmcore.export import load_exported",
              "f = load_exported('.')  # f(x, t) -> x_eps for a consistency model",
              "```"] + _diffusers_section(ckpt, metrics) + ["", "Training settings:", "", "```json",
              json.dumps(settings, indent=1, sort_keys=True), "```", ""]
    return "\n".join(lines)


def export(ckpt, metrics, folder):
    """Write ``ckpt``'s EMA weights, config and model card into ``folder``. ``metrics``: the
    dicts of cm evaluate for this model (each must name its method)."""
    from safetensors.torch import save_file

    wrong = [m.get("method") for m in metrics if m.get("method") != ckpt["method"]]
    if wrong:
        raise ValueError(f"metrics of {wrong[0]!r} given for a {ckpt['method']} checkpoint; "
                         "pass the metrics files of this model")
    os.makedirs(folder, exist_ok=True)
    meta = metadata(ckpt)
    state = {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in ckpt["ema"].items()}
    with atomic(os.path.join(folder, "model.safetensors"), ".safetensors") as tmp:
        save_file(state, tmp, metadata=meta)
    with atomic(os.path.join(folder, "config.json"), ".json") as tmp, open(tmp, "w") as f:
        json.dump({k: json.loads(v) if k in ("net", "diffusion") else v
                   for k, v in meta.items()}, f, indent=1, sort_keys=True)
    with atomic(os.path.join(folder, "README.md"), ".md") as tmp, open(tmp, "w") as f:
        f.write(model_card(ckpt, metrics, meta))
    if not exportable(ckpt):
        export_diffusers(ckpt, os.path.join(folder, "diffusers"))
    return folder


def load_exported(folder):
    """The module of an export (eval mode), built from its metadata and weights alone."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from cmcore.models import make_model

    path = os.path.join(folder, "model.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "cmcore-export/1":
        raise ValueError(f"{path} is not a cmcore export (no format cmcore-export/1)")
    model = make_model(json.loads(meta["net"]), meta["kind"], json.loads(meta["diffusion"]))
    model.load_state_dict(load_file(path))
    return model.eval().requires_grad_(False)
