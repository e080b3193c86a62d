"""Writing result files atomically: a reader never sees a partial file, and a failed write (a
full disk, a read-only folder) leaves nothing behind."""

import contextlib
import os


@contextlib.contextmanager
def atomic(path, suffix=""):
    """Yield a temporary path of this process beside ``path`` (ending in ``suffix``, as np.savez
    needs '.npz'); rename it to ``path`` when the block ends, remove it if the block fails.
    The folder of ``path`` is made if missing."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
