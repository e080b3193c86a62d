"""The rules of a config that its JSON schema cannot say: finite numbers, cross-field checks,
files a run will need. semantic_error(cfg) -> one line naming the key and the fix, or None.

Torch-free: `snakemake -n` runs these on a login node, before any job.
"""

import math
import os

# Image side and classes of the built-in data sets (npz and image_folder: dataset.resolution;
# their classes are counted when training starts).
RESOLUTION = {"digits": 8, "cifar10": 32}
CLASSES = {"digits": 10, "cifar10": 10}
DIGITS = 1797  # images of scikit-learn's digits, the classifier's data
# torch-fidelity's Inception Score splits: each split needs samples.
ISC_SPLITS = 10
TRAINING = ("teacher", "cd", "ct", "pd", "ict", "ect", "cd_cont", "ct_cont")
# The torch hub file of LPIPS's AlexNet backbone (torchvision's ImageNet weights).
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


# The keys each data set and each backbone reads; any other key given is refused (a value that
# would be silently ignored).
DATASET_KEYS = {"digits": {"xflip"}, "cifar10": {"path", "xflip"},
                "mixture": {"num_points", "xflip"},  # xflip swaps a point's coordinates
                "npz": {"path", "resolution", "max_images", "xflip"},
                "image_folder": {"path", "resolution", "max_images", "xflip"}}
UNET_KEYS = {"label_dim", "model_channels", "channel_mult", "num_blocks", "attn_resolutions",
             "dropout"}
ARCH_KEYS = {"ddpmpp": UNET_KEYS, "ncsnpp": UNET_KEYS, "mlp": {"hidden", "depth"},
             "adm": UNET_KEYS | {"num_head_channels", "use_scale_shift_norm", "resblock_updown"}}


def unused_key(config, defaults):
    """The first dataset or network key that its data set or backbone does not read, as one
    line; None if none. A key holding its schema default (``defaults``: section -> key ->
    value) passes: a resolved config has every default filled in."""
    for section, table in (("dataset", DATASET_KEYS), ("network", ARCH_KEYS)):
        node = config.get(section)
        kind = node.get("name" if section == "dataset" else "arch") if isinstance(node, dict) \
            else None
        if kind not in table:
            continue  # the schema names the problem
        extra = sorted(k for k in set(node) - table[kind] - {"name", "arch"}
                       if k not in defaults[section] or node[k] != defaults[section][k])
        if extra:
            return (f"{section}.{extra[0]}: not used by {kind}; remove it (or choose the "
                    f"{'data set' if section == 'dataset' else 'backbone'} that reads it)")
    return None


def _key(path):
    return ".".join(str(p) for p in path) or "<top level>"


def non_finite(node, path=()):
    """The dotted key of the first NaN or infinite number in ``node``, else None (JSON Schema
    bounds let NaN through: every comparison with NaN is false)."""
    if isinstance(node, float) and not math.isfinite(node):
        return _key(path)
    items = node.items() if isinstance(node, dict) else \
        enumerate(node) if isinstance(node, list) else ()
    for name, sub in items:
        found = non_finite(sub, (*path, name))
        if found:
            return found
    return None


def _decreasing_inside(taus, lo, hi):
    """tau_1 > tau_2 > ... strictly, all in (lo, hi]."""
    return all(a > b for a, b in zip(taus, taus[1:], strict=False)) and \
        all(lo < t <= hi for t in taus)


def _hub_dir():
    """torch.hub.get_dir() without torch: $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch")
    return os.path.join(home, "hub")


def _network_error(cfg):
    ds, net = cfg["dataset"], cfg["network"]
    if ds["name"] == "mixture":
        if net["arch"] != "mlp":
            return "network.arch: the 2-D mixture needs arch: mlp (the U-Nets take images)"
        own = [name for name in TRAINING if "dropout" in cfg.get(name, {})]
        if own:
            return f"{own[0]}.dropout: the mlp has no dropout; remove the key"
        return None
    if net["arch"] == "mlp":
        return f"network.arch: mlp is for the 2-D mixture; {ds['name']} images need a U-Net"
    classes, label_dim = CLASSES.get(ds["name"]), net.get("label_dim", 0)
    if label_dim and classes and label_dim != classes:
        return (f"network.label_dim: {ds['name']} has {classes} classes, not {label_dim}; set "
                f"label_dim: {classes} (or 0 for an unconditional model)")
    res = RESOLUTION.get(ds["name"], ds.get("resolution"))
    if res is None:
        return None  # an npz without dataset.resolution: checked against the images
    levels = len(net["channel_mult"])
    if res % 2 ** (levels - 1):
        return (f"network.channel_mult: {levels} levels halve {res} px {levels - 1} times; "
                f"use at most {(res & -res).bit_length()} levels")
    reached = {res >> i for i in range(levels)}
    missing = sorted(set(net["attn_resolutions"]) - reached)
    if missing:
        return (f"network.attn_resolutions: {missing} px never occur (levels: "
                f"{sorted(reached, reverse=True)}); pick from those")
    return None


def _nodes_error(resources):
    for kind, r in resources.items():
        if kind != "train" and r["nodes"] > 1:
            return (f"resources.{kind}.nodes: only training jobs run on several nodes; set "
                    f"it to 1")
    nodes, gpus = resources["train"]["nodes"], resources["train"]["gpu"]
    if nodes > 1 and (gpus < nodes or gpus % nodes):
        return (f"resources.train.nodes = {nodes} needs resources.train.gpu (the job's GPUs, "
                f"all nodes together) to be a multiple of {nodes}, not {gpus}")
    return None


def _training_error(cfg):
    message = _nodes_error(cfg["resources"])
    if message:
        return message
    gpus = cfg["resources"]["train"]["gpu"]
    for name in TRAINING:
        if name not in cfg:
            continue
        batch, batch_gpu = cfg[name]["batch"], cfg[name].get("batch_gpu")
        if gpus > 1 and batch % gpus:
            return (f"{name}.batch: {batch} does not split over "
                    f"resources.train.gpu = {gpus} GPUs; use a multiple of {gpus}")
        share = batch // max(gpus, 1)
        if batch_gpu and share % batch_gpu:
            return (f"{name}.batch_gpu: {batch_gpu} does not divide the {share} rows each GPU "
                    f"gets of the batch {batch}; use a divisor of {share}")
    ct = cfg["ct"]
    if ct["s1"] <= ct["s0"]:
        return f"ct.s1 = {ct['s1']} must be greater than ct.s0 = {ct['s0']}"
    if "ict" in cfg and cfg["ict"]["s1"] <= cfg["ict"]["s0"]:
        return (f"ict.s1 = {cfg['ict']['s1']} must be greater than ict.s0 = "
                f"{cfg['ict']['s0']} (the curriculum doubles N from s0 up to s1)")
    if cfg["ablations"]["ict"] and "ict" not in cfg:
        return "ablations.ict: an iCT curve needs an ict section (see config/config.yaml)"
    s1 = cfg["ablations"]["ct"]["s1"]
    if s1 is not None and s1 <= ct["s0"]:
        return f"ablations.ct.s1 = {s1} must be greater than ct.s0 = {ct['s0']}"
    start = cfg["pd"]["start_steps"]
    if start & (start - 1):
        return f"pd.start_steps = {start} must be a power of two (PD halves it down to 1)"
    return None


def _sampling_error(cfg):
    smp, d = cfg["sampling"], cfg["diffusion"]
    all_steps = sorted(set(smp["steps"]) | set(smp["curve_steps"]))
    for n in [] if smp["tau_search"]["enabled"] else all_steps:
        taus = smp["tau"].get(str(n), [] if n == 1 else None)
        if taus is None:
            return f"sampling.tau: no intermediate times for {n}-step sampling; add '{n}': [...]"
        if len(taus) != n - 1:
            return f"sampling.tau.{n}: needs {n - 1} times, got {len(taus)}"
        if not _decreasing_inside(taus, d["sigma_min"], d["sigma_max"]):
            return f"sampling.tau.{n}: times must decrease strictly within (sigma_min, sigma_max)"
    start = cfg["pd"]["start_steps"]
    if max(all_steps) > start // 2 or any(n & (n - 1) for n in all_steps):
        return (f"sampling: PD students sample with powers of two up to pd.start_steps / 2 = "
                f"{start // 2}; raise pd.start_steps or drop the larger step counts")
    need = max(ISC_SPLITS, cfg["evaluation"]["prc_neighborhood"] + 1)
    for key, n in (("sampling.num_samples", smp["num_samples"]),
                   ("sampling.tau_search.num_samples", smp["tau_search"]["num_samples"]),
                   ("ablations.num_samples", cfg["ablations"]["num_samples"])):
        if n < need:
            return (f"{key}: {n} samples are too few for the metrics ({ISC_SPLITS} Inception "
                    f"Score splits, k = prc_neighborhood + 1 neighbours); use at least {need}")
    ed = cfg["editing"]
    if not _decreasing_inside(ed["taus"], d["sigma_min"], d["sigma_max"]):
        return "editing.taus: times must decrease strictly within (sigma_min, sigma_max]"
    return None


def _files_error(cfg):
    ds, ev = cfg["dataset"], cfg["evaluation"]
    pretrained = cfg["teacher"]["pretrained"]
    if pretrained and not os.path.isfile(pretrained):
        return (f"teacher.pretrained: {pretrained!r} not found; write it with `cm convert` or "
                "remove the key to train the teacher")
    if ds["name"] == "cifar10" and not (ds["path"] and os.path.isfile(ds["path"])):
        return (f"dataset.path: CIFAR-10 tarball not found at {ds['path']!r}; download "
                "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/ and set the path")
    exists = {"npz": os.path.isfile, "image_folder": os.path.isdir}.get(ds["name"])
    if exists and not (ds["path"] and exists(ds["path"])):
        what = "npz file" if ds["name"] == "npz" else "image folder"
        return (f"dataset.path: {what} not found at {ds['path']!r}; set dataset.path to the "
                "training images (layouts: cmcore/data.py, config/imagenet64.yaml)")
    if ds["name"] == "image_folder" and not ds.get("resolution"):
        return "dataset.resolution: an image_folder data set needs the image side (e.g. 64)"
    if ev["feature_extractor"] == "inception" and not (
        ev["inception_weights"] and os.path.isfile(ev["inception_weights"])
    ):
        return (f"evaluation.inception_weights: file not found ({ev['inception_weights']!r}); get "
                "weights-inception-2015-12-05-6726825d.pth from the torch-fidelity releases")
    if ev["reference"] and not os.path.isfile(ev["reference"]):
        return (f"evaluation.reference: {ev['reference']!r} not found; get the paper's reference "
                "batch (ADM's VIRTUAL_*.npz, EDM's fid-refs) or set it to null")
    for key, source in (
        ("cleanfid_inception", "inception-2015-12-05.pt (NVIDIA's stylegan2-ada-pytorch metrics)"),
        ("dinov2_weights", "dinov2_vitl14_pretrain.pth of facebookresearch/dinov2"),
    ):
        if ev[key] and not os.path.isfile(ev[key]):
            return f"evaluation.{key}: {ev[key]!r} not found; get {source} or set it to null"
    if ev["feature_extractor"] == "classifier" and ds["name"] != "digits":
        return "evaluation.feature_extractor: 'classifier' is trained on digits only; use inception"
    c = ev["classifier"]
    n_train = int(DIGITS * (1 - c["holdout_fraction"]))
    if ev["feature_extractor"] == "classifier" and n_train < c["batch"]:
        return (f"evaluation.classifier.holdout_fraction: {c['holdout_fraction']} leaves "
                f"{n_train} of {DIGITS} digits to train on, fewer than one batch of "
                f"{c['batch']}; hold out less")
    uses = [name for name in TRAINING if cfg.get(name, {}).get("distance") == "lpips"]
    ab = cfg["ablations"]
    if ab["enabled"] and "lpips" in ab["distances"]:
        uses.append("ablations.distances")
    hub = os.path.join(_hub_dir(), "checkpoints", ALEXNET_FILE)
    if uses and cfg["distance_options"]["lpips_backbone"] == "pretrained" and \
            not os.path.isfile(hub):
        return (f"distance_options.lpips_backbone: {uses[0]} uses LPIPS, whose pretrained AlexNet "
                f"is not at {hub}; copy it there or set lpips_backbone: random")
    return None


def semantic_error(cfg):
    """The first rule a validated, default-filled config breaks, as one line; None if none."""
    d = cfg["diffusion"]
    if d["sigma_max"] <= d["sigma_min"]:
        return "diffusion.sigma_max must be greater than diffusion.sigma_min"
    for check in (_network_error, _training_error, _sampling_error, _files_error):
        message = check(cfg)
        if message:
            return message
    return None
