"""Throughput (images/s, ms per step), achieved TFLOP/s and peak memory of every pipeline step.

Figures, each timed on one batch of random data with a freshly initialised network:
    teacher_step      EDM loss: forward, backward, Adam step                       (1 fwd+bwd)
    cd_step_l2        CD, Heun N = 18, l2: 2 teacher fwd, 1 target fwd, online fwd+bwd, RAdam
    cd_step_lpips     the same with LPIPS (inputs resized to 224 px); only with ``lpips=True``
    ct_step           CT: 1 target fwd, online fwd+bwd, RAdam
    pd_step           PD: 2 teacher DDIM fwd, student fwd+bwd, Adam
    sample_1step      consistency sampling, 1 NFE;  sample_2step: 2 NFE (Algorithm 1)
    sample_heun18     the teacher's EDM Heun sampler, 18 steps = 35 NFE
    fid_features      the FID feature extractor on uint8 images (digits classifier, or Inception)
With an NVlabs/edm checkout, their SongUNet built from the same arguments is timed in the same
process, interleaved with ours (teacher step and one forward), and the ratio ours/theirs printed.

Timing: warm-up steps excluded; every timed step ends with a device synchronisation; the median
of ``repeats`` is reported. FLOPs are counted once per figure with torch's FlopCounterMode
(2 FLOPs per multiply-add; matmuls, convolutions and attention only, so optimizer and
elementwise work are not counted). Peak memory is torch.cuda.max_memory_allocated per figure on
GPU, and the process's maximum resident set size (getrusage; monotonic) on CPU.
"""

import contextlib
import copy
import gc
import importlib.util
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from cmcore.diffusion.precond import ConsistencyFunction, Denoiser
from cmcore.diffusion.solvers import edm_sampler, heun_step
from cmcore.methods import objectives as obj
from cmcore.networks import ARCHS, build_network
from cmcore.sampling.samplers import consistency_sample

# Backbone arguments and default batch of each named benchmark network (arch "ddpmpp").
NETS = {
    # The embedded default (config/config.yaml) on the 8x8x1 digits.
    "embedded": dict(batch=128, net=dict(
        arch="ddpmpp", img_resolution=8, in_channels=1, model_channels=16, channel_mult=[1, 2, 2],
        num_blocks=1, attn_resolutions=[4], dropout=0.0)),
    # NVlabs/edm's CIFAR-10 DDPM++ (REFERENCE.md): 55.7M parameters, 42.4 GFLOP per forward.
    "cifar10": dict(batch=512, net=dict(
        arch="ddpmpp", img_resolution=32, in_channels=3, model_channels=128,
        channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13)),
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
CD_N = 18


def peak_tflops(device_name, precision):
    """Dense peak TFLOP/s of a known GPU at precision 'bf16', 'tf32' or 'fp32'; else None."""
    return next((p.get(precision) for k, p in PEAK_TFLOPS if k in (device_name or "")), None)


def count_flops(fn):
    """FLOPs (2 per multiply-add) that one call of ``fn`` dispatches, forward and backward."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def forward_flops(net_cfg, device="meta", batch=1):
    """FLOPs of one forward of the backbone ``net_cfg`` per image (meta device: no compute)."""
    with torch.device(device):
        net = build_network(net_cfg).eval()
        x = torch.zeros(batch, net_cfg["in_channels"], *[net_cfg["img_resolution"]] * 2)
        sigma = torch.ones(batch)
    with torch.no_grad():
        return count_flops(lambda: net(x, sigma)) / batch


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
                 bf16=None, tf32=None, compile=False, echo=print, out=None):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
        self.device, self.cuda = torch.device(device), device.startswith("cuda")
        self.net_name, self.net_cfg = net, dict(NETS[net]["net"])
        self.batch = batch or NETS[net]["batch"]
        self.repeats = repeats or (20 if self.cuda else 5)
        self.warmup = warmup if warmup is not None else (3 if self.cuda else 1)
        self.bf16, self.tf32 = (self.cuda if v is None else v for v in (bf16, tf32))
        self.compile = compile
        # wrap: what the timed steps call the networks through; sync: ends every timed step.
        self.wrap = torch.compile if compile else (lambda model: model)
        self.sync = (lambda: torch.cuda.synchronize(self.device)) if self.cuda else (lambda: None)
        self.d = cfg["diffusion"]
        self.grid = dict(eps=self.d["sigma_min"], T=self.d["sigma_max"])
        self.taus = cfg["sampling"]["tau"].get("2", [0.8])
        self.echo, self.out, self.records = echo, out, []
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
        self.device_name = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        self.precision = "bf16" if self.bf16 else ("tf32" if self.tf32 and self.cuda else "fp32")
        shape = (self.net_cfg["in_channels"],) + (self.net_cfg["img_resolution"],) * 2
        gen = torch.Generator().manual_seed(cfg["seed"])
        self.x0 = (torch.rand(self.batch, *shape, generator=gen) * 2 - 1).to(self.device)
        torch.manual_seed(cfg["seed"])

    def backbone(self, cls=None):
        """Our SongUNet from net_cfg, or ``cls`` (EDM's SongUNet) with the same arguments."""
        if cls is None:
            return build_network(self.net_cfg)
        kwargs = {**ARCHS[self.net_cfg["arch"]][1], **self.net_cfg}
        kwargs.pop("arch")
        return cls(out_channels=kwargs["in_channels"], **kwargs)

    def denoiser(self, backbone=None, train=True, consistency=False):
        """D (or f, with ``consistency``) around a backbone, in train or frozen eval mode."""
        sd, F = self.d["sigma_data"], backbone or self.backbone()
        m = ConsistencyFunction(F, sd, self.d["sigma_min"]) if consistency else Denoiser(F, sd)
        m = m.to(self.device)
        return m.train() if train else m.eval().requires_grad_(False)

    def optimizer(self, model, cls=torch.optim.Adam):
        kwargs = {"fused": True} if self.cuda and cls is torch.optim.Adam else {}  # RAdam: none
        return cls(model.parameters(), lr=1e-4, **kwargs)

    def amp(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def train_step(self, loss_fn, opt):
        """A closure: loss under autocast, backward, optimizer step, gradients cleared."""
        def step():
            with self.amp():
                loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def emit(self, record):
        record = {"net": self.net_name, "device": self.device.type, **record}
        self.records.append(record)
        line = json.dumps(record)
        self.echo(line)
        if self.out is not None:
            print(line, file=self.out, flush=True)
        return record

    def skip(self, name, why):
        return self.emit({"name": name, "skipped": why})

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

    def measure(self, name, make, nfe, detail):
        """Count FLOPs of make(identity)() once, then time make(self.wrap)() and emit a record."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        flops = count_flops(make(lambda m: m))
        seconds = time_steps([make(self.wrap)], self.repeats, self.warmup, self.sync)[0]
        return self.record(name, seconds, flops, nfe, detail)

    def teacher_step(self, backbone=None):
        """EDM loss forward, backward and Adam step of D around ``backbone`` (default: ours)."""
        D, sd = self.denoiser(backbone), self.d["sigma_data"]
        opt = self.optimizer(D)

        def make(wrap):
            Dw = wrap(D)
            return self.train_step(lambda: obj.edm_loss(Dw, self.x0, sd), opt)
        return make

    def cd_step(self, distance):
        """CD step: Heun teacher step (2 fwd), target fwd, online fwd+bwd, RAdam step."""
        f, teacher = self.denoiser(consistency=True), self.denoiser(train=False)
        target = copy.deepcopy(f).requires_grad_(False)
        opt = self.optimizer(f, torch.optim.RAdam)

        def make(wrap):
            fw, tw, Dw = wrap(f), wrap(target), wrap(teacher)
            return self.train_step(lambda: obj.consistency_distillation_loss(
                fw, tw, Dw, self.x0, CD_N, heun_step, distance, rho=self.d["rho"], **self.grid),
                opt)
        return make

    def ct_step(self, distance):
        """CT step: target fwd, online fwd+bwd, RAdam step."""
        f = self.denoiser(consistency=True)
        target = copy.deepcopy(f).requires_grad_(False)
        opt = self.optimizer(f, torch.optim.RAdam)

        def make(wrap):
            fw, tw = wrap(f), wrap(target)
            return self.train_step(lambda: obj.consistency_training_loss(
                fw, tw, self.x0, CD_N, distance, rho=self.d["rho"], **self.grid), opt)
        return make

    def pd_step(self):
        """PD step (64-step student): two teacher DDIM fwd, student fwd+bwd, Adam step."""
        student, teacher = self.denoiser(), self.denoiser(train=False)
        opt = self.optimizer(student)

        def make(wrap):
            sw, tw = wrap(student), wrap(teacher)
            return self.train_step(lambda: obj.progressive_distillation_loss(
                sw, tw, self.x0, 64, self.d["sigma_data"], rho=self.d["rho"], **self.grid), opt)
        return make

    def sampler(self, kind):
        """Sampling a batch: ``kind`` = 1 or 2 consistency steps, or "heun" (EDM, 35 NFE)."""
        model = self.denoiser(train=False, consistency=kind != "heun")
        z = torch.randn_like(self.x0)

        taus = self.taus if kind == 2 else ()

        def run():  # not compiled: --compile is for the training steps
            with self.amp():
                if kind == "heun":
                    return edm_sampler(model, z, 18, rho=self.d["rho"], **self.grid)
                return consistency_sample(model, z, taus, **self.grid)
        return lambda wrap: run

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
        return (lambda wrap: torch.no_grad()(lambda: fe(x))), detail + ", fp32, not autocast"

    def compare_edm(self, edm_path):
        """Teacher step and one forward of ours against NVlabs/edm's SongUNet (same arguments and
        weights), timed interleaved; emits ratio = ours / theirs in img/s for each."""
        ours_F, theirs_F = self.backbone(), self.backbone(load_edm_songunet(edm_path))
        theirs_F.load_state_dict(ours_F.state_dict())
        sigma, ratios = torch.ones(self.batch, device=self.device), {}
        for what in ("teacher_step", "forward"):
            makes = []
            for F in (ours_F, theirs_F):
                if what == "teacher_step":
                    makes.append(self.teacher_step(copy.deepcopy(F)))
                else:
                    D = self.denoiser(copy.deepcopy(F), train=False)
                    makes.append(lambda wrap, D=D: torch.no_grad()(lambda: D(self.x0, sigma)))
            flops = [count_flops(make(lambda m: m)) for make in makes]
            times = time_steps([make(self.wrap) for make in makes], self.repeats, self.warmup,
                               self.sync)
            recs = [self.record(f"{who}_{what}", t, fl, 1, f"{who} SongUNet, timed interleaved")
                    for who, t, fl in zip(("ours", "edm"), times, flops, strict=True)]
            ratios[what] = recs[0]["img_per_s"] / recs[1]["img_per_s"]
            self.emit({"name": f"ratio_{what}", "ratio_ours_over_edm_img_per_s": ratios[what],
                       "batch": self.batch, "edm_path": os.path.abspath(edm_path)})
        return ratios


def run_bench(cfg, *, net="embedded", batch=None, device="auto", repeats=None, warmup=None,
              bf16=None, tf32=None, compile=False, lpips=False, classifier=None, inception=None,
              reference_edm=None, only=None, out=None, echo=print):
    """Time every figure of FIGURES (or ``only``), then the EDM comparison; returns the records.

    One JSON line per figure goes to ``echo`` and, when ``out`` is a path, to that .jsonl file.
    """
    from cmcore.methods.distances import LPIPS, l2, lpips_backbone_available

    wanted = list(only or FIGURES)
    unknown = sorted(set(wanted) - set(FIGURES))
    if unknown or net not in NETS:
        raise ValueError(f"unknown figure(s) {unknown} or net {net!r}; figures: {list(FIGURES)}")
    b = Bench(cfg, net, batch, device, repeats, warmup, bf16, tf32, compile, echo)
    with open(out, "w") if out else contextlib.nullcontext() as b.out:
        simple = {  # name: (builder, network evaluations per image, detail)
            "teacher_step": (b.teacher_step, 1, "EDM loss, Adam"),
            "cd_step_l2": (lambda: b.cd_step(l2), 4, f"Heun N={CD_N}, l2; 3 fwd + 1 fwd/bwd"),
            "ct_step": (lambda: b.ct_step(l2), 2, "l2; 1 target fwd + 1 fwd/bwd"),
            "pd_step": (b.pd_step, 3, "l2; 2 teacher DDIM fwd + 1 fwd/bwd"),
            "sample_1step": (lambda: b.sampler(1), 1, "Algorithm 1"),
            "sample_2step": (lambda: b.sampler(2), 2, f"Algorithm 1, tau {b.taus}"),
            "sample_heun18": (lambda: b.sampler("heun"), 35, "EDM Heun, 18 steps"),
        }
        for name in wanted:
            if name in simple:
                build, nfe, detail = simple[name]
                make = build()
            elif name == "cd_step_lpips":
                if not lpips:
                    b.skip(name, "pass --lpips to time it (LPIPS at 224 px is slow on CPU)")
                    continue
                try:
                    backbone = "pretrained" if lpips_backbone_available() else "random"
                    dist = LPIPS(backbone=backbone).to(b.device)
                except ImportError as e:
                    b.skip(name, f"the lpips package is not importable ({e})")
                    continue
                make, nfe = b.cd_step(dist), 4
                detail = f"Heun N={CD_N}, LPIPS alex at 224 px, {backbone} backbone"
            else:  # fid_features
                got = b.fid_features(classifier, inception)
                if got is None:
                    b.skip(name, "Inception needs --inception-weights PATH (no download here)")
                    continue
                (make, detail), nfe = got, 1
            b.measure(name, make, nfe, detail)
            del make
            gc.collect()
            if b.cuda:
                torch.cuda.empty_cache()
        if reference_edm:
            b.compare_edm(reference_edm)
        else:
            b.skip("compare_edm", "no --reference-edm PATH (an NVlabs/edm checkout) given")
    return b.records
