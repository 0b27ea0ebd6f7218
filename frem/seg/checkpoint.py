"""Checkpoints written so that a killed run never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

LAST = "last.pt"  # everything needed to resume, rewritten every epoch
BEST = "best.pt"  # the best validation mIoU model, what evaluate and predict use
METRICS = "metrics.json"


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save(obj, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def save_json(obj, path: Path) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def load(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # weights_only=False: our own files carry configs and RNG states, not just tensors.
    return torch.load(path, map_location=map_location, weights_only=False)
