"""Reading and writing checkpoints: one loading policy for official `.pth` files and our safetensors files.

Policy (spec §3, improved): unwrap `model`/`module`, strip `module.`/`_orig_mod.`, convert official names, resample
the vision position table to the model's grid (square or not), drop a declared head whose shape differs, then
compare key sets. Strict loading (the default) raises a `ValueError` with a readable report when a backbone key is
missing, a shape cannot be reconciled, or an unknown key is left over; benign differences of the official workflow
(a pretrained file's final LayerNorm or pretraining heads loaded into a task model, a fresh task head) are allowed
and reported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from imglish.model.convert import from_official, is_official_state_dict, unwrap_state_dict
from imglish.model.layers import resample_position_table, square_grid

__all__ = ["FORMAT", "LoadReport", "convert_checkpoint", "load_checkpoint", "read_checkpoint", "save_model"]

FORMAT = "imglish/1"
_POS_KEYS = ("beit3.vision_pos_embed", "vision_pos_embed")
# Keys a pretrained file may carry that a fine-tuning model does not use (spec §3 "what is missing or left over").
_BENIGN_UNEXPECTED_PREFIXES = ("mim_head.", "mlm_head.", "cls_head.", "cls_head_norm.", "beit3.norm.", "norm.")


@dataclass
class LoadReport:
    """What happened when a checkpoint was loaded into a model."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dropped_heads: list[str] = field(default_factory=list)
    resized: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    not_held: list[str] = field(default_factory=list)
    source_format: str = ""

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.dropped_heads)

    def __str__(self) -> str:
        lines = [f"checkpoint format: {self.source_format or 'unknown'}"]
        for title, items in (
            ("resized", [f"{k}: {list(a)} -> {list(b)}" for k, a, b in self.resized]),
            ("skipped (a modality this model does not hold, BEiT3Config.modalities)", self.not_held),
            ("dropped (head of another shape, re-initialised)", self.dropped_heads),
            ("missing from the checkpoint (left as initialised)", self.missing),
            ("unexpected (in the checkpoint, not in the model)", self.unexpected),
            ("shape mismatch (checkpoint vs model)", [f"{k}: {list(a)} vs {list(b)}" for k, a, b in self.mismatched]),
        ):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"{title}: {len(items)}")
                lines.extend(f"  {item}" for item in shown)
        if len(lines) == 1:
            lines.append("all keys matched")
        return "\n".join(lines)


_ACCEPTED = (
    "imglish reads .safetensors files, and torch files (.pth, .pt, .bin) that hold only tensors, dicts, lists, "
    "numbers and strings (torch.load with weights_only=True)"
)


def safe_torch_load(path: str | os.PathLike, allowed: Sequence[type] = ()) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that say what is wrong with the file.

    imglish never unpickles arbitrary Python objects, so torch's advice to retry with ``weights_only=False`` is
    never passed on: a file that needs it is refused with the name of the object it holds.

    Args:
        allowed: classes let through the safe unpickler besides torch's own (e.g. ``argparse.Namespace``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a valid checkpoint (corrupt, truncated, another format) or holds Python
            objects besides tensors; the message names the file and the accepted formats.
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found:
            raise ValueError(
                f"{path} holds a Python object ({found.group(1)}) besides tensors, which imglish does not unpickle: "
                f"{_ACCEPTED}. Save the weights alone (torch.save(model.state_dict(), FILE)) or as safetensors."
            ) from None
        raise ValueError(f"{path} is not a valid checkpoint (not a torch file, or a corrupt one): {_ACCEPTED}.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        reason = str(err).split(". ")[0].strip().rstrip(".")
        raise ValueError(
            f"{path} is not a valid checkpoint (corrupt or truncated? torch says: {reason}): {_ACCEPTED}."
        ) from None


def read_checkpoint(path: str | os.PathLike, model_key: str = "model|module") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint file safely: safetensors, or `torch.load(weights_only=True)` for `.pth`/`.pt`/`.bin`.

    Training checkpoints of the official scripts carry an `argparse.Namespace` of arguments beside the weights; it is
    allowed through the safe unpickler and nothing else is.

    Returns:
        `(state_dict, metadata)`: for safetensors the header metadata (JSON values decoded); for torch files the
        top-level entries that are not the weights (e.g. `epoch`, `args`, a saved config).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, tensors=True)[:2]
    obj = safe_torch_load(path, allowed=[argparse.Namespace])
    state = unwrap_state_dict(obj, model_key)
    meta = {}
    if isinstance(obj, Mapping):
        meta = {k: v for k, v in obj.items() if k not in model_key.split("|") and not isinstance(v, Tensor)}
    return state, meta


def _read_safetensors(
    path: Path, tensors: bool, skip: Callable[[str], bool] | None = None
) -> tuple[dict[str, Tensor], dict[str, Any], list[str]]:
    """A safetensors file's tensors (when ``tensors``; those whose names ``skip`` accepts are not read), header
    metadata (JSON values decoded) and the names skipped."""
    from safetensors import SafetensorError, safe_open

    skipped: list[str] = []
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw_meta = handle.metadata() or {}
            state = {}
            for name in handle.keys() if tensors else ():
                if skip is not None and skip(name):
                    skipped.append(name)
                else:
                    state[name] = handle.get_tensor(name)
    except SafetensorError as err:
        raise ValueError(f"{path} is not a valid safetensors file (corrupt or truncated? {err}).") from None
    meta: dict[str, Any] = {}
    for key, value in raw_meta.items():
        try:
            meta[key] = json.loads(value)
        except (TypeError, json.JSONDecodeError):
            meta[key] = value
    return state, meta, skipped


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata :func:`read_checkpoint` returns, without reading a safetensors file's tensors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return _read_safetensors(path, tensors=False)[1]
    return read_checkpoint(path)[1]


def _model_grid(model: nn.Module) -> tuple[int, int] | None:
    backbone = getattr(model, "beit3", model)
    config = getattr(backbone, "config", None)
    return config.grid_size if config is not None else None


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Tensor],
    *,
    strict: bool = True,
    model_prefix: str = "",
    source_grid: tuple[int, int] | None = None,
    antialias: bool = False,
) -> LoadReport:
    """Load an official or imglish checkpoint into `model` and return a `LoadReport`.

    Args:
        model: an imglish model (task model or bare backbone).
        checkpoint: a file path, or a state dict (official or ours; `model`/`module` wrappers are unwrapped).
        strict: raise a ValueError with the report on missing backbone keys, unresolved shape mismatches or unknown
            unexpected keys. With `strict=False` everything that fits is loaded and the report says what did not.
        model_prefix: a prefix in front of every key of the checkpoint (the official `--model_prefix`).
        source_grid: patch grid (rows, cols) of the checkpoint's vision position table, when it is not square and
            not recorded in our metadata.
        antialias: antialias when the position table is shrunk.
    """
    meta: dict[str, Any] = {}
    backbone = getattr(model, "beit3", model)
    not_held: list[str] = []
    one_modality = hasattr(backbone, "holds_key") and len(backbone.config.modalities) < 2
    if one_modality and not model_prefix and isinstance(checkpoint, (str, os.PathLike)) \
            and Path(checkpoint).suffix == ".safetensors" and Path(checkpoint).is_file():
        # a one-modality model does not read the other modality's tensors (the names follow the same A/B scheme
        # in the official layout)
        state, meta, not_held = _read_safetensors(
            Path(checkpoint), True, lambda k: not backbone.holds_key(k.removeprefix("beit3."))
        )
    elif isinstance(checkpoint, (str, os.PathLike)):
        state, meta = read_checkpoint(checkpoint)
    else:
        state = unwrap_state_dict(checkpoint)
    if model_prefix:
        state = {k[len(model_prefix):]: v for k, v in state.items() if k.startswith(model_prefix)}
        if not state:
            raise ValueError(f"no key of the checkpoint starts with model_prefix {model_prefix!r}")

    report = LoadReport(not_held=not_held)
    if is_official_state_dict(state):
        report.source_format = "official"
        state = from_official(state)
    else:
        report.source_format = "imglish"
    if source_grid is None and isinstance(meta.get("config"), dict):
        img, patch = meta["config"].get("img_size"), meta["config"].get("patch_size")
        if img and patch:
            source_grid = (int(img[0]) // int(patch), int(img[1]) // int(patch))

    target = model.state_dict()
    # A bare backbone checkpoint into a task model, or a task checkpoint into a bare backbone.
    target_prefixed = any(k.startswith("beit3.") for k in target)
    source_prefixed = any(k.startswith("beit3.") for k in state)
    if target_prefixed and not source_prefixed:
        state = {(k if k in target else f"beit3.{k}"): v for k, v in state.items()}
    elif source_prefixed and not target_prefixed:
        state = {k[len("beit3."):]: v for k, v in state.items() if k.startswith("beit3.")}

    # Position table: resample to the model's grid.
    grid = _model_grid(model)
    for key in _POS_KEYS:
        if key in state and key in target and state[key].shape != target[key].shape and grid is not None:
            old = state[key]
            old_grid = source_grid or square_grid(old.shape[0] - 3)
            state[key] = resample_position_table(old, old_grid, grid, antialias=antialias)
            report.resized.append((key, tuple(old.shape), tuple(state[key].shape)))

    # Heads of another shape (e.g. another number of classes) are dropped and stay freshly initialised.
    for key in getattr(model, "head_keys", ()):
        if key in state and key in target and state[key].shape != target[key].shape:
            del state[key]
            report.dropped_heads.append(key)

    # A one-modality model (BEiT3Config.modalities) skips the other modality's weights.
    if hasattr(backbone, "holds_key"):
        prefix = "beit3." if target_prefixed else ""
        for key in [k for k in state if k not in target and k.startswith(prefix)]:
            if not backbone.holds_key(key[len(prefix):]):
                del state[key]
                report.not_held.append(key)

    loadable: dict[str, Tensor] = {}
    for key, value in state.items():
        if key not in target:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(target[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(target[key].shape)))
        else:
            loadable[key] = value
    report.missing = [k for k in target if k not in state]

    if strict:
        hard_missing = [k for k in report.missing if k.startswith("beit3.") or not target_prefixed]
        if report.source_format == "imglish" and meta.get("task") == getattr(model, "task", None):
            hard_missing = report.missing  # same task, our own file: nothing may be missing
        hard_unexpected = [
            k for k in report.unexpected if not k.startswith(_BENIGN_UNEXPECTED_PREFIXES)
        ]
        if report.mismatched or hard_missing or hard_unexpected:
            raise ValueError(
                "checkpoint does not fit this model (is it for another architecture or size?)\n" + str(report)
            )
    missing_now, unexpected_now = model.load_state_dict(loadable, strict=False)
    assert not unexpected_now, unexpected_now
    return report


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    extra_metadata: Mapping[str, Any] | None = None,
    processor: Any = None,
) -> Path:
    """Write `model` in our format: a safetensors file with the config and task in its metadata (atomically).

    A `Processor` given as `processor` is saved next to the file (`processor.json` and the tokenizer model), where
    `imglish.create_model_and_processor(None, pretrained=path)` finds it.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    backbone = getattr(model, "beit3", model)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "task": getattr(model, "task", "backbone"),
        "config": backbone.config.to_dict(),
        "task_kwargs": model.task_kwargs() if hasattr(model, "task_kwargs") else {},
    }
    name = getattr(model, "model_name", None)
    if name:
        meta["model_name"] = name
    meta.update(extra_metadata or {})
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic(path, lambda tmp: save_file(state, tmp, metadata={k: json.dumps(v) for k, v in meta.items()}))
    if processor is not None:
        processor.save_next_to(path)
    return path


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    num_heads: int | None = None,
) -> Path:
    """Convert between the official layout and ours, losslessly, by file extension of `dst`.

    - `dst` ending in `.safetensors`: `src` (official `.pth`) becomes an imglish file whose metadata records the
      inferred config and task, so `create_model(None, pretrained=dst)` rebuilds the model.
    - any other `dst` (`.pth`): `src` (imglish `.safetensors`) becomes an official file `{"model": state_dict}`.

    Every tensor is carried over unchanged (keys the model would not use, e.g. pretraining heads, included), so
    official -> imglish -> official gives back the original tensors bitwise.
    """
    from imglish.model.convert import from_official, infer_official_config, infer_task, to_official

    src, dst = Path(src), Path(dst)
    state, meta = read_checkpoint(src)
    official = is_official_state_dict(state)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix == ".safetensors":
        if not official:
            raise ValueError(f"{src} is already in the imglish layout; choose a .pth destination to export it")
        from safetensors.torch import save_file

        config = infer_official_config(state, num_heads=num_heads)
        task, task_kwargs = infer_task(state)
        ours = {k: v.contiguous() for k, v in from_official(state).items()}
        meta = {"format": FORMAT, "task": task, "config": config, "task_kwargs": task_kwargs, "converted_from": src.name}
        _atomic(dst, lambda tmp: save_file(ours, tmp, metadata={k: json.dumps(v) for k, v in meta.items()}))
    else:
        if official:
            raise ValueError(f"{src} is already in the official layout; choose a .safetensors destination")
        out = to_official(state)
        _atomic(dst, lambda tmp: torch.save({"model": out}, tmp))
    return dst


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
