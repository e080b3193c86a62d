"""Checkpoint files: the final checkpoint of a training run and the resume file it continues from.

Both are ``torch.save`` of plain tensors, numbers, strings, lists and dicts (loaded with
``weights_only=True``), written to a temporary file and renamed, so a reader never sees half a
file.

The resume file of a run whose output is ``<out>`` is ``<out>.partial`` (beside it). It is
written every ``ckpt_every`` iterations and when SIGTERM, SIGUSR1 or Ctrl-C arrives, and holds
the online model, optimizer, evaluation EMA, target network, step k, the CSV rows logged so
far, torch's global RNG states (CPU and CUDA) and, for PD, the stage and the finished stages.
``<out>`` itself is written only when training completes; the resume file is deleted right
after. A resume file is used only by the same run: same method, same settings of that method
(``ckpt_every``, ``threads`` and ``resources`` aside) and the same data and teacher (SHA-256 of
their content).
"""

import contextlib
import hashlib
import os
import signal
import sys
import threading

import torch

from cmcore import dag
from cmcore.errors import CheckpointError
from cmcore.files import atomic

FORMAT = "cmcore-checkpoint/1"
RESUME_FORMAT = "cmcore-resume/2"  # 2: per-step seeded draws, no RNG states
# Ctrl-C (SIGINT) too: a stop request saves the resume file at the end of the step.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(SystemExit):
    """Training stopped on SIGTERM, SIGUSR1 or SIGINT after writing its resume file.

    A SystemExit, so ``cm train`` (and any caller that does not catch it) exits with status
    128 + signal number: 143 for SIGTERM, 138 for SIGUSR1, as if killed by that signal. Running
    the same command again resumes. ``str(e)`` is the one-line message.
    """

    def __init__(self, message, signum):
        super().__init__(128 + signum)
        self.message, self.signum = message, signum

    def __str__(self):
        return self.message


def save_checkpoint(path, payload):
    """torch.save to a temporary file of this process, then rename: a reader never sees a
    partial file; a failed write (full disk, read-only folder) removes its temporary file."""
    try:
        with atomic(path) as tmp:
            torch.save(payload, tmp)
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from None


@contextlib.contextmanager
def output_lock(out_path):
    """Hold ``<out>.lock`` while this process writes ``out_path`` (its resume file and log): a
    second run on the same output refuses in one line instead of interleaving. The lock is an
    flock (released by the kernel if the process dies); the file is removed on exit."""
    import fcntl

    lock = f"{out_path}.lock"
    os.makedirs(os.path.dirname(lock) or ".", exist_ok=True)
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointError(f"{out_path} is being written by another run (it holds "
                                  f"{lock}); wait for that run or stop it") from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break  # not a file that its previous holder removed meanwhile
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)
        os.close(fd)


def load_checkpoint(path):
    """A cmcore checkpoint (plain tensors and config only, loaded with weights_only=True)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found; run the training step that writes it")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or pickled-class files all land here
        raise CheckpointError(
            f"{path} is not a readable cmcore checkpoint ({type(e).__name__}); delete it and "
            "re-run the step that writes it") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cmcore checkpoint (no format tag {FORMAT!r})")
    return ckpt


def fingerprint(value):
    """Hex SHA-256 of an array, a tensor or a state dict of tensors (None for None): the
    identity of a run's inputs by content, blind to file timestamps."""
    if value is None:
        return None
    h = hashlib.sha256()
    items = value.items() if isinstance(value, dict) else [("", value)]
    for name, x in items:
        t = torch.as_tensor(x).detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_identity(cfg, method, data_sha256, teacher=None):
    """What a resume file must match: the method, the settings that shape the run (the view
    cmcore.dag.settings gives the DAG's train step, so the two cannot drift apart) and the
    content of the data (cmcore.prepared.PreparedFile.fingerprint) and of the teacher."""
    return {"method": method, "config": dag.settings(cfg, "train", method=method),
            "data_sha256": data_sha256, "teacher_sha256": fingerprint(teacher)}


class ResumeFile:
    """The resume file ``<out>.partial`` of one run, and the stop request of a signal.

    ``every``: iterations between periodic writes (0: none; a stop signal still writes one).
    ``extra``: a callable giving the method's own state (target network, PD stages) to add.
    """

    def __init__(self, out_path, identity, every):
        self.path, self.identity, self.every = f"{out_path}.partial", identity, every
        self.extra = dict
        self.stop = None  # the number of a stop signal that arrived, else None
        self.saved = None  # "<label> step <k>" of the last good state in self.path

    def _delete_hint(self, why):
        return CheckpointError(f"resume file {self.path} {why}; delete it to train from scratch")

    def load(self):
        """The saved state of this run, or None when there is no resume file."""
        if not os.path.exists(self.path):
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or foreign files
            raise self._delete_hint(f"is unreadable ({type(e).__name__})") from None
        if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
            raise self._delete_hint(f"has no format tag {RESUME_FORMAT!r}")
        theirs, mine = state.get("identity"), self.identity
        theirs = theirs if isinstance(theirs, dict) else {}
        differ = [k for k in mine if k != "config" and theirs.get(k) != mine[k]]
        if isinstance(theirs.get("config"), dict):
            differ += [f"config {k}" for k in mine["config"] if theirs["config"].get(k) !=
                       mine["config"][k]]
        else:
            differ.append("config")
        if differ:
            names = ", ".join(d.replace("_sha256", "") for d in differ)
            raise self._delete_hint(f"was written by another run (different {names})")
        self.saved = f"{state['label']} step {state['k']}"
        return state

    def save(self, state):
        save_checkpoint(self.path, {"format": RESUME_FORMAT, "identity": self.identity,
                                    **state, **self.extra()})
        self.saved = f"{state['label']} step {state['k']}"

    def last_good(self):
        if self.saved is None:
            return "no resume checkpoint was written"
        return f"the last good resume checkpoint ({self.saved}) is at {self.path}"

    def preempted(self):
        name = signal.Signals(self.stop).name
        e = Preempted(f"stopped by {name} at {self.saved}; resume state saved to {self.path}; "
                      f"run the same command again to resume (exit {128 + self.stop})", self.stop)
        print(f"training: {e}", file=sys.stderr, flush=True)
        return e

    def remove(self):
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)

    @contextlib.contextmanager
    def catching_signals(self):
        """Turn SIGTERM/SIGUSR1/SIGINT into a stop request inside the block; restore the old
        handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return

        def handler(signum, frame):
            self.stop = signum

        previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)
