"""The prepared data set file, written and read row by row: training never holds the data set.

Format: an uncompressed npz (a zip of .npy members, as ``np.savez`` writes it): ``labels``
(int64, n) and ``arr_0`` (n rows: uint8 NHWC images, or float32 points). Why this format:
numpy and the official evaluators read it as it is; it is written one image at a time (an
image folder of any size prepares in flat memory); and an uncompressed member is one contiguous
block at a fixed offset of the file, so row i is one ``os.pread`` at offset + i * row bytes:
exact random access by index, which keeps each step's examples those its seed draws (any number
of ranks, any micro-batch split, any resume). The price is disk: decoded uint8 (ImageNet 64:
15.7 GB; LSUN bedroom 256: about 590 GB), about three times EDM's zip of PNGs, which would
instead cost a PNG decode per example and step. Sequential shard formats (webdataset, litdata)
give streams, not rows by index.

API:
    write_prepared(path, labels, row_shape, dtype, chunks)   stream arrays of rows to a file
    save_prepared(path, x, labels)                           one array
    load_prepared(path) -> (x, labels)                       all of it in memory (small steps)
    PreparedFile(path): .n, .shape, .dtype, .rows(i), .labels(i), .all_labels(), .fingerprint()

"""

import hashlib
import os
import struct
import zipfile

import numpy as np

from cmcore.data import DataError
from cmcore.files import atomic

_FORMAT = np.lib.format
_SHA = b"cmcore-sha256:"


def _content_hash(dtype, shape):
    """SHA-256 of arr_0's content, started with its dtype and shape (then fed its bytes)."""
    return hashlib.sha256(f"{np.dtype(dtype).str}:{tuple(shape)};".encode())


def write_prepared(path, labels, row_shape, dtype, chunks):
    """Write labels, then arr_0 of len(labels) rows of ``row_shape`` and ``dtype`` from the
    arrays ``chunks`` yields (any number of rows each), atomically."""
    labels = np.asarray(labels, np.int64)
    dtype, shape = np.dtype(dtype), (len(labels), *row_shape)
    written, h = 0, _content_hash(dtype, shape)
    with atomic(path, ".npz") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
        with z.open("labels.npy", "w", force_zip64=True) as f:
            _FORMAT.write_array(f, labels)
        with z.open("arr_0.npy", "w", force_zip64=True) as f:
            _FORMAT.write_array_header_1_0(f, {"descr": _FORMAT.dtype_to_descr(dtype),
                                              "fortran_order": False, "shape": shape})
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype)
                if chunk.shape[1:] != tuple(row_shape):
                    raise DataError(f"rows of shape {chunk.shape[1:]} in a data set of "
                                    f"{tuple(row_shape)} rows; all images must have one size")
                f.write(chunk.tobytes())
                h.update(chunk.tobytes())
                written += len(chunk)
        if written != len(labels):
            raise DataError(f"{written} rows for {len(labels)} labels while writing {path}")
        z.comment = _SHA + h.hexdigest().encode()  # the content's identity, read in O(1)


def save_prepared(path, x, labels):
    """Write the prepared data set (arr_0 = x, labels), atomically."""
    write_prepared(path, labels, x.shape[1:], x.dtype, [x])


def load_prepared(path):
    """(data, labels), all in memory, from a file written by ``write_prepared``."""
    if not os.path.isfile(path):
        raise DataError(f"prepared data {path} is missing; run `cm prepare-data` first")
    with np.load(path) as f:
        return f["arr_0"], f["labels"]


class _Member:
    """One uncompressed .npy member of a zip: its shape, dtype and data offset."""

    def __init__(self, file, info, path):
        if info.compress_type != zipfile.ZIP_STORED:
            raise DataError(f"{path}: {info.filename} is compressed; prepared data is read by "
                            "rows from an uncompressed npz: run `cm prepare-data` again")
        file.seek(info.header_offset)
        local = file.read(30)  # the zip local file header; name and extra field lengths at 26
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        file.seek(info.header_offset + 30 + name_len + extra_len)
        version = _FORMAT.read_magic(file)
        read = _FORMAT.read_array_header_1_0 if version == (1, 0) else \
            _FORMAT.read_array_header_2_0
        self.shape, fortran, self.dtype = read(file)
        if fortran or self.dtype.hasobject:
            raise DataError(f"{path}: {info.filename} is not a C-ordered numeric array")
        self.offset = file.tell()
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


class PreparedFile:
    """Rows of a prepared file read by index with os.pread: memory holds the rows asked for,
    never the data set. Safe to use from DataLoader workers (each process opens its own
    descriptor)."""

    def __init__(self, path):
        if not os.path.isfile(path):
            raise DataError(f"prepared data {path} is missing; run `cm prepare-data` first")
        self.path = path
        try:
            with open(path, "rb") as file, zipfile.ZipFile(file) as z:
                infos = {info.filename: info for info in z.infolist()}
                missing = {"arr_0.npy", "labels.npy"} - set(infos)
                if missing:
                    raise DataError(f"{path} lacks {', '.join(sorted(missing))}; run "
                                    "`cm prepare-data` again")
                self.x, self.y = (_Member(file, infos[f"{n}.npy"], path)
                                  for n in ("arr_0", "labels"))
                self.comment = z.comment
        except (zipfile.BadZipFile, ValueError, OSError, struct.error) as e:
            raise DataError(f"{path} is not a readable prepared data file ({type(e).__name__}: "
                            f"{e}); run `cm prepare-data` again") from None
        self.n, self.shape, self.dtype = self.x.shape[0], self.x.shape, self.x.dtype
        self._fd, self._pid = None, None

    def _descriptor(self):
        if self._pid != os.getpid():  # a forked DataLoader worker opens its own
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def _read(self, member, indices):
        indices = np.asarray(indices, np.int64).reshape(-1)
        out = np.empty((len(indices), *member.shape[1:]), member.dtype)
        buffer, fd = out.reshape(len(indices), -1).view(np.uint8), self._descriptor()
        for j, i in enumerate(indices):
            if not 0 <= i < member.shape[0]:
                raise IndexError(f"row {i} of {member.shape[0]} in {self.path}")
            buffer[j] = np.frombuffer(
                os.pread(fd, member.row_bytes, member.offset + int(i) * member.row_bytes),
                np.uint8)
        return out

    def rows(self, indices):
        """arr_0[indices] (a new array)."""
        return self._read(self.x, indices)

    def labels(self, indices):
        """labels[indices]."""
        return self._read(self.y, indices)

    def all_labels(self):
        return self._read(self.y, np.arange(self.n))

    def fingerprint(self, chunk=1 << 24):
        """Hex SHA-256 of arr_0 (its dtype, shape and bytes): the identity of a run's data by
        content. Recorded in the file by write_prepared; computed by reading it otherwise."""
        if self.comment.startswith(_SHA):
            return self.comment[len(_SHA):].decode()
        h, fd = _content_hash(self.dtype, self.shape), self._descriptor()
        total = self.n * self.x.row_bytes
        for start in range(0, total, chunk):
            h.update(os.pread(fd, min(chunk, total - start), self.x.offset + start))
        return h.hexdigest()

    def close(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
