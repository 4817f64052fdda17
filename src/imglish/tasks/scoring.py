"""Checks shared by the tasks' ``score``: a predictions file is a list of records keyed by an id, and it must cover
exactly the ids of the ground truth (partial predictions are refused, not silently scored)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["check_ids", "records_by"]


def _some(ids: Iterable[Any], n: int = 5) -> str:
    ids = sorted(ids, key=str)
    shown = ", ".join(repr(i) for i in ids[:n])
    return shown + (f" and {len(ids) - n} more" if len(ids) > n else "")


def records_by(predictions: Any, key: str, fields: tuple[str, ...], task: str) -> dict[Any, dict[str, Any]]:
    """``{record[key]: record}`` of a predictions list.

    Raises:
        ValueError: when ``predictions`` is not a list of objects with ``key`` and ``fields``, or an id repeats.
    """
    if not isinstance(predictions, list):
        raise ValueError(
            f"{task} predictions must be a JSON list of objects with {key!r} and {', '.join(map(repr, fields))}, "
            f"got {type(predictions).__name__}"
        )
    out: dict[Any, dict[str, Any]] = {}
    for n, rec in enumerate(predictions):
        if not isinstance(rec, dict) or key not in rec or any(f not in rec for f in fields):
            raise ValueError(
                f"{task} prediction #{n} must be an object with {key!r} and {', '.join(map(repr, fields))}, got {rec!r}"
            )
        if rec[key] in out:
            raise ValueError(f"{task} predictions: {key} {rec[key]!r} appears more than once")
        out[rec[key]] = rec
    return out


def check_ids(
    predictions: Mapping[Any, Any], ground_truth: Mapping[Any, Any], key: str, task: str, allow_missing: bool = False
) -> None:
    """Refuse predictions with ids the ground truth does not have, or (unless ``allow_missing``) without some of its
    ids; the message names some of them."""
    unknown = set(predictions) - set(ground_truth)
    if unknown:
        raise ValueError(f"{task} predictions: {len(unknown)} unknown {key}(s) not in the split: {_some(unknown)}")
    missing = set(ground_truth) - set(predictions)
    if missing and not allow_missing:
        raise ValueError(
            f"{task} predictions: {len(missing)} {key}(s) of the split have no prediction: {_some(missing)} "
            "(partial predictions are refused)"
        )
