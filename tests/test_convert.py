"""`cm convert`: openai state dicts and NVlabs/edm pickles become cmcore teacher checkpoints.

The EDM pickle tests use a stand-in for an NVlabs/edm checkout (empty dnnlib/ and torch_utils/
packages and a module whose EDMPrecond and SongUNet expose what the real ones do: ``.model``,
``.sigma_data``, ``.init_kwargs`` and EDM's state dict, which our SongUNet shares). They check the
converter's side: the path handling, the attribute path, the argument and state-dict mapping.
Unpickling a published file needs NVlabs' real code (its persistence module), not tested here.
"""

import os
import pickle
import sys
import textwrap

import pytest
import torch
import yaml
from conftest import cm, tiny_config

from cmcore.convert import songunet_from_edm
from cmcore.diffusion.precond import Denoiser
from cmcore.models import model_from_checkpoint
from cmcore.networks import build_network
from cmcore.training.checkpoints import load_checkpoint

ADM = dict(
    arch="adm",
    img_resolution=16,
    in_channels=3,
    model_channels=32,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[8],
    num_head_channels=32,
    label_dim=10,
)


def randomized(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


def one_error_line(r, *words):
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("cm convert: error: ")
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def openai_file(tmp_path):
    """A small ADM saved as openai saves its checkpoints (a plain state dict), its arguments as
    an --arch-config YAML file, and the network itself."""
    net = randomized(build_network(ADM))
    path = tmp_path / "openai.pt"
    torch.save(net.state_dict(), path)
    arch = tmp_path / "adm.yaml"
    arch.write_text(yaml.safe_dump(ADM))
    return path, arch, net



def convert_openai(config, path, arch, out, *extra):
    """``cm convert --openai PATH --arch-config ARCH`` in this process."""
    return cm("convert", "--config", config, "--openai", path, "--arch-config", arch,
              "--out", out, *extra)

def test_openai_round_trip_is_exact(tmp_path, openai_file):
    path, arch, net = openai_file
    out = tmp_path / "teacher.pt"
    r = convert_openai(tiny_config(tmp_path), path, arch, out)
    assert r.returncode == 0, r.stderr
    assert "adm teacher" in r.stdout and "network.arch is 'ddpmpp'" in r.stdout
    ckpt = load_checkpoint(out)
    assert (ckpt["method"], ckpt["kind"], ckpt["net"]["arch"]) == ("teacher", "denoiser", "adm")
    assert ckpt["source"]["format"].startswith("openai")
    D = model_from_checkpoint(ckpt)
    x = torch.randn(3, 3, 16, 16)
    sigma = torch.tensor([0.002, 1.0, 80.0])
    y = torch.nn.functional.one_hot(torch.tensor([0, 4, 9]), 10).float()
    with torch.no_grad():
        assert torch.equal(D(x, sigma, class_labels=y), Denoiser(net)(x, sigma, class_labels=y))


def test_openai_dry_run_checks_and_writes_nothing(tmp_path, openai_file):
    path, arch, _ = openai_file
    r = convert_openai(tiny_config(tmp_path), path, arch, tmp_path / "t.pt", "--dry-run")
    assert r.returncode == 0 and r.stdout.startswith("[dry run] would write")
    assert not (tmp_path / "t.pt").exists()


def test_wrong_shape_names_the_first_mismatching_key(tmp_path, openai_file):
    path, arch, net = openai_file
    state = net.state_dict()
    state["input_blocks.3.1.qkv.weight"] = torch.zeros(192, 64, 1)  # guided-diffusion's Conv1d
    torch.save(state, path)
    r = convert_openai(tiny_config(tmp_path), path, arch, tmp_path / "t.pt")
    one_error_line(r, "'input_blocks.3.1.qkv.weight' has shape (192, 64, 1)", "(192, 64, 1, 1)")
    assert not (tmp_path / "t.pt").exists()


@pytest.mark.parametrize(
    "case, words",
    [
        (
            "small-as-imagenet64",
            ["'time_embed.0.weight' has shape (128, 32)", "expects (768, 192)"],
        ),
        ("extra-key", ["unexpected key 'ema_rate'"]),
        ("pickled-class", ["is not a plain state dict of tensors"]),
        ("text", ["is not a plain state dict of tensors"]),
        ("unknown-arch", ["--arch-config 'imagenet128' is neither one of imagenet64, lsun256"]),
    ],
)
def test_foreign_files_give_one_line(tmp_path, openai_file, case, words):
    path, arch, net = openai_file
    arch_config = "imagenet64" if case == "small-as-imagenet64" else str(arch)
    if case == "unknown-arch":
        arch_config = "imagenet128"
    if case == "extra-key":
        torch.save({**net.state_dict(), "ema_rate": torch.tensor(0.999)}, path)
    if case == "pickled-class":
        torch.save(net, path)  # a whole module: refused by weights_only loading
    if case == "text":
        path.write_text("not a checkpoint\n")
    r = convert_openai(tiny_config(tmp_path), path, arch_config, tmp_path / "t.pt")
    one_error_line(r, *words)


def test_source_choice_is_checked(tmp_path, openai_file):
    path, _, _ = openai_file
    cfg = tiny_config(tmp_path)
    one_error_line(cm("convert", "--config", cfg, "--out", tmp_path / "t.pt"), "exactly one")
    one_error_line(
        cm("convert", "--config", cfg, "--out", tmp_path / "t.pt", "--openai", path),
        "--openai needs --arch-config",
    )


class _Marker:
    """Unpickling this creates a folder: proof of whether a pickle was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_edm_pickle_needs_allow_pickle_and_is_never_opened_without(tmp_path):
    marker = tmp_path / "unpickled"
    pkl = tmp_path / "net.pkl"
    pkl.write_bytes(pickle.dumps({"ema": _Marker(str(marker))}))
    cfg = tiny_config(tmp_path)
    for dry in ([], ["--dry-run"]):
        r = cm(
            "convert",
            "--config",
            cfg,
            "--edm-pickle",
            pkl,
            "--edm-code",
            tmp_path,
            "--out",
            tmp_path / "t.pt",
            *dry,
        )
        one_error_line(r, "runs code from that file", "--allow-pickle")
    assert not marker.exists()
    r = cm(
        "convert",
        "--config",
        cfg,
        "--edm-pickle",
        pkl,
        "--allow-pickle",
        "--out",
        tmp_path / "t.pt",
    )
    one_error_line(r, "--edm-pickle needs --edm-code", "github.com/NVlabs/edm")
    assert not marker.exists()


FAKE_NETWORKS = """
    # Stand-in for NVlabs/edm training/networks.py: the attributes the converter reads.
    import torch
    from cmcore.networks.songunet import SongUNet as _Ours


    class SongUNet(_Ours):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.init_kwargs = dict(kwargs)  # as torch_utils.persistence keeps them


    class EDMPrecond(torch.nn.Module):
        def __init__(self, model, sigma_data=0.5):
            super().__init__()
            self.model, self.sigma_data = model, sigma_data
"""


@pytest.fixture
def fake_edm(tmp_path):
    """(checkout folder, pickle path, the pickled network) of a fake NVlabs/edm pickle."""
    code = tmp_path / "edm"
    for package in ("dnnlib", "torch_utils"):
        (code / package).mkdir(parents=True)
        (code / package / "__init__.py").write_text("")
    (code / "fake_edm_networks.py").write_text(textwrap.dedent(FAKE_NETWORKS))
    sys.path.insert(0, str(code))
    try:
        import fake_edm_networks as fake

        kwargs = dict(
            img_resolution=8,
            in_channels=1,
            out_channels=1,
            model_channels=16,
            channel_mult=(1, 2),
            num_blocks=1,
            attn_resolutions=(4,),
            augment_dim=9,
            dropout=0.13,
            embedding_type="positional",
            resample_filter=(1, 1),
        )
        net = fake.EDMPrecond(randomized(fake.SongUNet(**kwargs)))
        pkl = tmp_path / "edm-fake.pkl"
        pkl.write_bytes(pickle.dumps({"ema": net, "augment_pipe": None}))
    finally:
        sys.path.remove(str(code))
        sys.modules.pop("fake_edm_networks", None)  # the converter must import it itself
    yield code, pkl, net
    sys.modules.pop("fake_edm_networks", None)


def test_edm_pickle_converts_to_an_exact_teacher(tmp_path, fake_edm):
    code, pkl, net = fake_edm
    out = tmp_path / "teacher.pt"
    r = cm(
        "convert",
        "--config",
        tiny_config(tmp_path),
        "--edm-pickle",
        pkl,
        "--edm-code",
        code,
        "--allow-pickle",
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr
    assert str(code) not in sys.path
    ckpt = load_checkpoint(out)
    assert ckpt["net"]["arch"] == "ddpmpp" and ckpt["net"]["augment_dim"] == 0
    assert ckpt["net"]["channel_mult"] == [1, 2] and ckpt["net"]["dropout"] == 0.13
    assert "model.map_augment.weight" not in ckpt["ema"]
    D = model_from_checkpoint(ckpt)
    x, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.002, 0.3, 5.0, 80.0])
    with torch.no_grad():
        assert torch.equal(D(x, sigma), Denoiser(net.model)(x, sigma))


def test_edm_pickle_errors_are_one_line(tmp_path, fake_edm):
    code, pkl, _ = fake_edm
    cfg = tiny_config(tmp_path)
    r = cm(
        "convert",
        "--config",
        cfg,
        "--edm-pickle",
        pkl,
        "--edm-code",
        tmp_path / "nowhere",
        "--allow-pickle",
        "--out",
        tmp_path / "t.pt",
    )
    one_error_line(r, "is not an NVlabs/edm checkout")
    (code / "fake_edm_networks.py").unlink()  # a checkout without the pickled classes
    r = cm(
        "convert",
        "--config",
        cfg,
        "--edm-pickle",
        pkl,
        "--edm-code",
        code,
        "--allow-pickle",
        "--out",
        tmp_path / "t.pt",
    )
    one_error_line(r, "cannot unpickle", "ModuleNotFoundError")


def test_songunet_mapping_from_edm_arguments():
    kwargs = dict(
        img_resolution=8,
        in_channels=1,
        out_channels=1,
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
        embedding_type="fourier",
        channel_mult_noise=2,
        encoder_type="residual",
        resample_filter=[1, 3, 3, 1],
    )
    state = build_network({"arch": "ncsnpp", **kwargs}).state_dict()
    net_cfg, mapped = songunet_from_edm(kwargs, state)
    assert net_cfg["arch"] == "ncsnpp" and net_cfg["decoder_type"] == "standard"
    assert mapped.keys() == state.keys()
    with pytest.raises(Exception, match="'use_fp16' is not one of ours"):
        songunet_from_edm({**kwargs, "use_fp16": True}, state)
