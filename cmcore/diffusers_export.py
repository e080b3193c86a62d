"""A consistency model on the ADM U-Net as a folder diffusers' ``ConsistencyModelPipeline`` loads.

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(x / sqrt(sigma^2 + sd^2), 250 ln sigma)
    c_skip = sd^2 / ((sigma - eps)^2 + sd^2),  c_out = (sigma - eps) sd / sqrt(sigma^2 + sd^2)

is what diffusers' ``CMStochasticIterativeScheduler`` computes around its ``UNet2DModel``
(``scale_model_input``, ``sigma_to_t``, ``get_scalings_for_boundary_condition``), and what
``cmcore.diffusion.precond.ConsistencyFunction`` computes around ``cmcore.networks.adm.ADMUNet``
(which embeds 1000 c_noise = 250 ln sigma, as openai's code does). So the export is a renaming of
the backbone's weights; nothing is refitted. Written without diffusers installed:

    model_index.json                        ConsistencyModelPipeline = unet + scheduler
    unet/config.json                        UNet2DModel's arguments for this ADM
    unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json         sigma_min = eps, sigma_max = T, sigma_data, rho;
                                            clip_denoised off, as ``cm sample`` does not clip

The ADM -> UNet2DModel correspondence (openai's ``UNetModel`` names on the left):

    time_embed.{0,2} -> time_embedding.linear_{1,2}     label_emb -> class_embedding
    input_blocks.0.0 -> conv_in                         out.{0,2} -> conv_norm_out, conv_out
    level i, block b -> down_blocks.i.{resnets,attentions}.b; its resampler -> downsamplers.0
    middle_block.{0,1,2} -> mid_block.resnets.0, mid_block.attentions.0, mid_block.resnets.1
    decoder level u (deepest first) -> up_blocks.u.{resnets,attentions}.b, upsamplers.0
    ResBlock: in_layers.{0,2} -> norm1, conv1; emb_layers.1 -> time_emb_proj;
              out_layers.{0,3} -> norm2, conv2; skip_connection -> conv_shortcut
    Attention: norm -> group_norm; qkv (3C x C 1x1 conv, rows (3, heads, d)) -> to_q, to_k, to_v
               (C x C linear each); proj_out -> to_out.0

Only sampling differs in what a user picks: diffusers' multistep ``timesteps=[i, 0]`` re-noise to
sigma_i = (T^(1/rho) + i / (N - 1) (eps^(1/rho) - T^(1/rho)))^rho of an N-point Karras grid
(``num_train_timesteps``), where ``cm sample`` takes any tau.
"""

import inspect
import json
import os

from cmcore.files import atomic
from cmcore.networks.adm import ADMUNet

DIFFUSERS_VERSION = "0.42.1"  # the release the export was checked against (tests/test_export.py)
GRID_POINTS = 40  # num_train_timesteps of the scheduler: openai's ImageNet 64 grid


class NotExportable(ValueError):
    """A checkpoint diffusers' consistency pipeline cannot represent; the message says why."""


def adm_arguments(net):
    """ADMUNet's constructor arguments of a checkpoint's ``net`` with the defaults filled in."""
    params = inspect.signature(ADMUNet.__init__).parameters
    args = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    args.update({k: v for k, v in net.items() if k != "arch"})
    args["out_channels"] = args["out_channels"] or args["in_channels"]
    return args


def _attention_levels(a):
    """Per encoder level: does it attend (its resolution is in attn_resolutions)?"""
    return [a["img_resolution"] // 2**i in set(a["attn_resolutions"])
            for i in range(len(a["channel_mult"]))]


def unet_config(net):
    """UNet2DModel's config for the ADM ``net`` (NotExportable where diffusers differs)."""
    a = adm_arguments(net)
    if a["channel_mult"][0] != 1:
        raise NotExportable("diffusers embeds the time in block_out_channels[0] channels and "
                            "ADM in model_channels: channel_mult[0] must be 1")
    attend, updown = _attention_levels(a), a["resblock_updown"]
    plain_down, plain_up = (("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if updown
                            else ("DownBlock2D", "UpBlock2D"))
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": a["img_resolution"], "in_channels": a["in_channels"],
        "out_channels": a["out_channels"], "layers_per_block": a["num_blocks"],
        "block_out_channels": [a["model_channels"] * m for m in a["channel_mult"]],
        "down_block_types": ["AttnDownBlock2D" if x else plain_down for x in attend],
        "up_block_types": ["AttnUpBlock2D" if x else plain_up for x in reversed(attend)],
        "downsample_type": "resnet" if updown else "conv",
        "upsample_type": "resnet" if updown else "conv",
        "attention_head_dim": a["num_head_channels"], "attn_norm_num_groups": 32,
        "norm_num_groups": 32, "norm_eps": 1e-5, "dropout": a["dropout"],
        "resnet_time_scale_shift": "scale_shift" if a["use_scale_shift_norm"] else "default",
        "num_class_embeds": a["label_dim"] or None, "time_embedding_type": "positional",
        "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False,
    }


def _resblock(src, dst):
    names = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
    return [(f"{src}.{a}.{p}", f"{dst}.{b}.{p}") for a, b in names.items()
            for p in ("weight", "bias")]


def _resampler(src, dst, updown):
    """A level's down/up resampler: a ResBlock, or openai's op / conv layer."""
    if updown:
        return _resblock(src, dst)
    layer = "op" if src.startswith("input_blocks") else "conv"
    return [(f"{src}.{layer}.{p}", f"{dst}.conv.{p}") for p in ("weight", "bias")]


def key_pairs(net):
    """(ADM name, UNet2DModel name) of every parameter, attention qkv whole (split later)."""
    a = adm_arguments(net)
    attend, n, updown = _attention_levels(a), a["num_blocks"], a["resblock_updown"]
    pairs = [("time_embed.0", "time_embedding.linear_1"), ("input_blocks.0.0", "conv_in"),
             ("time_embed.2", "time_embedding.linear_2"), ("out.0", "conv_norm_out"),
             ("out.2", "conv_out")]
    pairs = [(f"{s}.{p}", f"{d}.{p}") for s, d in pairs for p in ("weight", "bias")]
    if a["label_dim"]:
        pairs.append(("label_emb.weight", "class_embedding.weight"))
    attention = []  # (ADM prefix, diffusers prefix)
    j = 1  # encoder: input_blocks.j per block, then the level's downsampler
    for i, att in enumerate(attend):
        for b in range(n):
            pairs += _resblock(f"input_blocks.{j}.0", f"down_blocks.{i}.resnets.{b}")
            if att:
                attention.append((f"input_blocks.{j}.1", f"down_blocks.{i}.attentions.{b}"))
            j += 1
        if i < len(attend) - 1:
            pairs += _resampler(f"input_blocks.{j}.0", f"down_blocks.{i}.downsamplers.0", updown)
            j += 1
    pairs += _resblock("middle_block.0", "mid_block.resnets.0")
    pairs += _resblock("middle_block.2", "mid_block.resnets.1")
    attention.append(("middle_block.1", "mid_block.attentions.0"))
    j = 0  # decoder: output_blocks.j, deepest level first, n + 1 blocks each
    for u, att in enumerate(reversed(attend)):
        for b in range(n + 1):
            pairs += _resblock(f"output_blocks.{j}.0", f"up_blocks.{u}.resnets.{b}")
            if att:
                attention.append((f"output_blocks.{j}.1", f"up_blocks.{u}.attentions.{b}"))
            if b == n and u < len(attend) - 1:
                pairs += _resampler(f"output_blocks.{j}.{1 + att}", f"up_blocks.{u}.upsamplers.0",
                                    updown)
            j += 1
    for s, d in attention:
        pairs += [(f"{s}.norm.{p}", f"{d}.group_norm.{p}") for p in ("weight", "bias")]
        pairs += [(f"{s}.qkv.{p}", f"{d}.to_qkv.{p}") for p in ("weight", "bias")]
        pairs += [(f"{s}.proj_out.{p}", f"{d}.to_out.0.{p}") for p in ("weight", "bias")]
    return pairs


def unet_state_dict(backbone, net):
    """UNet2DModel's state dict from the ADM backbone's (``F``: keys without ``model.``)."""
    out, pairs = {}, key_pairs(net)
    for src, dst in pairs:
        if src not in backbone:  # ResBlocks without a skip conv, the bias-free cases
            continue
        w = backbone[src].detach().float()
        if ".to_qkv." in dst:  # rows (3, heads, d): q, k, v, each a C x C linear
            for name, part in zip(("to_q", "to_k", "to_v"), w.chunk(3, dim=0), strict=True):
                out[dst.replace("to_qkv", name)] = part.flatten(1).contiguous() if part.ndim > 1 \
                    else part.contiguous()
        elif ".to_out.0.weight" in dst:
            out[dst] = w.flatten(1).contiguous()
        else:
            out[dst] = w.contiguous()
    missing = sorted(set(backbone) - {s for s, _ in pairs})
    if missing:
        raise NotExportable(f"ADM weights with no diffusers counterpart: {missing[:3]}")
    return out


def scheduler_config(diffusion):
    """CMStochasticIterativeScheduler's config: the checkpoint's diffusion settings."""
    return {"_class_name": "CMStochasticIterativeScheduler", "_diffusers_version":
            DIFFUSERS_VERSION, "num_train_timesteps": GRID_POINTS,
            "sigma_min": diffusion["sigma_min"], "sigma_max": diffusion["sigma_max"],
            "sigma_data": diffusion["sigma_data"], "rho": diffusion["rho"], "s_noise": 1.0,
            "clip_denoised": False}


def exportable(ckpt):
    """None if ``ckpt`` exports to diffusers, else the reason it does not."""
    if ckpt["net"].get("arch") != "adm":
        return f"network {ckpt['net'].get('arch')!r}: diffusers' UNet2DModel mirrors ADM only"
    if ckpt["kind"] != "consistency":
        return (f"a {ckpt['kind']} model: diffusers' consistency scheduler applies the "
                "consistency boundary scalings (c_skip, c_out with f(x, eps) = x)")
    try:
        unet_config(ckpt["net"])
    except NotExportable as e:
        return str(e)
    return None


def export_diffusers(ckpt, folder):
    """Write ``ckpt``'s EMA consistency model into ``folder`` as a ConsistencyModelPipeline."""
    from safetensors.torch import save_file

    reason = exportable(ckpt)
    if reason:
        raise NotExportable(f"no diffusers export: {reason}")
    backbone = {k.removeprefix("model."): v for k, v in ckpt["ema"].items()
                if k.startswith("model.")}
    files = {
        "model_index.json": {"_class_name": "ConsistencyModelPipeline",
                             "_diffusers_version": DIFFUSERS_VERSION,
                             "scheduler": ["diffusers", "CMStochasticIterativeScheduler"],
                             "unet": ["diffusers", "UNet2DModel"]},
        "unet/config.json": unet_config(ckpt["net"]),
        "scheduler/scheduler_config.json": scheduler_config(ckpt["config"]["diffusion"]),
    }
    for name, content in files.items():
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic(path, ".json") as tmp, open(tmp, "w") as f:
            json.dump(content, f, indent=1, sort_keys=True)
    path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    with atomic(path, ".safetensors") as tmp:
        save_file(unet_state_dict(backbone, ckpt["net"]), tmp, metadata={"format": "pt"})
    return folder
