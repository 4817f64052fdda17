"""Streams of webdataset tar shards: image-text pairs, images, texts.

Built on the ``webdataset`` library: it lists and opens the shards, splits them by rank (``split_by_node``) and by
DataLoader worker (``split_by_worker``) and groups tar members into samples. imglish adds, in picklable
module-level classes:

* a seeded shard order and sample shuffle buffer, reseeded from ``seed + epoch`` (:meth:`WdsStream.set_epoch`);
* decoding through the shared image loader, and a no-throw policy: an unreadable tar member, a corrupt image or an
  empty text is counted in the stream's :class:`~imglish.data.skip.BadRecordCounter` and yielded as a
  :class:`~imglish.data.skip.SkippedRecord` (errors inside the tar reader itself are counted by the handler; they
  cannot be yielded). With ``strict`` the first bad sample raises :class:`~imglish.data.skip.BadRecordError`.

Sample fields: pairs ``<key>.jpg`` (or png/jpeg/webp) + ``<key>.txt`` [+ ``.json``]; images ``<key>.jpg`` [+ ``.cls``
label]; texts ``<key>.txt`` (one or more lines; with ``split_lines`` every non-blank line is one record).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import webdataset as wds
from torch.utils.data import IterableDataset

from imglish.data.base import Tokenizer, Transform, encode_text
from imglish.data.skip import BadRecordCounter, BadRecordError, SkippedRecord
from imglish.tokenizers.image import ImageLoadError, load_image

__all__ = ["KINDS", "CountingHandler", "WdsStream", "expand_shards"]

KINDS = ("pairs", "images", "texts")
_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def expand_shards(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard list from a brace pattern (``"wds/pairs-train-{000000..000011}.tar"``), a ``::``-separated string, or a
    list. A folder path expands to its sorted ``*.tar`` files."""
    if isinstance(urls, (str, os.PathLike)):
        u = os.fspath(urls)
        if os.path.isdir(u):
            out = sorted(os.path.join(u, f) for f in os.listdir(u) if f.endswith(".tar"))
            if not out:
                raise ValueError(f"no .tar shards in folder {u}")
            return out
        return list(wds.shardlists.expand_urls(u))
    out: list[str] = []
    for x in urls:
        out.extend(expand_shards(x))
    return out


class CountingHandler:
    """webdataset error handler that counts the error and continues (or re-raises when the counter is strict)."""

    def __init__(self, counter: BadRecordCounter, source: str) -> None:
        self.counter = counter
        self.source = source

    def __call__(self, exn: BaseException) -> bool:
        if isinstance(exn, BadRecordError) or self.counter.strict:
            raise exn
        self.counter.report(self.source, getattr(exn, "args", ["?"])[-1] if exn.args else "?",
                            "unreadable sample", repr(exn))
        return True


class WdsStream(IterableDataset):
    """An iterable stream of records from webdataset shards.

    Args:
        urls: shards (see :func:`expand_shards`).
        kind: ``"pairs"``, ``"images"`` or ``"texts"``.
        transform: applied to decoded PIL images.
        tokenizer: adds ``text_ids`` (see :func:`imglish.data.base.encode_text`).
        skip: bad-record counter (strict or not); a fresh one if None.
        shuffle_shards: shuffle the shard order each epoch (seeded).
        shuffle_buffer: size of the sample shuffle buffer (0: no sample shuffling).
        seed: base seed; the effective seed is ``seed + epoch`` (and the worker id for the sample buffer).
        split_lines: for texts, one record per non-blank line of a ``.txt`` member.
        split_by_node: give each distributed rank a disjoint share of the shards (needs at least as many shards as
            ranks).

    Records: pairs ``image``, ``text`` [, ``text_ids``], ``key`` [, ``meta`` (the decoded ``.json``)]; images
    ``image``, ``key`` [, ``label``]; texts ``text`` [, ``text_ids``], ``key``. Bad samples are yielded as
    :class:`SkippedRecord` (use :func:`imglish.data.collate.collate_records`, which sets them aside).

    Raises:
        ValueError: on an unknown kind or an empty shard list.
    """

    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str | os.PathLike],
        kind: str,
        transform: Transform | None = None,
        tokenizer: Tokenizer | None = None,
        skip: BadRecordCounter | None = None,
        shuffle_shards: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        split_lines: bool = True,
        split_by_node: bool = True,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.urls = expand_shards(urls)
        if not self.urls:
            raise ValueError("no shards given")
        self.kind = kind
        self.transform = transform
        self.tokenizer = tokenizer
        self.skip = skip if skip is not None else BadRecordCounter()
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.epoch = 0
        self.split_lines = split_lines
        self.split_by_node = split_by_node

    def set_epoch(self, epoch: int) -> None:
        """Reseed shard order and sample shuffling for ``epoch`` (call before iterating each epoch)."""
        self.epoch = int(epoch)

    def _source(self, sample: dict[str, Any]) -> str:
        return os.path.basename(str(sample.get("__url__", "wds")))

    def _decode(self, sample: dict[str, Any]) -> Iterator[dict[str, Any] | SkippedRecord]:
        key = str(sample.get("__key__", "?"))
        src = self._source(sample)
        rec: dict[str, Any] = {"key": key}
        if self.kind in ("pairs", "images"):
            data = next((sample[k] for k in _IMAGE_KEYS if k in sample), None)
            if data is None:
                yield self.skip.report(src, key, "image missing", f"fields {sorted(sample)}")
                return
            try:
                img = load_image(data)
            except ImageLoadError as err:
                yield self.skip.report(src, key, "image unreadable", str(err))
                return
            rec["image"] = self.transform(img) if self.transform is not None else img
            if self.kind == "images" and "cls" in sample:
                try:
                    rec["label"] = int(sample["cls"].decode().strip())
                except ValueError as err:
                    yield self.skip.report(src, key, "bad label", str(err))
                    return
        if self.kind == "images":
            yield rec
            return
        raw = sample.get("txt")
        if raw is None:
            yield self.skip.report(src, key, "text missing", f"fields {sorted(sample)}")
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield self.skip.report(src, key, "bad encoding", str(err))
            return
        texts = [t.strip() for t in text.splitlines()] if (self.kind == "texts" and self.split_lines) else [text.strip()]
        if not any(texts):
            yield self.skip.report(src, key, "empty text")
            return
        if self.kind == "pairs" and "json" in sample:
            import json

            try:
                rec["meta"] = json.loads(sample["json"])
            except ValueError as err:
                yield self.skip.report(src, key, "malformed record", str(err))
                return
        for j, t in enumerate(x for x in texts if x):
            out = dict(rec)
            if len(texts) > 1:
                out["key"] = f"{key}/{j}"
            out["text"] = t
            if self.tokenizer is not None:
                try:
                    out["text_ids"] = encode_text(self.tokenizer, t)
                except ValueError as err:
                    yield self.skip.report(src, out["key"], "text not tokenizable", str(err))
                    continue
            yield out

    def _worker_id(self) -> int:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        return 0 if info is None else info.id

    def __iter__(self) -> Iterator[dict[str, Any] | SkippedRecord]:
        urls = list(self.urls)
        if self.shuffle_shards:
            random.Random(self.seed + self.epoch).shuffle(urls)
        pipeline = wds.WebDataset(
            urls,
            handler=CountingHandler(self.skip, "wds"),
            shardshuffle=False,
            nodesplitter=wds.split_by_node if self.split_by_node else None,
            workersplitter=wds.split_by_worker,
            empty_check=False,
        )
        rng = random.Random((self.seed + self.epoch) * 1_000_003 + self._worker_id())
        buffer: list[dict[str, Any] | SkippedRecord] = []
        for sample in pipeline:
            for rec in self._decode(sample):
                if self.shuffle_buffer <= 0:
                    yield rec
                    continue
                buffer.append(rec)
                if len(buffer) >= self.shuffle_buffer:
                    k = rng.randrange(len(buffer))
                    buffer[k], buffer[-1] = buffer[-1], buffer[k]
                    yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer
