"""Bad-record handling shared by every reader: skip and count, or fail with `strict`.

A reader that meets a bad record (a missing or corrupt image, an empty caption, an answer outside the vocabulary, a
malformed JSON line) calls :meth:`BadRecordCounter.report`. With ``strict=True`` this raises
:class:`BadRecordError` naming the source, the record and the cause. Otherwise the record is counted and skipped:

* problems found while a reader builds its index (in ``__init__``, in the main process) are counted there and the
  record never enters the index;
* problems found while loading an item (``__getitem__``, possibly in a DataLoader worker process) are counted and the
  item is returned as a :class:`SkippedRecord`. :func:`imglish.data.collate.collate_records` drops such items from the
  batch and lists them under ``batch["skipped"]``; the trainer hands that list to :meth:`BadRecordCounter.absorb` in
  the main process, so counts are right whatever the number of workers.

Counting is by distinct ``(source, record_id, reason)``, so a record reported both in a worker and again in the main
process is counted once. :meth:`BadRecordCounter.reset` starts a new epoch.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

__all__ = ["BadRecordCounter", "BadRecordError", "SkippedRecord"]


class BadRecordError(RuntimeError):
    """A record that cannot be used, raised in strict mode. The message names the source, record and cause."""

    def __init__(self, source: str, record_id: str, reason: str, detail: str = "") -> None:
        self.source = source
        self.record_id = record_id
        self.reason = reason
        self.detail = detail
        msg = f"{source}: bad record {record_id!r}: {reason}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


@dataclasses.dataclass(frozen=True)
class SkippedRecord:
    """Placeholder returned by a reader in place of an item it had to skip (non-strict mode).

    Attributes:
        source: the reader or file the record came from.
        record_id: an identifier of the record within the source (index, question id, file name...).
        reason: a short, stable category (``"image unreadable"``, ``"empty text"``...), used as the counting key.
        detail: the underlying error message, for logs.
    """

    source: str
    record_id: str
    reason: str
    detail: str = ""


class BadRecordCounter:
    """Counts skipped records per reason; raises instead when ``strict``.

    Args:
        strict: if True, :meth:`report` raises :class:`BadRecordError` instead of counting.
        max_examples: how many example messages to keep per reason for :meth:`summary`.

    The object is picklable (it travels into DataLoader workers with the dataset); counts made in a worker stay in that
    worker's copy, which is why load-time skips also travel as :class:`SkippedRecord` items (see the module docstring).
    """

    def __init__(self, strict: bool = False, max_examples: int = 3) -> None:
        self.strict = bool(strict)
        self.max_examples = int(max_examples)
        self._seen: dict[tuple[str, str, str], str] = {}
        self._lock = threading.Lock()

    # -- pickling: locks are not picklable -------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def report(self, source: str, record_id: Any, reason: str, detail: str = "") -> SkippedRecord:
        """Record one bad record.

        Args:
            source: the reader or file name.
            record_id: identifier of the record (converted to ``str``).
            reason: short category used as the counting key.
            detail: the underlying error text.

        Returns:
            The :class:`SkippedRecord` describing it (to return from ``__getitem__``).

        Raises:
            BadRecordError: in strict mode.
        """
        rid = str(record_id)
        if self.strict:
            raise BadRecordError(source, rid, reason, detail)
        rec = SkippedRecord(source, rid, reason, detail)
        self._add(rec)
        return rec

    def _add(self, rec: SkippedRecord) -> None:
        with self._lock:
            self._seen.setdefault((rec.source, rec.record_id, rec.reason), rec.detail)

    def absorb(self, skipped: Iterable[SkippedRecord]) -> None:
        """Add records skipped elsewhere (e.g. ``batch["skipped"]`` from a worker). Duplicates count once."""
        for rec in skipped:
            if not isinstance(rec, SkippedRecord):
                raise TypeError(f"absorb expects SkippedRecord items, got {type(rec).__name__}")
            self._add(rec)

    def merge(self, other: BadRecordCounter) -> None:
        """Add every record counted by another counter."""
        with self._lock:
            for key, detail in other._seen.items():
                self._seen.setdefault(key, detail)

    @property
    def counts(self) -> dict[str, int]:
        """Number of distinct skipped records per reason."""
        return dict(Counter(reason for (_, _, reason) in self._seen))

    @property
    def total(self) -> int:
        """Total number of distinct skipped records."""
        return len(self._seen)

    def records(self) -> list[SkippedRecord]:
        """Every skipped record, in the order first seen."""
        return [SkippedRecord(s, r, why, d) for (s, r, why), d in self._seen.items()]

    def reset(self) -> None:
        """Forget all counts (call at the start of an epoch)."""
        with self._lock:
            self._seen.clear()

    def summary(self) -> str:
        """One human-readable line per reason, with a few examples; ``"no records skipped"`` if none."""
        if not self._seen:
            return "no records skipped"
        lines = [f"{self.total} record(s) skipped:"]
        by_reason: dict[str, list[str]] = {}
        for (source, rid, reason), detail in self._seen.items():
            by_reason.setdefault(reason, []).append(f"{source}:{rid}" + (f" ({detail})" if detail else ""))
        for reason, items in sorted(by_reason.items()):
            examples = "; ".join(items[: self.max_examples])
            more = f"; ... {len(items) - self.max_examples} more" if len(items) > self.max_examples else ""
            lines.append(f"  {reason}: {len(items)} (e.g. {examples}{more})")
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        """Counts per reason (for logs and checkpoints)."""
        return {"strict": self.strict, "total": self.total, "counts": self.counts}

    def __repr__(self) -> str:
        return f"BadRecordCounter(strict={self.strict}, total={self.total}, counts={self.counts})"
