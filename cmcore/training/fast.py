"""The fast-step options of cmcore.training.fit, one set per method ($defs/training):

    option     default  what it does
    precision  fp32     bf16: torch.autocast(device, bfloat16) around loss_fn(k) only (the
                        online, teacher and target forwards); the loss is cast back to fp32, and
                        backward into fp32 parameters, optimizer, EMA and target updates stay
                        fp32 (no loss scaling: bf16 has fp32's exponent range)
    tf32       true     CUDA only: TF32 matmuls and convolutions (torch.backends.cuda.matmul
                        and cudnn allow_tf32) while fit runs, the previous flags restored after
    fused      auto     Adam: fused=True (one kernel for all parameters); RAdam, which has no
                        fused kernel in torch 2.14: foreach=True. auto: on CUDA only; true: on
                        any device; false: torch's default (foreach on CUDA, a loop on CPU)
    compile    false    experimental: torch.compile of the online network, in place
                        (nn.Module.compile), for the steps of fit; the evaluation EMA, the target
                        network theta^- and the teacher stay eager

The defaults leave a CPU run bitwise what it was before these options existed (fused auto and
tf32 do nothing on CPU). On CPU, fused=true gives the parameters of fused=false within 1e-6,
not bitwise (the fused Adam kernel rounds in another order); tests/test_fast_step.py.
"""

import contextlib

import torch


def optimizer(params, opt, device):
    """The optimizer ``opt['optimizer']`` (adam or radam) at ``opt['lr']`` over ``params``."""
    name, fused = opt["optimizer"], opt.get("fused", "auto")
    use = torch.device(device).type == "cuda" if fused == "auto" else fused is True
    kwargs = {}
    if use:  # RAdam: torch 2.14 has no fused kernel; foreach (a few kernels per step) instead
        kwargs = {"fused": True} if name == "adam" else {"foreach": True}
    cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[name]
    return cls(params, lr=opt["lr"], **kwargs)


def autocast(opt, device):
    """bf16 autocast on ``device`` for precision bf16; nothing at all for fp32."""
    if opt.get("precision", "fp32") == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


@contextlib.contextmanager
def tf32(opt, device):
    """TF32 matmuls and convolutions on CUDA as ``opt['tf32']`` says; the flags restored after."""
    if torch.device(device).type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    before = [f.allow_tf32 for f in flags]
    for f in flags:
        f.allow_tf32 = bool(opt.get("tf32", True))
    try:
        yield
    finally:
        for f, value in zip(flags, before, strict=True):
            f.allow_tf32 = value


@contextlib.contextmanager
def compiled(model, opt):
    """``model`` compiled in place (its forward through torch.compile, its parameters, state
    dict and copies untouched) for ``opt['compile']``; made eager again on exit."""
    if not opt.get("compile", False):
        yield
        return
    model.compile()
    try:
        yield
    finally:
        model._compiled_call_impl = None  # what nn.Module.compile set; None: eager again
