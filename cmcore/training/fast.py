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
                        any device; false: torch's per-parameter arithmetic, as its loop on CPU
                        computes it, issued through _foreach_ ops (ExactAdam, ExactRAdam)
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
    cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[name] if use else \
        {"adam": ExactAdam, "radam": ExactRAdam}[name]
    return cls(params, lr=opt["lr"], **kwargs)


class _ForeachLoop:
    """torch's single-tensor Adam / RAdam step (its default on CPU), op for op and scalar for
    scalar, issued as _foreach_ ops over all parameters: on CPU a _foreach_ op runs the same
    kernel on each tensor, so the parameters are bitwise those of torch's loop, without its
    Python overhead per parameter (tests/test_fast_step.py). Defaults only: no weight decay,
    amsgrad, maximize, capturable or differentiable; the state is torch's (step, exp_avg,
    exp_avg_sq), so state dicts and resume files are those of torch's optimizer."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            p_, g_, m_, v_, s_ = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # as torch's _init_group on CPU
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                p_.append(p)
                g_.append(p.grad)
                s_.append(state["step"])
                m_.append(state["exp_avg"])
                v_.append(state["exp_avg_sq"])
            if not p_:
                continue
            # m <- lerp(m, g, 1 - beta1); v <- beta2 v + (1 - beta2) g^2; k <- k + 1
            beta1, beta2 = group["betas"]
            torch._foreach_add_(s_, 1)
            torch._foreach_lerp_(m_, g_, 1 - beta1)
            torch._foreach_mul_(v_, beta2)
            torch._foreach_addcmul_(v_, g_, g_, value=1 - beta2)
            by_step = {}
            for i, k in enumerate(s_):
                by_step.setdefault(k.item(), []).append(i)
            for k, idx in by_step.items():
                self._update([p_[i] for i in idx], [m_[i] for i in idx], [v_[i] for i in idx], k,
                             beta1, beta2, group["lr"], group["eps"])

    def _check_defaults(self):
        for group in self.param_groups:
            bad = [key for key in ("weight_decay", "amsgrad", "maximize", "capturable",
                                   "differentiable", "decoupled_weight_decay") if group.get(key)]
            if bad or torch.is_tensor(group["lr"]):
                raise ValueError(f"{type(self).__name__} supports the default options only")


class ExactAdam(_ForeachLoop, torch.optim.Adam):
    """Adam (Kingma & Ba): p <- p - lr / (1 - beta1^k) m / (sqrt(v) / sqrt(1 - beta2^k) + eps)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self._check_defaults()

    def _update(self, p_, m_, v_, k, beta1, beta2, lr, eps):
        bias_correction1, bias_correction2 = 1 - beta1**k, 1 - beta2**k
        denom = torch._foreach_sqrt(v_)
        torch._foreach_div_(denom, bias_correction2**0.5)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p_, m_, denom, value=-(lr / bias_correction1))


class ExactRAdam(_ForeachLoop, torch.optim.RAdam):
    """RAdam (Liu et al.): Adam's step times the variance rectification r_k once the
    approximated SMA rho_k exceeds 5, else the bias-corrected momentum step."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self._check_defaults()

    def _update(self, p_, m_, v_, k, beta1, beta2, lr, eps):
        bias_correction1, bias_correction2 = 1 - beta1**k, 1 - beta2**k
        update = torch._foreach_div(m_, bias_correction1)
        rho_inf = 2 / (1 - beta2) - 1
        rho_k = rho_inf - 2 * k * (beta2**k) / bias_correction2
        torch._foreach_mul_(update, lr)
        if rho_k > 5.0:
            rect = ((rho_k - 4) * (rho_k - 2) * rho_inf
                    / ((rho_inf - 4) * (rho_inf - 2) * rho_k)) ** 0.5
            adaptive = torch._foreach_sqrt(v_)
            torch._foreach_add_(adaptive, eps)
            adaptive = torch._foreach_reciprocal(adaptive)  # float / tensor, as torch's loop
            torch._foreach_mul_(adaptive, bias_correction2**0.5)
            torch._foreach_mul_(update, adaptive)
            torch._foreach_mul_(update, rect)
        torch._foreach_add_(p_, update, alpha=-1.0)


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
