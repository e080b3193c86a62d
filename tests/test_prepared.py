"""The prepared data file (cmcore.prepared) and the training data path (cmcore.training.batches):
rows by index equal numpy's, an image folder prepares one image at a time, and a training job
reads exactly the rows its steps draw (never the whole data set), whatever the number of
DataLoader workers."""

import copy
import zipfile

import numpy as np
import pytest
import torch
from test_configs import image_folder

from cmcore import prepared
from cmcore.config import validate
from cmcore.data import DataError, dataset_rows, load_dataset
from cmcore.diffusion.rng import step_seed
from cmcore.prepared import PreparedFile, load_prepared, save_prepared, write_prepared
from cmcore.training.checkpoints import load_checkpoint
from cmcore.training.loop import train

CFG = {
    "dataset": {"name": "mixture", "num_points": 300, "xflip": True},
    "device": "cpu",
    "network": {"arch": "mlp", "hidden": 32, "depth": 2},
    "teacher": {"iters": 6, "batch": 16, "lr": 0.002, "log_every": 3},
    "cd": {"iters": 1, "batch": 8, "lr": 0.001, "N": 6},
    "ct": {"iters": 1, "batch": 8, "lr": 0.001},
    "pd": {"iters": 1, "batch": 8, "lr": 0.001, "start_steps": 2},
    "sampling": {"steps": [1]},
    "evaluation": {"feature_extractor": "inception", "inception_weights": __file__},
}


def test_rows_by_index_equal_numpys(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 5, 4, 3), dtype=np.uint8)
    points = rng.standard_normal((11, 2)).astype(np.float32)
    for name, x in (("images", images), ("points", points)):
        labels = np.arange(len(x)) % 3
        path = str(tmp_path / f"{name}.npz")
        save_prepared(path, x, labels)
        with np.load(path) as f:  # numpy reads the file as any npz
            assert np.array_equal(f["arr_0"], x) and np.array_equal(f["labels"], labels)
        data, i = PreparedFile(path), [3, 0, len(x) - 1, 3]
        assert (data.n, data.shape, data.dtype) == (len(x), x.shape, x.dtype)
        assert np.array_equal(data.rows(i), x[i]) and np.array_equal(data.labels(i), labels[i])
        # The identity recorded at writing equals the one computed by reading a plain npz.
        plain = str(tmp_path / f"{name}-numpy.npz")
        np.savez(plain, arr_0=x, labels=labels)
        assert PreparedFile(plain).fingerprint() == data.fingerprint()
        other = x.copy()
        other.flat[5] += 1
        save_prepared(plain, other, labels)
        assert PreparedFile(plain).fingerprint() != data.fingerprint()
        with pytest.raises(IndexError):
            data.rows([len(x)])


def test_bad_prepared_files_are_one_line(tmp_path):
    compressed = tmp_path / "c.npz"
    np.savez_compressed(compressed, arr_0=np.zeros((3, 2), np.float32), labels=np.zeros(3))
    with pytest.raises(DataError, match=r"arr_0.npy is compressed; .* run `cm prepare-data` "):
        PreparedFile(str(compressed))
    np.savez(tmp_path / "nolabels.npz", arr_0=np.zeros((3, 2), np.float32))
    with pytest.raises(DataError, match=r"lacks labels.npy; run `cm prepare-data` again$"):
        PreparedFile(str(tmp_path / "nolabels.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"is not a readable prepared data file \(BadZipFile"):
        PreparedFile(str(tmp_path / "junk.npz"))
    with pytest.raises(DataError, match=r"2 rows for 3 labels"):
        write_prepared(str(tmp_path / "short.npz"), [0, 1, 2], (2,), np.float32,
                       [np.zeros((2, 2))])
    assert not (tmp_path / "short.npz").exists()  # nothing half-written is left


def test_an_image_folder_prepares_one_image_at_a_time(tmp_path, monkeypatch):
    folder = image_folder(tmp_path / "images", per_class=3, size=(12, 10))
    cfg = {"name": "image_folder", "path": str(folder), "resolution": 8}
    labels, row_shape, dtype, rows = dataset_rows(cfg)
    chunks = []

    def recording(path, labels, row_shape, dtype, rows):
        for chunk in rows:
            chunks.append(chunk.shape)
            yield chunk
    out = str(tmp_path / "data.npz")
    write_prepared(out, labels, row_shape, dtype, recording(out, labels, row_shape, dtype, rows))
    assert chunks == [(1, 8, 8, 3)] * 6  # never more than one decoded image at a time
    x, y = load_prepared(out)
    want_x, want_y = load_dataset(cfg)
    assert np.array_equal(x, want_x) and np.array_equal(y, want_y) and list(y) == [0] * 3 + [1] * 3


def drawn_rows(n, iters, batch, seed=0, stage="teacher"):
    """The data indices steps 0..iters-1 draw (cmcore.training.batches), computed here."""
    return [np.random.Generator(np.random.Philox(step_seed(seed, stage, k, "data")))
            .integers(0, n, batch) for k in range(iters)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prepared")
    cfg = validate(copy.deepcopy(CFG))
    path = str(tmp / "data.npz")
    save_prepared(path, *load_dataset(cfg["dataset"], seed=0))
    return cfg, path, tmp


def test_training_reads_the_rows_its_steps_draw_and_nothing_else(data, monkeypatch):
    cfg, path, tmp = data
    read, real = [], PreparedFile.rows

    def rows(self, indices):
        read.append(np.array(indices))
        return real(self, indices)
    monkeypatch.setattr(PreparedFile, "rows", rows)
    monkeypatch.setattr(np, "load", None)  # no whole-file read on the training path
    monkeypatch.setattr(prepared, "load_prepared", None)
    torch.set_num_threads(1)
    train(cfg, "teacher", path, str(tmp / "w0" / "checkpoint.pt"), echo=lambda s: None)
    assert len(read) == 1 + cfg["teacher"]["iters"]  # row 0 for the shape, then one per step
    assert np.array_equal(read[0], [0])
    for got, want in zip(read[1:], drawn_rows(300, 6, 16), strict=True):
        assert np.array_equal(got, want)


def test_dataloader_workers_train_what_the_training_process_trains(data):
    cfg, path, tmp = data
    torch.set_num_threads(1)
    outs = {}
    for workers in (0, 2):
        out = tmp / f"workers{workers}" / "checkpoint.pt"
        train(cfg, "teacher", path, str(out), echo=lambda s: None, workers=workers)
        outs[workers] = load_checkpoint(str(out))
    for key, value in outs[0]["ema"].items():
        assert torch.equal(outs[2]["ema"][key], value), key
    init = tmp / "init" / "checkpoint.pt"  # the same initialisation, no step taken
    train(cfg, "untrained", path, str(init), echo=lambda s: None)
    untrained = load_checkpoint(str(init))["model"]
    assert any(not torch.equal(untrained[k], v) for k, v in outs[0]["model"].items())


def test_zip_members_are_stored_uncompressed(data):
    _, path, _ = data
    with zipfile.ZipFile(path) as z:
        assert {i.filename: i.compress_type for i in z.infolist()} == {
            "labels.npy": zipfile.ZIP_STORED, "arr_0.npy": zipfile.ZIP_STORED}
