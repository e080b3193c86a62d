"""Bad input refused up front, in one line naming the key (or the file) and the fix: a fuzz set
of generated bad configs, broken YAML, hostile data files, broken samples and checkpoints, and
a second run on an output that a first one is writing."""

import copy
import io
import math
import pickle
import tarfile

import numpy as np
import pytest
import torch
import yaml
from conftest import FULL, ROOT, cm, snakemake, tiny_config

from cmcore.config import ConfigError, load, validate
from cmcore.data import DataError, load_cifar10
from cmcore.evaluation.metrics import MetricsError, compute_metrics
from cmcore.sampling.samplers import to_numpy
from cmcore.training.checkpoints import CheckpointError, output_lock

# Numbers that must be finite: (path, key named in the message).
NUMBERS = [("diffusion.sigma_min",), ("diffusion.sigma_max",), ("diffusion.sigma_data",),
           ("diffusion.rho",), ("teacher.lr",), ("teacher.ema",), ("cd.lr",), ("cd.target_mu",),
           ("ct.lr",), ("pd.lr",), ("network.dropout",)]
# Counts written as floats: the schema's integer must refuse 20.0.
COUNTS = ["teacher.iters", "cd.iters", "ct.iters", "pd.iters", "cd.batch", "cd.N", "seed",
          "threads", "sampling.num_samples", "teacher.sampler_steps"]


def _set(cfg, dotted, value):
    *parents, last = dotted.split(".")
    node = cfg
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = value
    return cfg


def _cases():
    """(id, mutate(cfg) -> cfg, the words the refusal must contain)."""
    cases = []
    for (key,) in NUMBERS:
        for value in (math.nan, math.inf, -math.inf):
            cases.append((f"{key}={value}", lambda c, k=key, v=value: _set(c, k, v), key))
    for key in COUNTS:
        cases.append((f"{key}=float", lambda c, k=key: _set(c, k, 20.0), key))

    def more(name, words, **changes):
        def mutate(c, changes=changes):
            for dotted, value in changes.items():
                _set(c, dotted.replace("__", "."), value)
            return c
        cases.append((name, mutate, words))

    more("dropout one", "network.dropout", network__dropout=1.0)
    more("sampler one step", "teacher.sampler_steps", teacher__sampler_steps=1)
    more("seed overflows", "seed", seed=2**40)
    more("negative seed", "seed", seed=-5)
    more("search seed overflows", "sampling.tau_search.seed", sampling__tau_search__seed=2**33)
    more("ict s1 < s0", "ict.s1", ict__s0=10, ict__s1=5)
    more("ct s1 <= s0", "ct.s1", ct__s0=10, ct__s1=10)
    more("ablation ct s1", "ablations.ct.s1", ablations__ct__s1=2)
    more("too deep", "network.channel_mult", network__channel_mult=[1, 2, 2, 2, 2])
    more("attention never reached", "network.attn_resolutions", network__attn_resolutions=[3])
    more("mlp on images", "network.arch", network={"arch": "mlp"})
    more("unet on points", "network.arch", dataset={"name": "mixture"})
    more("digits with a path", "dataset.path", dataset__path="/data/digits.npz")
    more("points of digits", "dataset.num_points", dataset__num_points=100)
    more("resolution of digits", "dataset.resolution", dataset__resolution=8)
    more("mlp width of a u-net", "network.hidden", network__hidden=64)
    more("adm key of ddpmpp", "network.num_head_channels", network__num_head_channels=64)
    more("editing taus increase", "editing.taus", editing__taus=[0.3, 0.8])
    more("editing taus above T", "editing.taus", editing__taus=[100.0, 0.8])
    more("too few samples", "sampling.num_samples", sampling__num_samples=5)
    more("too few search samples", "sampling.tau_search.num_samples",
         sampling__tau_search__num_samples=3)
    more("too few ablation samples", "ablations.num_samples", ablations__num_samples=2)
    more("theorem N collapse", "theorem1.N_trained", theorem1__N_trained=[6, 6, 6])
    more("theorem two N", "theorem1.N_zero_loss", theorem1__N_zero_loss=[16, 32])
    more("gpus split batch", ".batch: 32 does not split over", resources__train__gpu=3)
    more("pd start not power", "pd.start_steps", pd__start_steps=48)
    more("sigma_max below min", "sigma_max", diffusion__sigma_max=0.001)
    more("holdout all", "holdout_fraction", evaluation__classifier__holdout_fraction=1.0)
    more("holdout leaves no batch", "leaves 17 of 1797 digits",
         evaluation__classifier__holdout_fraction=0.99)
    more("unknown key", "colour", colour="red")
    more("unknown section key", "cd.stepz", cd__stepz=3)
    more("zero iters lr", "cd.lr", cd__lr=0)
    more("lr as text", "teacher.lr", teacher__lr="1e-3x")
    more("fixed taus wrong count", "sampling.tau.2",
         sampling__tau_search__enabled=False, sampling__tau={"2": [0.8, 0.3]})
    more("fixed taus outside", "sampling.tau.2",
         sampling__tau_search__enabled=False, sampling__tau={"2": [90.0]})
    more("inception without weights", "evaluation.inception_weights",
         evaluation__feature_extractor="inception")
    more("pretrained teacher missing", "teacher.pretrained", teacher__pretrained="/no/t.pt")
    more("digits have ten classes", "network.label_dim", network__label_dim=5)
    more("reference batch missing", "evaluation.reference", evaluation__reference="/no/ref.npz")
    more("unknown label draw", "sampling.labels", sampling__labels="uniform")
    more("lpips without weights", "lpips_backbone", cd__distance="lpips",
         distance_options__lpips_backbone="pretrained")
    return cases


CASES = _cases()


@pytest.fixture(autouse=True)
def no_hub_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache


def test_the_fuzz_set_is_large():
    assert len(CASES) >= 60, len(CASES)


@pytest.mark.parametrize("name, mutate, words", CASES, ids=[c[0] for c in CASES])
def test_bad_config_refused_in_one_line(name, mutate, words):
    cfg = validate(copy.deepcopy(FULL))  # the base is good: the mutation alone is refused
    with pytest.raises(ConfigError) as e:
        validate(mutate(copy.deepcopy(FULL)))
    message = str(e.value)
    assert words in message and "\n" not in message, message
    assert cfg["seed"] == FULL["seed"]


@pytest.mark.parametrize("text, words", [
    (b"cd:\n  iters: 3\ncd:\n  lr: 1\n", ":3: key 'cd' written twice"),
    (b"cd:\n  lr: 1\n  lr: 2\n", ":3: key 'lr' written twice"),
    (b"dataset: [digits\nseed: 0\n", r":2:\d+: not valid YAML"),
    (b"seed: \xff\n", "not UTF-8"),
    (b"- just\n- a list\n", "must hold a YAML mapping"),
])
def test_broken_yaml_names_file_and_line(tmp_path, text, words):
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=words):
        load(path)


def test_dag_and_cli_refuse_before_any_job(tmp_path):
    # A duplicated section reaches Snakemake's loader silently; the workflow reads it again.
    path = tiny_config(tmp_path)
    path.write_text(path.read_text() + "cd: {iters: 5, batch: 8, lr: 0.1}\n")
    r = snakemake("-n", "reproduce_table", "--configfile", path)
    assert r.returncode != 0 and "written twice" in r.stderr and "Traceback" not in r.stderr
    # NaN in the file, a bad override on the command line: one line each, nothing written.
    nan = tiny_config(tmp_path, cd={"target_mu": math.nan})
    r = snakemake("-n", "reproduce_table", "--configfile", nan)
    assert r.returncode != 0 and "config error: cd.target_mu: not a finite number" in r.stderr
    for extra, words in ((["--seed", "-5"], "seed: -5"), (["--threads", "0"], "threads: 0")):
        r = cm("prepare-data", "--config", tiny_config(tmp_path), "--out", tmp_path / "d.npz",
               *extra)
        assert r.returncode == 2 and words in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d.npz").exists() and not (tmp_path / "results").exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would write the marker file
        return (open, (self.marker, "w"))


def _tarball(path, batch):
    with tarfile.open(path, "w:gz") as tar:
        for i in range(1, 6):
            blob = pickle.dumps(batch)
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{i}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def test_hostile_and_broken_cifar_tarballs(tmp_path):
    marker = tmp_path / "pwned"
    hostile = _tarball(tmp_path / "hostile.tar.gz", {b"data": _Payload(str(marker))})
    with pytest.raises(DataError, match=r"refused to load [\w.]*open \(only numpy arrays\)"):
        load_cifar10(str(hostile))
    assert not marker.exists()  # no code ran
    good = _tarball(tmp_path / "good.tar.gz",
                    {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]})
    assert load_cifar10(str(good))[0].shape == (10, 32, 32, 3)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[:200])
    not_gzip = tmp_path / "text.tar.gz"
    not_gzip.write_text("hello")
    for broken in (truncated, not_gzip):
        with pytest.raises(DataError, match=f"{broken.name} is not a readable CIFAR-10"):
            load_cifar10(str(broken))


def test_broken_samples_get_no_score(tmp_path):
    x = torch.zeros(4, 1, 8, 8)
    x[2, 0, 3, 3] = math.nan
    with pytest.raises(ValueError, match="1 of 4 samples are not finite"):
        to_numpy(x)
    flat = np.full((20, 8, 8, 1), 7, np.uint8)
    reference = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    with pytest.raises(MetricsError, match="every pixel is 7"):
        compute_metrics(flat, reference, weights_path=weights)


def test_second_writer_of_an_output_is_refused(tmp_path):
    out = tmp_path / "runs" / "cd" / "checkpoint.pt"
    with output_lock(out):
        with pytest.raises(CheckpointError, match="being written by another run"):
            with output_lock(out):
                pass
    assert not (tmp_path / "runs" / "cd" / "checkpoint.pt.lock").exists()
    with output_lock(out):  # free again once the first run is done
        pass


def test_shipped_configs_still_validate(tmp_path, monkeypatch):
    # The guards refuse only bad input: the default and tiny configs pass as they are.
    assert validate(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    assert validate(copy.deepcopy(FULL))


def test_cuda_without_a_gpu_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = cm("prepare-data", "--config", tiny_config(tmp_path, device="cuda"), "--out",
           tmp_path / "d.npz")
    assert r.returncode == 2 and "device: 'cuda', but torch finds no CUDA GPU" in r.stderr


def test_broken_images_and_npz_name_the_file(tmp_path):
    from PIL import Image

    from cmcore.data import load_image_folder, load_npz

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(folder / "a.png")
    (folder / "b.png").write_text("not an image")
    with pytest.raises(DataError, match=r"b.png is not a readable image"):
        load_image_folder(str(folder), 8)
    (folder / "b.png").write_bytes((folder / "a.png").read_bytes()[:40])  # truncated
    with pytest.raises(DataError, match=r"b.png is not a readable image"):
        load_image_folder(str(folder), 8)
    npz = tmp_path / "x.npz"
    npz.write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DataError, match="x.npz is not a readable npz"):
        load_npz(str(npz))


def test_teacher_must_be_a_denoiser_of_this_network(tmp_path):
    tiny = tiny_config(tmp_path)
    data = tmp_path / "data.npz"
    assert cm("prepare-data", "--config", tiny, "--out", data).returncode == 0
    untrained = tmp_path / "untrained.pt"  # a consistency model f (kind consistency)
    assert cm("train", "--method", "untrained", "--config", tiny, "--data", data, "--out",
              untrained).returncode == 0
    r = cm("train", "--method", "cd", "--config", tiny, "--data", data, "--out",
           tmp_path / "cd.pt", "--teacher", untrained)
    assert r.returncode == 2 and "holds a untrained consistency model; cd needs" in r.stderr
    teacher = tmp_path / "teacher.pt"
    assert cm("train", "--method", "teacher", "--config", tiny, "--data", data, "--out",
              teacher).returncode == 0
    (tmp_path / "other").mkdir()
    other = tiny_config(tmp_path / "other", network={"model_channels": 8})
    r = cm("train", "--method", "pd", "--config", other, "--data", data, "--out",
           tmp_path / "pd.pt", "--teacher", teacher)
    assert r.returncode == 2 and "network differs from this config's in model_channels" \
        in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "pd.pt").exists()


def test_unwritable_output_is_one_line_and_leaves_nothing(tmp_path):
    # A file where a folder should be (as root, permission bits would not stop the write).
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder")
    r = cm("prepare-data", "--config", tiny_config(tmp_path), "--out", blocker / "d.npz")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot write or read" in r.stderr and str(blocker) in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "results"]
