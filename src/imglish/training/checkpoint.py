"""Training checkpoints: atomic writes, the newest K kept, resume from the newest; final model export.

A checkpoint is one ``torch.save`` file ``step-XXXXXXXX.pt`` in ``OUT/checkpoints/`` holding plain tensors and
Python scalars only, so it loads with ``torch.load(weights_only=True)``:

``format``, ``step``, ``model`` (the unwrapped module's full state dict: no ``module.`` or ``_orig_mod.``),
``optimizer``, ``scheduler``, ``rng`` (python, numpy, torch and CUDA states of every rank), ``data`` (the data
position), ``counters`` (skipped steps and so on) and ``config`` (the resolved :class:`TrainConfig` as a dict).

Each file is written to a temporary name in the same folder, flushed to disk and renamed, so a run killed at any
moment leaves either the previous checkpoint set or the new one, never a partial file under a final name.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointManager",
    "atomic_torch_save",
    "get_rng_state",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "imglish-train-ckpt/1"
_NAME = re.compile(r"^step-(\d{8,})\.pt$")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the destination folder, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def get_rng_state() -> dict[str, Any]:
    """The RNG states of python, numpy, torch (CPU) and CUDA (when present) as weights_only-safe values."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Saves, prunes and finds checkpoints in one folder.

    Args:
        directory: where ``step-XXXXXXXX.pt`` files live (created on first save).
        keep_last: how many of the newest checkpoints to keep; older ones are deleted after each save.
    """

    def __init__(self, directory: str | os.PathLike, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        """The file name of the checkpoint taken after ``step`` optimizer steps."""
        return self.directory / f"step-{step:08d}.pt"

    def list(self) -> list[tuple[int, Path]]:
        """Existing checkpoints as ``(step, path)``, oldest first (temporary files are ignored)."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write ``state`` (plus ``format`` and ``step``) atomically, then delete all but the newest K.

        Returns:
            The path written.
        """
        payload = dict(state)
        payload["format"] = CHECKPOINT_FORMAT
        payload["step"] = int(step)
        path = self.path_for(step)
        atomic_torch_save(payload, path)
        for _, old in self.list()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        for stale in self.directory.glob(".step-*.tmp"):  # left by a run killed while writing
            stale.unlink(missing_ok=True)
        return path

    @staticmethod
    def load(path: str | os.PathLike) -> dict[str, Any]:
        """Read one checkpoint with ``torch.load(weights_only=True)`` on CPU.

        Raises:
            ValueError: if the file is not an imglish training checkpoint.
        """
        from imglish.model.loading import safe_torch_load

        state = safe_torch_load(path)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{str(path)!r} is not an imglish training checkpoint ({CHECKPOINT_FORMAT})")
        return state

    def latest(self) -> Path | None:
        """The newest checkpoint file, or ``None`` when there is none."""
        found = self.list()
        return found[-1][1] if found else None
