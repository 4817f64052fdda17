"""Evaluation of every task, single- or multi-process, and the scoring of a predictions file.

* :func:`predict_split` runs a task's :meth:`~imglish.tasks.Task.predict` over each of its evaluation sets: rank
  ``r`` of ``W`` takes records ``r, r + W, ...`` (no padding, so no record is duplicated or dropped, whatever the
  split's size), and the plain records of all ranks are gathered and put back in order on every rank. Retrieval
  encodes each unique image once and gathers the embeddings, so 2 processes give what 1 gives.
* :func:`evaluate` loads a checkpoint (imglish ``.safetensors`` or an official ``.pth`` with ``model=``), runs the
  split and writes ``OUT/metrics.json`` and ``OUT/predictions.json`` (the task's submission format).
* :func:`score` reads a predictions file made by any code and scores it with the same function.

``metrics.json`` is ``{"task", "split", "metrics": {...}, "skipped": N, "bad_records": {...}}`` with the metrics in
percent, as the official code reports them.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from imglish.training import parallel
from imglish.training.streams import move_to_device, stack_samples

__all__ = ["EvalResult", "evaluate", "load_predictions", "predict_split", "score", "write_json"]


@dataclass
class EvalResult:
    """What :func:`evaluate` (or the final evaluation of ``finetune``) measured.

    Attributes:
        task, split: what was evaluated.
        metrics: metric name to value (percent).
        predictions: the submission file's content.
        skipped: records skipped as unusable (missing or corrupt images, empty texts, ...).
        bad_records: the skipped records by reason.
        metrics_path, predictions_path: the files written (``None`` when nothing was written).
    """

    task: str
    split: str
    metrics: dict[str, float]
    predictions: Any = None
    skipped: int = 0
    bad_records: dict[str, int] = field(default_factory=dict)
    metrics_path: str | None = None
    predictions_path: str | None = None


class _EvalItems(Dataset):
    """This rank's records of one evaluation set as ``(position, tensors)`` or ``(position, SkippedRecord)``."""

    def __init__(self, task: Any, items: Sequence[Any], positions: list[int], set_name: str) -> None:
        self.task, self.items, self.positions, self.set_name = task, items, positions, set_name

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int) -> tuple[int, Any]:
        from imglish.data.skip import SkippedRecord

        pos = self.positions[k]
        try:
            record = self.items[pos]
            if isinstance(record, SkippedRecord):
                return pos, record
            return pos, self.task.sample(record, None, train=False)
        except Exception as err:  # an unusable record is skipped and counted, never fatal (unless strict)
            return pos, SkippedRecord(f"{self.task.name}/{self.set_name}", pos, "unusable sample", repr(err))


def _collate(items: list[tuple[int, Any]]) -> dict[str, Any]:
    from imglish.data.skip import SkippedRecord

    good = [(p, s) for p, s in items if not isinstance(s, SkippedRecord)]
    batch: dict[str, Any] = {"skipped": [s for _, s in items if isinstance(s, SkippedRecord)]}
    batch["index"] = torch.tensor([p for p, _ in good], dtype=torch.long)
    if good:  # (images of several sizes stay a list)
        batch.update(stack_samples([s for _, s in good]))
    return batch


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_split(
    task: Any,
    model: nn.Module,
    sets: Mapping[str, Sequence[Any]],
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    dist_info: parallel.DistInfo | None = None,
    num_workers: int = 0,
    skip: Any = None,
    progress: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Every evaluation set's prediction records, gathered from all ranks, in record order (on every rank).

    Args:
        task: the task (``sample(record, None, train=False)`` and ``predict(model, set_name, batch)``).
        model: the model (eval mode is set here and the previous mode restored).
        sets: ``{set name: records}`` (:meth:`~imglish.tasks.Task.eval_sets`).
        batch_size: records per forward on each rank.
        device, precision: where and how to compute (``bf16`` autocasts).
        dist_info: this process's place (default: one process).
        num_workers: DataLoader workers.
        skip: a ``BadRecordCounter``; skipped records of all ranks are counted in it (a strict one raises).
        progress: show a progress bar (rank 0).

    Returns:
        ``{set name: [record, ...]}``, each record with its ``index`` (position in the set), sorted by it.
    """
    info = dist_info or parallel.DistInfo()
    was_training = model.training
    model.eval()
    out: dict[str, list[dict[str, Any]]] = {}
    try:
        for name, items in sets.items():
            positions = list(range(info.rank, len(items), info.world_size))
            loader = DataLoader(
                _EvalItems(task, items, positions, name),
                batch_size=batch_size,
                num_workers=num_workers,
                collate_fn=_collate,
            )
            if progress and info.is_main:
                from tqdm.auto import tqdm

                loader = tqdm(loader, desc=f"evaluate {name}", unit="batch", leave=False, dynamic_ncols=True)
            local: list[dict[str, Any]] = []
            skipped: list[Any] = []
            for batch in loader:
                skipped.extend(batch.pop("skipped"))
                if len(batch["index"]) == 0:
                    continue
                batch = {k: move_to_device(v, device) for k, v in batch.items()}
                with _autocast(precision, device):
                    recs = task.predict(model, name, batch)
                local.extend(recs)
            merged: dict[int, dict[str, Any]] = {}
            for part in parallel.all_gather_objects(local):
                for rec in part:
                    merged.setdefault(int(rec["index"]), rec)
            out[name] = [merged[k] for k in sorted(merged)]
            for part in parallel.all_gather_objects(skipped):
                if skip is not None and part:
                    if getattr(skip, "strict", False):
                        from imglish.data.skip import BadRecordError

                        raise BadRecordError(f"evaluation of {task.name}: {part[0]}")
                    skip.absorb(part)
    finally:
        model.train(was_training)
    return out


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON atomically (tmp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def run_evaluation(
    task: Any,
    model: nn.Module,
    split: str,
    *,
    device: torch.device,
    dist_info: parallel.DistInfo | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = False,
) -> EvalResult:
    """Predict ``split`` with ``model``, score it and (rank 0, when ``out`` is given) write ``metrics.json`` and
    ``predictions.json``. Collective under torchrun: call on every rank."""
    from imglish.data import BadRecordCounter

    cfg = task.cfg
    info = dist_info or parallel.DistInfo()
    skip = BadRecordCounter(strict=cfg.data.strict)
    task.check_split(split)
    sets = task.eval_sets(split, skip)
    limit = cfg.task.max_eval_examples
    if limit:
        sets = {k: _first(v, limit) for k, v in sets.items()}
    records = predict_split(
        task,
        model,
        sets,
        batch_size=cfg.task.eval_batch_size,
        device=device,
        precision=cfg.parallel.precision,
        dist_info=info,
        num_workers=cfg.data.num_workers,
        skip=skip,
        progress=progress,
    )
    if skip.total and not any(records.values()):
        raise ValueError(f"every record of the {split} split of {task.name} was skipped: {skip.summary()}")
    predictions, metrics = task.evaluate_records(records, split, BadRecordCounter())
    result = EvalResult(
        task=task.name, split=split, metrics=metrics, predictions=predictions, skipped=skip.total,
        bad_records=dict(skip.counts),
    )
    if out is not None and info.is_main:
        out = Path(out)
        result.predictions_path = str(write_json(out / "predictions.json", predictions))
        result.metrics_path = str(write_json(out / "metrics.json", metrics_document(result)))
    return result


def metrics_document(result: EvalResult) -> dict[str, Any]:
    """The content of ``metrics.json``."""
    return {
        "task": result.task,
        "split": result.split,
        "metrics": result.metrics,
        "skipped": result.skipped,
        "bad_records": result.bad_records,
    }


class _First:
    def __init__(self, base: Sequence[Any], n: int) -> None:
        self.base, self.n = base, min(n, len(base))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.base[i]

    def __getattr__(self, name: str) -> Any:  # ground-truth helpers of the reader (ids, captions, ...)
        return getattr(self.base, name)


def _first(items: Sequence[Any], n: int) -> Sequence[Any]:
    return _First(items, n)


def evaluate(
    task: str,
    data: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    split: str = "val",
    model: str | None = None,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate a checkpoint on a split of a task's data (call on every rank under torchrun).

    Args:
        task: official task name (``imglish.tasks.list_tasks()``).
        data: the data folder.
        checkpoint: an imglish ``model.safetensors`` (made by ``finetune``; its Processor and ``task.json`` beside
            it are used) or an official ``.pth`` (then ``model`` names the architecture, e.g.
            ``beit3_base_patch16_480_vqav2``, and ``data.text_tokenizer`` the SentencePiece model).
        out: folder for ``metrics.json`` and ``predictions.json`` (nothing is written when ``None``).
        split: ``val`` or ``test`` (or ``train``).
        model: the registered model name for an official checkpoint (overrides what the file records).
        preset: the task preset whose knobs apply (default ``tiny``; only the task section and data options
            matter here).
        overrides: ``--section.key`` values.

    Raises:
        ValueError: for a checkpoint of another task, or one whose weights do not fit the model (naming the file,
            the expected and the found layout).
    """
    from imglish.training.config import build_config
    from imglish.training.finetune import load_task_and_model

    ov = dict(overrides or {})
    ov.setdefault("data.path", str(data))
    cfg = build_config(preset, None, ov, task=task)
    device = parallel.resolve_device(cfg.parallel.device, int(os.environ.get("LOCAL_RANK", "0")))
    info = parallel.init_distributed(cfg.parallel.backend, device, cfg.parallel.timeout_s)
    if cfg.parallel.threads > 0:
        torch.set_num_threads(cfg.parallel.threads)
    sizes = {k.split(".")[1]: getattr(cfg.model, k.split(".")[1]) for k in ("model.img_size", "model.patch_size")
             if k in ov}
    task_obj, net = load_task_and_model(cfg, checkpoint, model_name=model, size_overrides=sizes)
    net = net.to(device)
    result = run_evaluation(task_obj, net, split, device=device, dist_info=info, out=out, progress=progress)
    return result


def load_predictions(path: str | os.PathLike) -> Any:
    """Read a predictions JSON file.

    Raises:
        FileNotFoundError: if it does not exist; ValueError: if it is not JSON.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"predictions file {str(p)!r} does not exist")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"predictions file {str(p)!r} is not valid JSON: {err}") from None


def score(
    task: str,
    data: str | os.PathLike,
    predictions: str | os.PathLike | Any,
    *,
    split: str = "val",
    out: str | os.PathLike | None = None,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Score a predictions file (made by any code, in the task's submission format) against the split's ground
    truth; returns (and with ``out`` writes) the ``metrics.json`` document.

    Raises:
        ValueError: for predictions with ids the split does not have, or missing ids (partial predictions are
            refused, not silently scored), naming some of them.
    """
    from imglish.data import BadRecordCounter
    from imglish.training.config import build_config
    from imglish.training.finetune import make_task

    ov = dict(overrides or {})
    ov.setdefault("data.path", str(data))
    cfg = build_config(preset, None, ov, task=task)
    preds = load_predictions(predictions) if isinstance(predictions, (str, os.PathLike)) else predictions
    task_obj = make_task(cfg, tokenizer=None, state=None, need_tokenizer=False)
    task_obj.check_split(split)
    skip = BadRecordCounter()
    metrics = task_obj.score(preds, task_obj.ground_truth(split, skip))
    doc = {"task": task, "split": split, "metrics": metrics}
    if out is not None:
        write_json(Path(out) / "metrics.json", doc)
    return doc
