"""The paper-scale configs for ImageNet 64 and LSUN 256 validate, describe the published ADM
networks, and plan the whole DAG (snakemake dry run); the npz and image-folder data sets load.

The configs name data and Inception weights that are not here; the tests copy each config with
those paths pointing at a tiny fake image folder and an empty weights file in tmp."""

import re

import numpy as np
import pytest
import yaml
from conftest import ROOT, cm, snakemake, tiny_config
from PIL import Image

from cmcore.config import ConfigError, validate
from cmcore.data import DataError, load_dataset
from cmcore.networks import ADM_PRESETS

# The paper configs train with LPIPS: validation wants its AlexNet weights in the hub cache.
pytestmark = pytest.mark.usefixtures("lpips_hub")

CONFIGS = {
    "imagenet64": ("imagenet64", 64, 1000),
    "lsun_bedroom256": ("lsun256", 256, 0),
    "lsun_cat256": ("lsun256", 256, 0),
}


def image_folder(root, classes=("n01", "n02"), per_class=2, size=(20, 13)):
    """Tiny RGB PNGs in one subfolder per class; pixel values encode (class, index)."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            a = np.full((size[1], size[0], 3), 10 * c + i, np.uint8)
            Image.fromarray(a).save(root / name / f"{i}.png")
    return root


def local_copy(tmp_path, config_name, **dataset):
    """The config with data, weights and outdir in tmp_path; returns (dict, path)."""
    cfg = yaml.safe_load((ROOT / "config" / f"{config_name}.yaml").read_text())
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")
    folder = tmp_path / "images"
    if not folder.exists():
        image_folder(folder)
    cfg["dataset"].update({"path": str(folder), **dataset})
    cfg["evaluation"]["inception_weights"] = str(weights)
    reference = tmp_path / "reference.npz"  # a stand-in: a dry run reads none
    reference.write_bytes(b"")
    cfg["evaluation"]["reference"] = str(reference)
    cfg["outdir"] = str(tmp_path / "results")
    path = tmp_path / f"{config_name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return cfg, path


@pytest.mark.parametrize("name", CONFIGS)
def test_config_as_shipped_names_the_missing_data(name):
    cfg = yaml.safe_load((ROOT / "config" / f"{name}.yaml").read_text())
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    message = str(e.value)
    assert message.startswith("dataset.path: image folder not found at 'data/")
    assert "\n" not in message


@pytest.mark.parametrize("name", CONFIGS)
def test_config_holds_the_paper_settings(tmp_path, name):
    preset, resolution, classes = CONFIGS[name]
    cfg = validate(local_copy(tmp_path, name)[0])
    net = cfg["network"]
    assert {k: net[k] for k in ADM_PRESETS[preset] if k in net} == {
        k: v for k, v in ADM_PRESETS[preset].items() if k in net
    }
    assert net["arch"] == "adm" and net["label_dim"] == classes
    assert cfg["dataset"]["resolution"] == resolution
    cd, ct = cfg["cd"], cfg["ct"]
    assert (cd["N"], cd["target_mu"], cd["distance"], cd["solver"]) == (40, 0.95, "lpips", "heun")
    assert (ct["s0"], ct["mu0"], ct["distance"]) == (2, 0.95, "lpips")
    big = name == "imagenet64"
    assert (cd["batch"], cd["lr"], cd["iters"]) == (
        (2048, 8e-6, 600000) if big else (256, 1e-5, 600000)
    )
    assert (ct["batch"], ct["lr"], ct["s1"], ct["iters"]) == (
        (2048, 1e-4, 200, 800000) if big else (256, 5e-5, 150, 1000000)
    )
    # The official runs: students at dropout 0 beside a teacher trained at 0.1.
    assert (net["dropout"], cd["dropout"], ct["dropout"]) == (0.1, 0.0, 0.0)
    assert cfg["teacher"]["sampler_steps"] == 40  # Heun, 79 NFE
    assert cfg["sampling"]["num_samples"] == 50000


@pytest.mark.parametrize("name", CONFIGS)
def test_dry_run_plans_the_whole_dag(tmp_path, name):
    _, path = local_copy(tmp_path, name)
    r = snakemake("reproduce_table", "-n", "--configfile", path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for rule in ("prepare_data", "train", "sample", "evaluate", "table1", "figure4"):
        assert f"\n{rule} " in r.stdout, rule
    # One train job per method: the teacher, CD, CT and PD (the untrained net has its rule).
    assert re.search(r"\ntrain +4\n", r.stdout), r.stdout[-1500:]
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


@pytest.mark.parametrize("name", CONFIGS)
def test_paper_config_on_two_nodes_dry_runs_through_the_slurm_profile(tmp_path, name):
    """Training on 2 nodes of 8 GPUs in micro-batches of 8: validated, planned through the
    shipped profile with one task per node (cm train's srun starts each node's torchrun)."""
    cfg, path = local_copy(tmp_path, name)
    cfg["resources"]["train"].update(gpu=16, nodes=2)
    for section in ("teacher", "cd", "ct", "pd"):
        cfg[section]["batch_gpu"] = 8
    path.write_text(yaml.safe_dump(cfg))
    r = snakemake("--profile", "slurm", "reproduce_table", "-n", "--configfile", path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Using profile slurm" in r.stdout + r.stderr
    assert re.search(r"\ntrain +4\n", r.stdout), r.stdout[-1500:]
    cfg["teacher"]["batch_gpu"] = 24  # does not divide the 16 GPUs' shares of the batch
    path.write_text(yaml.safe_dump(cfg))
    r = snakemake("--profile", "slurm", "reproduce_table", "-n", "--configfile", path)
    share = cfg["teacher"]["batch"] // 16
    assert r.returncode != 0 and f"teacher.batch_gpu: 24 does not divide the {share} rows each " \
        "GPU gets" in r.stdout + r.stderr


def test_npz_variant_validates_and_missing_paths_are_one_line(tmp_path):
    npz = tmp_path / "imagenet64.npz"
    np.savez(npz, arr_0=np.zeros((4, 64, 64, 3), np.uint8), labels=np.arange(4))
    cfg, _ = local_copy(tmp_path, "imagenet64", name="npz", path=str(npz))
    assert validate(cfg)["dataset"]["name"] == "npz"
    cfg["dataset"]["path"] = str(tmp_path / "missing.npz")
    with pytest.raises(ConfigError, match=r"^dataset.path: npz file not found at '.*missing.npz'"):
        validate(cfg)
    cfg["dataset"].update(name="image_folder", path=str(tmp_path / "images"), resolution=None)
    del cfg["dataset"]["resolution"]
    with pytest.raises(ConfigError, match="dataset.resolution: an image_folder data set needs"):
        validate(cfg)


def test_image_folder_crops_and_labels_by_subfolder(tmp_path):
    root = image_folder(tmp_path / "train", classes=("b", "a"), size=(20, 13))
    x, labels = load_dataset({"name": "image_folder", "path": str(root), "resolution": 8})
    assert x.shape == (4, 8, 8, 3) and x.dtype == np.uint8
    # Sorted paths a/0, a/1, b/0, b/1; classes sorted by name: a = 0, b = 1.
    assert labels.tolist() == [0, 0, 1, 1]
    assert x[:, 4, 4, 0].tolist() == [10, 11, 0, 1]  # flat colours survive the resize
    x, labels = load_dataset(
        {"name": "image_folder", "path": str(root), "resolution": 8, "max_images": 3}
    )
    assert len(x) == len(labels) == 3


def test_image_folder_flat_layout_takes_the_class_from_the_name(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for name in ("n02_1.JPEG", "n01_7.png", "n02_3.jpg"):
        fmt = "JPEG" if name.lower().endswith(("jpeg", "jpg")) else "PNG"
        Image.fromarray(np.zeros((70, 64, 3), np.uint8)).save(root / name, format=fmt)
    (root / "notes.txt").write_text("ignored")
    x, labels = load_dataset({"name": "image_folder", "path": str(root), "resolution": 16})
    assert x.shape == (3, 16, 16, 3) and labels.tolist() == [0, 1, 1]


def test_npz_data_set_and_its_errors(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, arr_0=np.ones((5, 8, 8, 3), np.uint8))
    x, labels = load_dataset({"name": "npz", "path": str(path), "max_images": 2})
    assert x.shape == (2, 8, 8, 3) and labels.tolist() == [0, 0]
    with pytest.raises(DataError, match="images in .* are 8x8, dataset.resolution is 64"):
        load_dataset({"name": "npz", "path": str(path), "resolution": 64})
    np.savez(path, images=np.ones((5, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="has no arr_0 \\(keys: images\\)"):
        load_dataset({"name": "npz", "path": str(path)})
    with pytest.raises(DataError, match="image folder not found at '/no/such'"):
        load_dataset({"name": "image_folder", "path": "/no/such", "resolution": 8})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .png/.jpg/.jpeg/.webp/.bmp images under"):
        load_dataset({"name": "image_folder", "path": str(tmp_path / "empty"), "resolution": 8})


def test_prepare_data_reads_an_image_folder(tmp_path):
    root = image_folder(tmp_path / "train")
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")
    cfg = tiny_config(
        tmp_path,
        dataset={"name": "image_folder", "path": str(root), "resolution": 8},
        evaluation={"feature_extractor": "inception", "inception_weights": str(weights)},
    )
    r = cm("prepare-data", "--config", cfg, "--out", tmp_path / "d.npz")
    assert r.returncode == 0, r.stderr
    assert "4 items of shape (8, 8, 3)" in r.stdout
    with np.load(tmp_path / "d.npz") as f:
        assert f["labels"].tolist() == [0, 0, 1, 1]


def test_config_readme_is_generated_from_the_schema():
    from cmcore.config import SCHEMA_PATH, schema_markdown

    text = (ROOT / "config" / "README.md").read_text()
    assert text == schema_markdown(), "config/README.md is stale: run `python -m cmcore.config`"
    # Every key of the schema is described, so every row of the README has a description.
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) > 100 and all(not line.endswith("|  |") for line in rows)
    assert "snapshot_every" in text and SCHEMA_PATH.name in text


def test_conditional_digits_config_is_the_default_with_labels():
    """config/digits_conditional.yaml differs from the embedded default in the labels, the
    outdir and the parts it leaves out (ablations, Theorem 1, later recipes), nothing else."""
    default = validate(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    cond = validate(yaml.safe_load((ROOT / "config" / "digits_conditional.yaml").read_text()))
    assert cond["network"].pop("label_dim") == 10 and default["network"].pop("label_dim", 0) == 0
    assert cond["outdir"] != default["outdir"]
    assert not cond["ablations"]["enabled"] and not cond["theorem1"]["enabled"]
    skip = {"outdir", "ablations", "theorem1", "ict", "ect", "cd_cont", "ct_cont", "sct", "scd"}
    assert {k: v for k, v in cond.items() if k not in skip} == \
        {k: v for k, v in default.items() if k not in skip}


# Keys of the paper configs that shape no model or number (the hyperparameter table omits them).
LOGISTICS = ("outdir", "seed", "device", "threads", "dataset.path", "resources.",
             "evaluation.inception_weights", ".log_every", "sampling.batch",
             "published.")  # released files: their taus are described in each config


def _flat(node, prefix=""):
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and key != "tau":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _cell(text):
    """A table cell as a value: YAML, with PyYAML's dotless exponents (8.0e-6 is a float, 8e-6
    a string) read as floats too."""
    value = yaml.safe_load(text)
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def test_hyperparameter_table_matches_the_configs():
    """docs/hyperparameters.md: every cell is its config's value, '-' where the file sets none,
    and every key that shapes a model or a number has a row with a source."""
    names = ["cifar10", "imagenet64", "lsun_bedroom256", "lsun_cat256"]
    flat = {n: _flat(yaml.safe_load((ROOT / "config" / f"{n}.yaml").read_text())) for n in names}
    text = (ROOT / "docs" / "hyperparameters.md").read_text()
    rows = re.findall(r"^\| `([\w.]+)` \|(.*)\|$", text, re.M)
    table = {}
    for key, rest in rows:
        *cells, source = [c.strip() for c in rest.split(" | ")]
        assert len(cells) == 4 and source, key
        table[key] = cells
        for name, cell in zip(names, cells, strict=True):
            if cell == "-":
                assert key not in flat[name], f"{key} is set in {name}.yaml"
            else:
                assert _cell(cell) == flat[name].get(key), f"{key} of {name}: {cell}"
    shaping = {k for f in flat.values() for k in f
               if not any(k == s or k.startswith(s) or k.endswith(s) for s in LOGISTICS)}
    assert shaping <= set(table), sorted(shaping - set(table))
