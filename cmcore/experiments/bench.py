"""Throughput (images/s, ms per step), achieved TFLOP/s and peak memory of every pipeline step.

Figures, each timed on one batch of random data with a freshly initialised network:
    teacher_step      EDM loss: 1 fwd+bwd, then the updates (optimizer step, EMA)
    cd_step_l2        CD, l2: teacher solver step (Heun: 2 fwd), target fwd, 1 fwd+bwd, updates
    cd_step_lpips     the same with LPIPS (inputs resized to 224 px); only with ``lpips=True``
    ct_step           CT: target fwd, 1 fwd+bwd, updates (optimizer step, target, EMA)
    pd_step           PD, first stage: 2 teacher DDIM fwd, student fwd+bwd, updates
    sample_1step      consistency sampling, 1 NFE;  sample_2step: 2 NFE (Algorithm 1)
    sample_heun18     the teacher's EDM Heun sampler, 18 steps = 35 NFE
    fid_features      the FID feature extractor on uint8 images (digits classifier, or Inception)
The training figures time the step training runs: the method's loss as cmcore.training.loop
builds it (cmcore.methods.registry; PD's stage loss) in a cmcore.training.step.TrainStep, with
the method's config section at the bench's batch; ``bf16``, ``tf32`` and ``compile`` set its
fast options (cmcore.training.fast). With an NVlabs/edm checkout, their SongUNet built from the
same arguments is timed interleaved with ours (teacher step, one forward), and the ratio printed.

Timing: warm-up steps excluded; every timed step ends with a device synchronisation; the median
of ``repeats`` is reported. FLOPs are counted once per figure with torch's FlopCounterMode
(2 FLOPs per multiply-add; matmuls, convolutions and attention only, so optimizer and
elementwise work are not counted). Peak memory is torch.cuda.max_memory_allocated per figure on
GPU, and the process's maximum resident set size (getrusage; monotonic) on CPU. The data batch
and sampling noise come from generators seeded with the config's seed, the initialisations and
the losses' draws from torch's global generator, seeded inside ``run_bench`` and then restored.
"""

import contextlib
import copy
import gc
import importlib.util
import itertools
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import NamedTuple

import torch

from cmcore import dag
from cmcore.diffusion.precond import Denoiser, one_hot
from cmcore.diffusion.solvers import edm_sampler
from cmcore.methods import registry
from cmcore.methods.objectives import progressive_distillation_loss
from cmcore.models import for_training, init_from_teacher, make_model
from cmcore.networks import ARCHS, build_network
from cmcore.sampling.samplers import consistency_sample
from cmcore.training import fast
from cmcore.training.compute import count_flops
from cmcore.training.step import TrainStep, target_update

# Backbone arguments and default batch of each named benchmark network (arch "ddpmpp").
NETS = {
    # The embedded default (config/config.yaml) on the 8x8x1 digits.
    "embedded": dict(batch=128, net=dict(
        arch="ddpmpp", img_resolution=8, in_channels=1, model_channels=16, channel_mult=[1, 2, 2],
        num_blocks=1, attn_resolutions=[4], dropout=0.0)),
    # NVlabs/edm's CIFAR-10 DDPM++ config: 55.7M parameters, 42.4 GFLOP per forward image
    # (tests/test_bench.py counts it).
    "cifar10": dict(batch=512, net=dict(
        arch="ddpmpp", img_resolution=32, in_channels=3, model_channels=128,
        channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13)),
    # config/imagenet64.yaml: openai's class-conditional ADM U-Net, 295.9M parameters; each
    # training step draws class labels with its images.
    "imagenet64": dict(batch=256, net=dict(
        arch="adm", img_resolution=64, in_channels=3, label_dim=1000, model_channels=192,
        channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8],
        num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True, dropout=0.1)),
}
FIGURES = ("teacher_step", "cd_step_l2", "cd_step_lpips", "ct_step", "pd_step", "sample_1step",
           "sample_2step", "sample_heun18", "fid_features")
# Dense peak TFLOP/s (NVIDIA data sheets; sparse figures halved), matched by device name in
# this order, so the PCIe / NVL variants are tried before the SXM parts.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
)


class Figure(NamedTuple):
    """One timed step: fn() runs it; ``during`` enters what the timed calls run inside (the fast
    options of training: TF32 flags, torch.compile), after the FLOPs are counted eagerly."""

    fn: object
    nfe: int  # network evaluations per image
    detail: str
    during: object = contextlib.nullcontext


def peak_tflops(device_name, precision):
    """Dense peak TFLOP/s of a known GPU at precision 'bf16', 'tf32' or 'fp32'; else None."""
    return next((p.get(precision) for k, p in PEAK_TFLOPS if k in (device_name or "")), None)


def time_steps(fns, repeats, warmup, sync):
    """Seconds per call of each fn: ``warmup`` untimed calls, then ``repeats`` timed calls, the
    fns interleaved so that load changes on a shared machine hit all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            sync()
            t.append(time.perf_counter() - start)
    return times


def load_edm_songunet(path):
    """NVlabs/edm's ``SongUNet`` class, imported by path from a checkout at run time."""
    path = os.path.abspath(path)
    source = os.path.join(path, "training", "networks.py")
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source} not found: --reference-edm must be an NVlabs/edm "
                                "checkout (git clone https://github.com/NVlabs/edm)")
    if path not in sys.path:  # their persistence decorator imports dnnlib and torch_utils
        sys.path.insert(0, path)
    name = "_cm_bench_edm_networks"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, source)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # persistent_class asserts its module is registered
        spec.loader.exec_module(module)
    return sys.modules[name].SongUNet


class Bench:
    """One benchmark session: the network, the device and the options shared by all figures."""

    def __init__(self, cfg, net="embedded", batch=None, device="auto", repeats=None, warmup=None,
                 bf16=None, tf32=None, compile=False, echo=print, out=None, batch_gpu=None):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
        self.device, self.cuda = torch.device(device), device.startswith("cuda")
        self.net_name, self.net_cfg = net, dict(NETS[net]["net"])
        self.batch, self.batch_gpu = batch or NETS[net]["batch"], batch_gpu
        self.repeats = repeats or (20 if self.cuda else 5)
        self.warmup = warmup if warmup is not None else (3 if self.cuda else 1)
        self.bf16, self.tf32 = (self.cuda if v is None else v for v in (bf16, tf32))
        self.compile = compile  # sync: ends every timed step
        self.sync = (lambda: torch.cuda.synchronize(self.device)) if self.cuda else (lambda: None)
        self.cfg, self.d, self.seed = cfg, cfg["diffusion"], cfg["seed"]
        self.grid = dict(eps=self.d["sigma_min"], T=self.d["sigma_max"], rho=self.d["rho"])
        self.taus = cfg["sampling"]["tau"].get("2", [0.8])
        self.echo, self.out, self.records = echo, out, []
        if self.cuda:  # for the sampling figures; the training steps set it as training does
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
        self.device_name = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        self.precision = "bf16" if self.bf16 else ("tf32" if self.tf32 and self.cuda else "fp32")
        shape = (self.batch, self.net_cfg["in_channels"]) + (self.net_cfg["img_resolution"],) * 2
        gen = torch.Generator().manual_seed(self.seed)
        self.x0 = (torch.rand(shape, generator=gen) * 2 - 1).to(self.device)
        label_dim = self.net_cfg.get("label_dim", 0)  # class-conditional: labels i mod K
        self.y0 = one_hot(torch.arange(self.batch, device=self.device) % label_dim, label_dim) \
            if label_dim else None

    def backbone(self, cls=None):
        """Our SongUNet from net_cfg, or ``cls`` (EDM's SongUNet) with the same arguments."""
        if cls is None:
            return build_network(self.net_cfg)
        kwargs = {**ARCHS[self.net_cfg["arch"]][1], **self.net_cfg}
        kwargs.pop("arch")
        return cls(out_channels=kwargs["in_channels"], **kwargs)

    def model(self, kind, backbone=None):
        """A fresh D or f (``kind``) as training makes it, or D around ``backbone``."""
        if backbone is None:
            return for_training(make_model(self.net_cfg, kind, self.d).to(self.device),
                                self.device)
        return Denoiser(backbone, self.d["sigma_data"]).to(self.device)

    def options(self, method):
        """The method's config section at the bench's batch, precision, tf32 and compile."""
        return {**self.cfg[method], "batch": self.batch, "batch_gpu": self.batch_gpu,
                "tf32": self.tf32, "precision": "bf16" if self.bf16 else "fp32",
                "compile": self.compile}

    def training(self, method, distance=None, backbone=None):
        """One training step of ``method`` (teacher, cd, ct or pd) as cmcore.training.loop runs
        it: its loss built as training builds it, stepped by TrainStep with its config section.
        Each call is the next step k. ``backbone``: the teacher's network (EDM comparison)."""
        opt, sd, teacher, after = self.options(method), self.d["sigma_data"], None, None

        def batch(rng):  # training draws the step's data points; here the one random batch
            x = self.x0[rng.rows]
            return x if self.y0 is None else (x, self.y0[rng.rows])

        if method in dag.NEEDS_TEACHER:
            teacher = self.model("denoiser").eval().requires_grad_(False)
        if method == "pd":  # the first stage's loss, as _train_pd builds it
            steps = opt["start_steps"] // 2
            model = copy.deepcopy(teacher).train().requires_grad_(True)

            context = registry.Context(model, None, teacher, batch, self.grid, None, sd)

            def loss_fn(k, rng):  # as _train_pd's: the labelled networks from Context.draw
                x, student, _, D = context.draw(rng)
                return progressive_distillation_loss(student, D, x, steps, sd, **self.grid,
                                                     rng=rng), {"steps": steps}
            nfe, detail = 3, f"{steps}-step student: 2 teacher DDIM fwd + 1 fwd/bwd"
        else:
            spec = registry.METHODS[method]
            model = self.model(spec.kind, backbone)
            if spec.from_teacher:
                init_from_teacher(model, teacher)
            target = None
            if spec.target:
                target = copy.deepcopy(model).train().requires_grad_(False)  # dropout replay
                after = target_update(target, model)
            context = registry.Context(model, target, teacher, batch, self.grid, distance, sd)
            loss_fn = spec.build(opt, context)
            if method == "cd":
                nfe = 3 + (opt["solver"] == "heun")
                detail = f"{opt['solver']} N={opt['N']}: teacher step + target fwd + 1 fwd/bwd"
            else:
                nfe, detail = (1, "EDM loss") if method == "teacher" else \
                    (2, f"{opt['curriculum']} curriculum: target fwd + 1 fwd/bwd")
        step, ks = TrainStep(model, loss_fn, opt, after, seed=self.seed), itertools.count()

        @contextlib.contextmanager
        def during():
            with fast.tf32(opt, self.device), fast.compiled(model, opt):
                yield
        return Figure(lambda: step(next(ks)), nfe, f"{detail}; {opt['optimizer']}", during)

    def emit(self, record):
        record = {"net": self.net_name, "device": self.device.type, **record}
        self.records.append(record)
        line = json.dumps(record)
        self.echo(line)
        if self.out is not None:
            print(line, file=self.out, flush=True)
        return record

    def record(self, name, seconds, flops, nfe, detail):
        """Throughput, FLOP rate and memory from the step times ``seconds``: one JSON record."""
        batch, t = self.batch, statistics.median(seconds)
        tflops = flops / t / 1e12
        peak = peak_tflops(self.device_name, self.precision) if self.cuda else None
        if self.cuda:
            mem, kind = torch.cuda.max_memory_allocated(self.device), "cuda_max_allocated"
        else:  # Linux reports kilobytes; whole process, never decreases
            mem, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_rss"
        return self.emit({
            "name": name, "batch": batch, "img_per_s": batch / t, "ms_per_step": 1e3 * t,
            "ms_min": 1e3 * min(seconds), "repeats": len(seconds), "nfe_per_image": nfe,
            "gflop_per_step": flops / 1e9, "tflop_per_s": tflops, "peak_tflop_per_s": peak,
            "frac_of_peak": tflops / peak if peak else None, "peak_mem_mb": mem / 2**20,
            "peak_mem_kind": kind, "precision": self.precision, "compiled": self.compile,
            "threads": torch.get_num_threads(), "device_name": self.device_name,
            "torch": torch.__version__, "detail": detail,
        })

    def measure(self, names, figures):
        """Count each figure's FLOPs once (eager), then time them interleaved inside their
        ``during`` contexts; emit one record each."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        flops = [count_flops(fig.fn)[1] for fig in figures]
        with contextlib.ExitStack() as stack:
            for fig in figures:
                stack.enter_context(fig.during())
            times = time_steps([fig.fn for fig in figures], self.repeats, self.warmup, self.sync)
        return [self.record(name, t, fl, fig.nfe, fig.detail)
                for name, fig, t, fl in zip(names, figures, times, flops, strict=True)]

    def sampler(self, kind):
        """Sampling a batch: ``kind`` = 1 or 2 consistency steps, or "heun" (EDM, 35 NFE)."""
        model = self.model("denoiser" if kind == "heun" else "consistency")
        model = model.eval().requires_grad_(False)
        z = torch.randn(self.x0.shape, generator=torch.Generator().manual_seed(self.seed))
        z, xi = z.to(self.device), torch.Generator(self.device).manual_seed(self.seed)
        taus = self.taus if kind == 2 else ()
        eps, T, rho = self.grid["eps"], self.grid["T"], self.grid["rho"]

        def run():  # not compiled: --compile is for the training steps
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                if kind == "heun":
                    return edm_sampler(model, z, 18, eps, T, rho)
                return consistency_sample(model, z, taus, eps, T, generator=xi)
        return run

    def fid_features(self, classifier=None, inception=None):
        """The registered torch-fidelity extractor's forward on a uint8 NCHW batch."""
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        from cmcore.evaluation.metrics import CLASSIFIER_EXTRACTOR, INCEPTION_EXTRACTOR

        x = ((self.x0 + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        if inception:
            name, layers, path, detail = INCEPTION_EXTRACTOR, ["2048"], inception, "inception"
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        elif self.net_cfg["in_channels"] == 1:
            name, layers, detail = CLASSIFIER_EXTRACTOR, ["features"], "digits classifier"
            path = classifier
        else:
            return None
        cls = FEATURE_EXTRACTORS_REGISTRY[name]
        with tempfile.TemporaryDirectory(prefix="cm-bench-") as tmp:
            if path is None:  # random weights: the extractor's speed, not its quality
                from cmcore.evaluation.classifier import DigitsClassifier, save_classifier

                res = [self.net_cfg["img_resolution"]] * 2
                weights = os.path.join(tmp, "classifier.pt")
                save_classifier(weights, DigitsClassifier().state_dict(), {"resolution": res})
                detail += ", random weights"
            else:
                weights, detail = os.fspath(path), f"{detail} ({path})"
            fe = cls(name, layers, feature_extractor_weights_path=weights)
        fe = fe.eval().requires_grad_(False).to(self.device)
        return Figure(torch.no_grad()(lambda: fe(x)), 1, detail + ", fp32, not autocast")

    def compare_edm(self, edm_path):
        """Teacher step and one forward of ours against NVlabs/edm's SongUNet (same arguments and
        weights), timed interleaved; emits ratio = ours / theirs in img/s for each."""
        ours_F, theirs_F = self.backbone(), self.backbone(load_edm_songunet(edm_path))
        theirs_F.load_state_dict(ours_F.state_dict())
        sigma, ratios = torch.ones(self.batch, device=self.device), {}
        for what in ("teacher_step", "forward"):
            figures = []
            for F in (ours_F, theirs_F):
                if what == "teacher_step":
                    figures.append(self.training("teacher", backbone=copy.deepcopy(F)))
                else:
                    D = self.model("denoiser", copy.deepcopy(F)).eval().requires_grad_(False)
                    figures.append(Figure(torch.no_grad()(lambda D=D: D(self.x0, sigma)), 1, ""))
            figures = [fig._replace(detail=f"{who} SongUNet, timed interleaved")
                       for who, fig in zip(("ours", "edm"), figures, strict=True)]
            recs = self.measure([f"ours_{what}", f"edm_{what}"], figures)
            ratios[what] = recs[0]["img_per_s"] / recs[1]["img_per_s"]
            self.emit({"name": f"ratio_{what}", "ratio_ours_over_edm_img_per_s": ratios[what],
                       "batch": self.batch, "edm_path": os.path.abspath(edm_path)})
        return ratios


def _figure(b, name, lpips, classifier, inception):
    """The Figure of ``name``, or the reason it is skipped (a string)."""
    from cmcore.methods.distances import LPIPS, l2, lpips_backbone_available

    if name.startswith("sample_"):
        kind = {"sample_1step": 1, "sample_2step": 2, "sample_heun18": "heun"}[name]
        nfe, detail = {1: (1, "Algorithm 1"), 2: (2, f"Algorithm 1, tau {b.taus}"),
                       "heun": (35, "EDM Heun, 18 steps")}[kind]
        return Figure(b.sampler(kind), nfe, detail)
    if name == "fid_features":
        return b.fid_features(classifier, inception) or \
            "Inception needs --inception-weights PATH (no download here)"
    method = {"teacher_step": "teacher", "ct_step": "ct", "pd_step": "pd"}.get(name, "cd")
    if method not in b.cfg:
        return f"the config has no {method!r} section"
    if name != "cd_step_lpips":
        return b.training(method, None if method in ("teacher", "pd") else l2)
    if not lpips:
        return "pass --lpips to time it (LPIPS at 224 px is slow on CPU)"
    try:
        backbone = "pretrained" if lpips_backbone_available() else "random"
        dist = LPIPS(backbone=backbone).to(b.device)
    except ImportError as e:
        return f"the lpips package is not importable ({e})"
    fig = b.training("cd", dist)
    return fig._replace(detail=f"{fig.detail}; LPIPS alex at 224 px, {backbone} backbone")


def run_bench(cfg, *, net="embedded", batch=None, device="auto", repeats=None, warmup=None,
              bf16=None, tf32=None, compile=False, lpips=False, classifier=None, inception=None,
              reference_edm=None, only=None, out=None, echo=print, batch_gpu=None):
    """Time every figure of FIGURES (or ``only``), then the EDM comparison; returns the records.

    One JSON line per figure goes to ``echo`` and, when ``out`` is a path, to that .jsonl file.
    torch's global generator is seeded with cfg['seed'] inside and left as it was on return.
    """
    wanted = list(only or FIGURES)
    unknown = sorted(set(wanted) - set(FIGURES))
    if unknown or net not in NETS:
        raise ValueError(f"unknown figure(s) {unknown} or net {net!r}; figures: {list(FIGURES)}")
    b = Bench(cfg, net, batch, device, repeats, warmup, bf16, tf32, compile, echo,
              batch_gpu=batch_gpu)
    with torch.random.fork_rng(devices=[b.device] if b.cuda else []), \
            open(out, "w") if out else contextlib.nullcontext() as b.out:
        torch.manual_seed(b.seed)  # initialisations and the losses' draws
        for name in wanted:
            fig = _figure(b, name, lpips, classifier, inception)
            if isinstance(fig, str):
                b.emit({"name": name, "skipped": fig})
                continue
            b.measure([name], [fig])
            del fig
            gc.collect()
            if b.cuda:
                torch.cuda.empty_cache()
        if reference_edm:
            b.compare_edm(reference_edm)
        else:
            b.emit({"name": "compare_edm",
                    "skipped": "no --reference-edm PATH (an NVlabs/edm checkout) given"})
    return b.records
