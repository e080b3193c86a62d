"""The fast-step options of cmcore.training.fit, one set per method ($defs/training):

    option     default  what it does
    precision  fp32     bf16: torch.autocast(device, bfloat16) around loss_fn(k, rng) only (the
                        online, teacher and target forwards); the loss is cast back to fp32, and
                        backward into fp32 parameters, optimizer, EMA and target updates stay
                        fp32 (no loss scaling: bf16 has fp32's exponent range)
    tf32       true     CUDA only: TF32 matmuls and convolutions (torch.backends.cuda.matmul
                        and cudnn allow_tf32) while fit runs, the previous flags restored after
    fused      auto     Adam: fused=True (one kernel for all parameters); RAdam, which has no
                        fused kernel in torch 2.14: foreach=True. auto: on CUDA only; true: on
                        any device; false: torch's per-parameter arithmetic, as its loop on CPU
                        computes it, on flat moment buffers (ExactAdam, ExactRAdam)
    compile    false    experimental: torch.compile of the online network, in place
                        (nn.Module.compile), for the steps of fit; the evaluation EMA, the target
                        network theta^- and the teacher stay eager

The defaults leave a CPU run bitwise what it was before these options existed (fused auto and
tf32 do nothing on CPU). On CPU, fused=true gives the parameters of fused=false within 1e-6,
not bitwise (the fused Adam kernel rounds in another order); tests/test_fast_step.py.
"""

import contextlib

import torch

from cmcore.training.flat import Flat, dense, memory_order, pieces


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


class _FlatLoop:
    """torch's single-tensor Adam / RAdam step (its default on CPU), op for op and scalar for
    scalar, over all parameters at once: the moments exp_avg and exp_avg_sq of the parameters
    stepped together live in one flat buffer each (the state's tensors are views of it, strided
    as their parameters, cmcore.training.flat), so each moment update is one op on one tensor,
    and so is the parameter update where the parameters are views of one buffer themselves
    (TrainStep flattens them); else it is one _foreach_ op. An elementwise op computes each
    element alike wherever it sits, so the parameters are bitwise those of torch's loop
    (tests/test_fast_step.py) at a fraction of its per-parameter cost. Defaults only: no weight
    decay, amsgrad, maximize, capturable or differentiable; the state is torch's (a step-count
    tensor per parameter, exp_avg, exp_avg_sq), so state dicts and resume files are those of
    torch's optimizer (a loaded state is gathered into new buffers at the next step, as after
    the parameters changed layout)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self._check_defaults()
        self._flat_cache = {}  # parameter ids -> (flat m, flat v, m views, v views, layout)
        self._param_flats = {}  # parameter ids -> their Flat (not moved: TrainStep does)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            stepped = [p for p in group["params"] if p.grad is not None]
            for p in stepped:
                state = self.state[p]
                if not state:  # as torch's _init_group on CPU
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if not stepped:
                continue
            # k <- k + 1; parameters with the same step count k share one flat update.
            steps = [self.state[p]["step"] for p in stepped]
            torch._foreach_add_(steps, 1)
            by_step = {}
            for p, k in zip(stepped, steps, strict=True):
                by_step.setdefault(k.item(), []).append(p)
            beta1, beta2 = group["betas"]
            for k, params in by_step.items():
                flat = self._flat_of(params)
                buffer = flat.buffer  # first: after a move it looks again, layout included
                m, v = self._flat(params, flat.layout)
                g = torch.cat([_memory_order_like(p.grad, p) for p in params])
                # m <- lerp(m, g, 1 - beta1); v <- beta2 v + (1 - beta2) g^2
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2)
                v.addcmul_(g, g, value=1 - beta2)
                self._update(params, buffer, m, v, k, beta1, beta2, group["lr"],
                             group["eps"])

    def _flat(self, params, layout):
        """(flat exp_avg, flat exp_avg_sq) of ``params``, each parameter's part in its memory
        order: the buffers made once per set of parameters, again after the state's tensors
        were replaced (a load) or the parameters' ``layout`` changed (module.to)."""
        key = tuple(map(id, params))
        entry = self._flat_cache.get(key)
        if entry is None or entry[4] is not layout or any(
                self.state[p]["exp_avg"] is not a or self.state[p]["exp_avg_sq"] is not b
                for p, a, b in zip(params, *entry[2:4], strict=True)):
            flat = []
            for name in ("exp_avg", "exp_avg_sq"):
                buffer = torch.cat([_memory_order_like(self.state[p][name], p) for p in params])
                views = pieces(buffer, params)
                for p, view in zip(params, views, strict=True):
                    self.state[p][name] = view
                flat.append((buffer, views))
            (m, m_views), (v, v_views) = flat
            entry = self._flat_cache[key] = (m, v, m_views, v_views, layout)
        return entry[:2]

    def _flat_of(self, params):
        """The Flat of ``params`` (cmcore.training.flat): their shared buffer, if any."""
        key = tuple(map(id, params))
        if key not in self._param_flats:
            self._param_flats[key] = Flat(params, move=False)
        return self._param_flats[key]

    def _check_defaults(self):
        for group in self.param_groups:
            bad = [key for key in ("weight_decay", "amsgrad", "maximize", "capturable",
                                   "differentiable", "decoupled_weight_decay") if group.get(key)]
            if bad or torch.is_tensor(group["lr"]):
                raise ValueError(f"{type(self).__name__} supports the default options only")
            if not all(dense(p) for p in group["params"]):  # a module's are; flat views need it
                raise ValueError(f"{type(self).__name__} needs dense parameters")


def _memory_order_like(t, p):
    """``t`` (shaped as parameter ``p``) as a 1-D tensor in ``p``'s memory order: a view when
    ``t`` is strided as ``p`` (gradients are: autograd's layout contract), else a copy."""
    if t.stride() != p.stride():
        t = torch.empty_strided(p.shape, p.stride(), dtype=t.dtype, device=t.device).copy_(t)
    return memory_order(t)


class ExactAdam(_FlatLoop, torch.optim.Adam):
    """Adam (Kingma & Ba): p <- p - lr / (1 - beta1^k) m / (sqrt(v) / sqrt(1 - beta2^k) + eps)."""

    def _update(self, params, buffer, m, v, k, beta1, beta2, lr, eps):
        bias_correction1, bias_correction2 = 1 - beta1**k, 1 - beta2**k
        denom = v.sqrt()
        denom.div_(bias_correction2**0.5)
        denom.add_(eps)
        step_size = lr / bias_correction1
        if buffer is not None:  # one op on the parameters' buffer, else one _foreach_ op
            buffer.addcdiv_(m, denom, value=-step_size)
        else:
            torch._foreach_addcdiv_(params, pieces(m, params), pieces(denom, params),
                                    value=-step_size)


class ExactRAdam(_FlatLoop, torch.optim.RAdam):
    """RAdam (Liu et al.): Adam's step times the variance rectification r_k once the
    approximated SMA rho_k exceeds 5, else the bias-corrected momentum step."""

    def _update(self, params, buffer, m, v, k, beta1, beta2, lr, eps):
        bias_correction1, bias_correction2 = 1 - beta1**k, 1 - beta2**k
        update = m / bias_correction1
        rho_inf = 2 / (1 - beta2) - 1
        rho_k = rho_inf - 2 * k * (beta2**k) / bias_correction2
        update.mul_(lr)
        if rho_k > 5.0:
            rect = ((rho_k - 4) * (rho_k - 2) * rho_inf
                    / ((rho_inf - 4) * (rho_inf - 2) * rho_k)) ** 0.5
            adaptive = v.sqrt()
            adaptive.add_(eps)
            adaptive = adaptive.reciprocal()  # float / tensor, as torch's loop
            adaptive.mul_(bias_correction2**0.5)
            update.mul_(adaptive)
            update.mul_(rect)
        if buffer is not None:  # one op on the parameters' buffer, else one _foreach_ op
            buffer.add_(update, alpha=-1.0)
        else:
            torch._foreach_add_(params, pieces(update, params), alpha=-1.0)


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
