"""Checkpoints and run folders: nothing half-written, nothing lost, nothing run from a file.

Every file is written to a temporary name in the same folder, flushed, renamed
over the old one and the folder synced, so a killed run or a power cut leaves
either the old file or the new one. Checkpoints hold tensors and plain
containers only and are read with ``weights_only=True``: a ``best.pt``
someone sends cannot run code. A run folder is locked while a process trains
in it (an OS lock, gone with the process).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import pickle
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

LAST = "last.pt"  # everything needed to resume, rewritten every epoch
BEST = "best.pt"  # the best validation mIoU model, what evaluate and predict use
METRICS = "metrics.json"
LOCK = ".lock"
REQUIRED = ("config", "model", "classes", "in_channels", "normalization")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class WriteError(OSError):
    """A write that failed (a full disk, most often); the earlier files are intact."""


class RunLocked(ValueError):
    """Another process is training in this run folder."""


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _user_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class _Recorded:
    """The file a writer writes to, keeping the OSError of a failed write: torch.save reports a full disk
    as "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos ...", the errno lost."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        return self.file.flush()


AGAIN = "run the same command again"        # what continues most commands after a failed write
RESUME = "run the same command with --resume to continue"  # ... and a training run


def atomic_write(path: Path, write, again: str = AGAIN) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``. ``again``: what the
    user runs to continue, said where the write fails."""
    with atomic_path(path, again) as tmp:
        recorded = None
        try:
            with open(tmp, "wb") as f:
                recorded = _Recorded(f)
                write(recorded)
        except BaseException:  # torch.save reports a full disk as a RuntimeError: the OSError underneath counts
            if recorded is not None and recorded.error is not None:
                raise recorded.error from None
            raise


@contextmanager
def atomic_path(path: Path, again: str = AGAIN):
    """A temporary path in ``path``'s folder to write a file at, by any means (Pillow, tifffile): synced and
    renamed over ``path`` when the block ends, removed if it fails or is interrupted, so ``path`` is whole or
    absent (a SIGKILL leaves only a ``.NAME.*.tmp``, which ``clean_stale_temporaries`` removes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _user_mode())  # mkstemp makes it 0600
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except BaseException as error:
        message = _write_failure(path, error, again) if isinstance(error, (OSError, RuntimeError)) else None
        Path(tmp).unlink(missing_ok=True)  # after looking at the free space: this frees it again
        if message is not None:
            raise WriteError(message) from None
        raise


# What a failed write's errno means to a user; anything else is named as the OS named it.
FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "your disk quota is used up",
        errno.EFBIG: "the file is larger than this file system or process allows"}


def _write_failure(path: Path, error: BaseException, again: str = AGAIN) -> str:
    code = getattr(error, "errno", None)
    reason = FULL.get(code)
    if reason is None and code is None and shutil.disk_usage(path.parent).free < 2**20:
        reason = FULL[errno.ENOSPC]  # an error that lost its errno on a disk with under a mebibyte left
    if reason is None:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0]}" if str(error) else type(error).__name__
    return f"could not write {path}: {reason}. The files written before it are intact: free some space and {again}"


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files a killed write left behind (call with the run lock held)."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save(obj, path: Path, again: str = RESUME) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), again)


def strict_json(obj):
    """``obj`` with every NaN and infinity as ``None``: JSON without the non-standard tokens."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def save_json(obj, path: Path, again: str = AGAIN) -> None:
    text = json.dumps(strict_json(obj), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()), again)


def load(path: Path, hint: str = "", required=REQUIRED) -> dict:
    """A checkpoint's contents, or one ``CheckpointError`` naming the file and what to do."""
    path = Path(path)
    advice = f"; {hint}" if hint else ""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}" + (f": {hint}" if hint else ""))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # A well-formed pickle that names a callable or class: what runs code on load.
        if "Unsupported global" in str(error):
            raise CheckpointError(
                f"refused {path}: it holds Python objects besides tensors and plain containers, "
                "and loading those can run code. frem checkpoints never do; load only files you "
                "trust with torch.load(weights_only=False) yourself") from None
        raise CheckpointError(f"{path} is damaged (not a readable checkpoint: {unpickler_reason(error)}){advice}"
                              ) from None
    except MemoryError:
        raise
    except Exception as error:  # a damaged file fails the unpickler in many ways (IndexError on a lone STOP)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path} is damaged (truncated or not a checkpoint: {reason}){advice}") from None
    missing = [key for key in required if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a frem checkpoint (it lacks {', '.join(missing)}){advice}")
    return state


def unpickler_reason(error: BaseException) -> str:
    """The reason in torch's "Weights only load failed ... WeightsUnpickler error: REASON" message:
    REASON stands on that line (torch < 2.6) or on the next non-empty one (2.6 and later)."""
    message = str(error)
    after = message.split("error:", 1)[1] if "error:" in message else ""
    return next((line.strip() for line in after.splitlines() if line.strip()), "not a checkpoint")


@contextmanager
def run_lock(folder: Path):
    """Hold ``folder/.lock`` while a run writes there; a second process is refused at once."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise RunLocked(f"{folder} is in use by {owner}: wait for it to finish, or choose "
                            "another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"frem (pid {os.getpid()})")
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock; the OS releases it if the process dies
