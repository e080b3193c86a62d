"""Import published weights as cmcore teacher checkpoints (the ``teacher`` input of CD and PD).

- NVlabs/edm network pickles (``edm-cifar10-32x32-uncond-vp.pkl``, ...): ``pickle.load(f)["ema"]``
  is an ``EDMPrecond`` whose ``.model`` is a ``SongUNet``, state-dict identical to ours
  (cmcore.networks.songunet); its constructor arguments come from the ``init_kwargs`` that
  NVlabs' ``torch_utils.persistence`` keeps on every network. Unpickling runs code from the file
  and needs NVlabs' ``dnnlib`` and ``torch_utils`` importable, so it takes an explicit
  ``allow_pickle`` and the path of an NVlabs/edm checkout.
- openai/consistency_models state dicts (``edm_imagenet64_ema.pt``, ``edm_bedroom256_ema.pt``,
  ``edm_cat256_ema.pt``): plain tensors, read with ``torch.load(weights_only=True)`` and checked
  key by key against our ADMUNet (cmcore.networks.adm), whose forward embeds the openai time
  input 1000 c_noise.

Both preconditionings are EDM's with sigma_data = 0.5 (c_noise = ln(sigma) / 4), the one of
cmcore.diffusion.precond.Denoiser. The result is what ``cm train --method teacher`` writes: method
``teacher``, kind ``denoiser``, the backbone arguments under ``net`` and the Denoiser's state dict
(keys ``model.*``) under ``model`` and ``ema``, plus ``source`` (file, SHA-256, format).
"""

import hashlib
import inspect
import os
import pickle
import sys

import torch
import yaml

from cmcore.config import code_version
from cmcore.networks import ADM_PRESETS, SongUNet, build_network
from cmcore.training.checkpoints import FORMAT, CheckpointError

EDM_URL = "https://github.com/NVlabs/edm"
OPENAI_URL = "https://github.com/openai/consistency_models (README: checkpoints)"


def expected_layout(net_cfg):
    """{key: shape} of the backbone ``net_cfg`` builds (on the meta device: no memory)."""
    with torch.device("meta"):
        net = build_network(net_cfg)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def check_layout(state, net_cfg, what):
    """CheckpointError naming the first key of ``state`` that the backbone of ``net_cfg`` lacks,
    has with another shape, or has that ``state`` lacks."""
    expected = expected_layout(net_cfg)
    for key, shape in expected.items():
        if key not in state:
            raise CheckpointError(
                f"{what}: key {key!r} is missing; the file does not hold the configured "
                f"{net_cfg['arch']} network"
            )
        if tuple(state[key].shape) != shape:
            raise CheckpointError(
                f"{what}: key {key!r} has shape {tuple(state[key].shape)}, "
                f"the configured {net_cfg['arch']} network expects {shape}"
            )
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(
            f"{what}: unexpected key {extra[0]!r} (not in the configured {net_cfg['arch']} network)"
        )


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def teacher_payload(net_cfg, backbone_state, cfg, source, method="teacher"):
    """A cmcore checkpoint around a backbone state dict (float32, keys ``model.*``): a teacher
    (denoiser D), or for ``method`` cd / ct a consistency model f, as cm train writes them."""
    state = {
        f"model.{k}": (v.float() if v.is_floating_point() else v).detach().contiguous()
        for k, v in backbone_state.items()
    }
    return {
        "format": FORMAT,
        "method": method,
        "kind": "denoiser" if method == "teacher" else "consistency",
        "net": net_cfg,
        "config": cfg,
        "seed": cfg["seed"],
        "code_version": code_version(),
        "model": state,
        "ema": state,
        "target": None,
        "optimizer": None,
        "step": 0,
        "train_iters": 0,
        "source": source,
    }


def _check_sigma_data(cfg, sigma_data, what):
    if cfg["diffusion"]["sigma_data"] != sigma_data:
        raise CheckpointError(
            f"{what} was trained with sigma_data = {sigma_data}; set "
            f"diffusion.sigma_data to it (config has "
            f"{cfg['diffusion']['sigma_data']})"
        )


# ----------------------------------------------------------------------------------------------
# openai/consistency_models state dicts.


def adm_config(arch_config):
    """ADM arguments: a name of ADM_PRESETS or a YAML file holding a mapping of them."""
    if arch_config in ADM_PRESETS:
        return dict(ADM_PRESETS[arch_config])
    if not os.path.isfile(arch_config):
        raise CheckpointError(
            f"--arch-config {arch_config!r} is neither one of "
            f"{', '.join(ADM_PRESETS)} nor a YAML file of ADM arguments"
        )
    with open(arch_config) as f:
        net_cfg = yaml.safe_load(f)
    if not isinstance(net_cfg, dict) or net_cfg.get("arch") != "adm":
        raise CheckpointError(f"--arch-config {arch_config}: needs a mapping with arch: adm")
    try:
        expected_layout(net_cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"--arch-config {arch_config}: {e}") from None
    return net_cfg


def openai_teacher(path, arch_config, cfg, method="teacher"):
    """The checkpoint of an openai state dict of the ADM network ``arch_config``: the EDM
    teacher (``edm_*_ema.pt``), or with ``method`` cd / ct a released consistency model
    (``cd_imagenet64_lpips.pt``, ``ct_bedroom256.pt``, ...). Their f is ours: openai's
    boundary-condition scalings c_skip = sd^2 / ((t - eps)^2 + sd^2), c_out = (t - eps) sd /
    sqrt(t^2 + sd^2), c_in = 1 / sqrt(t^2 + sd^2), time input 1000 * ln(t) / 4, with eps = 0.002
    (cmcore.diffusion.precond.ConsistencyFunction around ADMUNet)."""
    if method not in ("teacher", "cd", "ct"):
        raise CheckpointError(f"--method {method!r}: openai files hold a teacher, cd or ct")
    net_cfg = adm_config(arch_config)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"--openai: {path} not found; the published files are listed at {OPENAI_URL}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled classes, truncated or foreign files
        raise CheckpointError(
            f"--openai: {path} is not a plain state dict of tensors ({type(e).__name__})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"--openai: {path} is not a state dict of tensors")
    check_layout(state, net_cfg, f"--openai {path}")
    _check_sigma_data(cfg, 0.5, f"--openai {path}")  # KarrasDenoiser(sigma_data=0.5)
    if method != "teacher" and cfg["diffusion"]["sigma_min"] != 0.002:
        raise CheckpointError(f"--openai {path}: consistency models were trained with "
                              "sigma_min = 0.002 (f(x, eps) = x); set diffusion.sigma_min to it")
    source = {
        "file": os.path.abspath(path),
        "sha256": _sha256(path),
        "format": "openai/consistency_models state dict",
        "arch_config": arch_config,
    }
    return teacher_payload(net_cfg, state, cfg, source, method)


# ----------------------------------------------------------------------------------------------
# NVlabs/edm network pickles.


def _plain(value):
    """Tuples and lists to lists, recursively, so a net config is YAML and weights_only safe."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def songunet_from_edm(init_kwargs, state):
    """(net config, state dict) of our SongUNet from the ``init_kwargs`` and state dict of
    NVlabs' SongUNet.

    All constructor arguments are written out (our defaults are EDM's), so the config does not
    depend on the arch presets; arch is ncsnpp for the Fourier embedding, else ddpmpp. The
    augmentation mapping (``map_augment``, EDM's augment_dim = 9 for CIFAR-10) is dropped: SongUNet
    uses it only when augmentation labels are passed, which sampling and distillation never
    do, so outputs are unchanged and a student built from the config's ``network`` (which has no
    augment_dim) can start from the teacher's weights.
    """
    params = inspect.signature(SongUNet).parameters
    unknown = sorted(set(init_kwargs) - set(params))
    if unknown:
        raise CheckpointError(f"--edm-pickle: SongUNet argument {unknown[0]!r} is not one of ours")
    defaults = {k: p.default for k, p in params.items() if p.default is not p.empty}
    net_cfg = {k: _plain(v) for k, v in {**defaults, **init_kwargs}.items()}
    state = dict(state)
    if net_cfg["augment_dim"]:
        state.pop("map_augment.weight", None)
        net_cfg["augment_dim"] = 0
    arch = "ncsnpp" if net_cfg["embedding_type"] == "fourier" else "ddpmpp"
    net_cfg = {"arch": arch, **net_cfg}
    check_layout(state, net_cfg, "--edm-pickle")
    return net_cfg, state


def check_edm_inputs(path, edm_code, allow_pickle):
    """Refuse before reading: no --allow-pickle, no file, or no NVlabs/edm checkout."""
    if not allow_pickle:
        raise CheckpointError(
            f"--edm-pickle: unpickling {path} runs code from that file; pass "
            "--allow-pickle if you trust it"
        )
    if not os.path.isfile(path):
        raise CheckpointError(f"--edm-pickle: {path} not found")
    if not edm_code:
        raise CheckpointError(f"--edm-pickle needs --edm-code, an NVlabs/edm checkout ({EDM_URL})")
    if not all(os.path.isdir(os.path.join(edm_code, d)) for d in ("dnnlib", "torch_utils")):
        raise CheckpointError(
            f"--edm-code {edm_code!r} is not an NVlabs/edm checkout (no dnnlib/ "
            f"and torch_utils/); clone {EDM_URL} and pass its path"
        )


def edm_teacher(path, edm_code, allow_pickle, cfg):
    """The teacher checkpoint of an NVlabs/edm network pickle (its ``ema`` network)."""
    check_edm_inputs(path, edm_code, allow_pickle)
    root = os.path.abspath(edm_code)
    sys.path.insert(0, root)
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)  # runs code from the file: allowed by the caller
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"--edm-pickle: cannot unpickle {path} ({type(e).__name__}: {first})"
        ) from None
    finally:
        sys.path.remove(root)
    net = data.get("ema") if isinstance(data, dict) else data
    if type(net).__name__ != "EDMPrecond":
        raise CheckpointError(
            f"--edm-pickle: the network is a {type(net).__name__}, not an "
            "EDMPrecond (the only preconditioning with c_noise = ln(sigma)/4)"
        )
    model = getattr(net, "model", None)
    if type(model).__name__ != "SongUNet" or not hasattr(model, "init_kwargs"):
        raise CheckpointError(
            f"--edm-pickle: the backbone is a {type(model).__name__}; only "
            "SongUNet (DDPM++/NCSN++) converts; for ImageNet 64 use --openai"
        )
    _check_sigma_data(cfg, float(net.sigma_data), f"--edm-pickle {path}")
    net_cfg, state = songunet_from_edm(dict(model.init_kwargs), model.state_dict())
    source = {
        "file": os.path.abspath(path),
        "sha256": _sha256(path),
        "format": "NVlabs/edm network pickle (ema)",
    }
    return teacher_payload(net_cfg, state, cfg, source)


def adopt_teacher(cfg, data_path, out_path, source, log_path, loss_plot):
    """Make a converted teacher (``cm convert``) this run's teacher: check that it is a denoiser
    with the config's network, then write it to ``out_path``, an empty training log and a loss
    plot that says so."""
    from cmcore.data import to_model_space
    from cmcore.evaluation.reports import plot_note
    from cmcore.models import network_config
    from cmcore.prepared import PreparedFile
    from cmcore.training.checkpoints import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(source)
    first = to_model_space(PreparedFile(data_path).rows([0]))  # one row gives the shape
    expected = network_config(cfg["network"], first.shape)
    if ckpt.get("kind") != "denoiser" or ckpt.get("net") != expected:
        raise CheckpointError(
            f"teacher.pretrained: {source} holds a {ckpt.get('kind')} with network "
            f"{ckpt.get('net')}; this config's teacher is a denoiser with {expected}")
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    save_checkpoint(out_path, {**ckpt, "pretrained_from": source})
    with open(log_path, "w") as f:
        f.write("stage,step,loss\n")  # no training step was taken here
    plot_note(loss_plot, f"pretrained teacher from {os.path.basename(source)}: not trained here")
