"""The seeded, resumable, rank- and worker-sharded three-stream sampler of pretraining.

Every sample is addressed by a *global slot*: at optimizer step ``s`` the stream with global batch ``G`` uses slots
``s * G ... s * G + G - 1``. Slot ``g`` reads record ``perm_e[g mod L]`` of its source (``L`` records), where
``perm_e`` is a permutation drawn from ``(seed, stream, epoch e = g div L)``. The slots of a step are split into
``world_size * accum_steps`` equal micro-batches; rank ``r`` takes micro-batches ``r * A ... r * A + A - 1``.
Every random choice made for a sample (crop, flip, masks) is seeded by ``(seed, stream, g)`` alone.

So the set of samples of a step, and everything done to them, depends on the seed and the step only, not on the
number of processes, the number of DataLoader workers or on where a run was interrupted: the data position of a
checkpoint is simply its step. A record that cannot be read is skipped (counted, or an error with ``strict``) and
replaced by the next record of the same permutation.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "SKIPPED_KEY",
    "PrecomputedTargets",
    "SampleMaker",
    "StepBatches",
    "StreamSources",
    "WdsStepBatches",
    "make_step_loader",
    "pop_skipped",
    "sample_seed",
    "seeded_rng",
    "move_to_device",
    "split_heldout",
    "stack_samples",
]

_STREAM_IDS = {"image": 1, "text": 2, "pair": 3}


def stack_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A micro-batch from samples: tensors of one shape are stacked; anything else (tensors of different shapes,
    per-image target dicts) stays a list, one entry per sample."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1:
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


def move_to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it moved to ``device`` (tensors, and lists and dicts of them, recursively)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, list):
        return [move_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: move_to_device(v, device) for k, v in value.items()}
    return value


def sample_seed(seed: int, stream: str, slot: int, salt: int = 0) -> int:
    """A 63-bit seed derived from ``(seed, stream, slot, salt)`` (stable across processes and platforms)."""
    h = hashlib.blake2b(f"{seed}/{stream}/{slot}/{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator and Python's ``random`` with ``seed`` inside the block; restore both after.

    The random draws inside are those of ``torch.manual_seed(seed); random.seed(seed)``. Only the CPU generator is
    touched (data transforms run on the CPU): ``torch.manual_seed`` also queues a seed for every CUDA device, which
    costs about 70 us per call when CUDA is not initialised (a stack trace is recorded), paid once per sample.
    """
    gen = torch.default_generator
    torch_state, py_state = gen.get_state(), random.getstate()
    try:
        gen.manual_seed(seed)
        random.seed(seed)
        yield
    finally:
        gen.set_state(torch_state)
        random.setstate(py_state)


@dataclass
class StreamSources:
    """The records of the three streams; each is index-addressable (``len`` and ``[i]``) or ``None``.

    Attributes:
        images: ``[i]`` gives a PIL image (or a record with an ``image`` attribute/key).
        texts: ``[i]`` gives a string (or a record with a ``text`` attribute/key).
        pairs: ``[i]`` gives ``(image, caption)`` (or a record with ``image`` and ``text``/``caption``).
    """

    images: Sequence[Any] | None = None
    texts: Sequence[Any] | None = None
    pairs: Sequence[Any] | None = None

    def get(self, stream: str) -> Sequence[Any] | None:
        return {"image": self.images, "text": self.texts, "pair": self.pairs}[stream]


class _Subset:
    """A view of some indices of a sequence (keeps ``len`` and ``[i]``)."""

    def __init__(self, base: Sequence[Any], indices: Sequence[int]) -> None:
        self.base, self.indices = base, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[self.indices[i]]


def split_heldout(sources: StreamSources, fraction: float, seed: int) -> tuple[StreamSources, StreamSources]:
    """Split each stream into training and held-out records by a seeded permutation.

    Returns:
        ``(train, heldout)``; a stream with fewer than 2 records keeps all of them for training.
    """
    train, held = StreamSources(), StreamSources()
    for stream, attr in (("image", "images"), ("text", "texts"), ("pair", "pairs")):
        src = sources.get(stream)
        if src is None:
            continue
        n = len(src)
        k = int(n * fraction) if n >= 2 else 0
        perm = torch.randperm(
            n, generator=torch.Generator().manual_seed(sample_seed(seed, stream, -1))
        ).tolist()
        setattr(train, attr, _Subset(src, sorted(perm[k:])))
        setattr(held, attr, _Subset(src, sorted(perm[:k])) if k else None)
    return train, held


def _field(record: Any, *names: str) -> Any:
    for n in names:
        if isinstance(record, dict) and n in record:
            return record[n]
        if hasattr(record, n):
            return getattr(record, n)
    raise KeyError(names[0])


class SampleMaker:
    """Turns one record into tensors, with every random choice seeded by the sample's own seed.

    Args:
        encode: ``text -> list[int]`` with BOS and EOS (the text tokenizer's ``encode``).
        image_transform: ``(PIL image) -> (normalised (3, H, W), tokenizer view (3, H, W) in [0, 1])``.
        num_patches_side: patches per side of the model's grid.
        max_text_len: length of every text row (padded with ``pad_id``, truncated keeping EOS).
        mask_id: id of ``<mask>``; pad_id, eos_id: the tokenizer's ids.
        image_mask_ratio, text_mask_prob, pair_text_mask_prob, pair_image_mask_ratio, replace_80_10_10,
        min_block_patches: the masking of :class:`imglish.training.config.ObjectiveConfig`.
        visual_targets: optional ``record -> (N,) long`` giving precomputed visual codes of an image-stream
            record's image (see :class:`PrecomputedTargets`); image samples then carry ``visual_targets`` instead of
            the tokenizer's view, and the visual tokenizer is not run on them (a masked pair image still is). Only
            valid for a deterministic view.
    """

    def __init__(
        self,
        encode: Callable[[str], list[int]],
        image_transform: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] | None,
        num_patches_side: int,
        max_text_len: int,
        mask_id: int,
        pad_id: int = 1,
        eos_id: int = 2,
        bos_id: int = 0,
        image_mask_ratio: float = 0.4,
        text_mask_prob: float = 0.15,
        pair_text_mask_prob: float = 0.5,
        pair_image_mask_ratio: float = 0.0,
        replace_80_10_10: bool = False,
        min_block_patches: int = 4,
        visual_targets: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        from imglish.data.masking import BlockMaskGenerator

        self.visual_targets = visual_targets
        self.encode, self.image_transform = encode, image_transform
        self.max_text_len, self.mask_id = max_text_len, mask_id
        self.pad_id, self.eos_id, self.bos_id = pad_id, eos_id, bos_id
        self.text_mask_prob, self.pair_text_mask_prob = text_mask_prob, pair_text_mask_prob
        self.replace_80_10_10 = replace_80_10_10
        side = num_patches_side
        min_block = max(1, min(min_block_patches, round(image_mask_ratio * side * side)))

        def gen(ratio: float) -> BlockMaskGenerator | None:
            if ratio <= 0:
                return None
            return BlockMaskGenerator.from_ratio(
                side, ratio, min_num_patches=max(1, min(min_block, round(ratio * side * side)))
            )

        self.image_masker = gen(image_mask_ratio)
        self.pair_image_masker = gen(pair_image_mask_ratio)

    def _text(self, text: str, prob: float, seed: int) -> dict[str, torch.Tensor]:
        from imglish.data.masking import mask_text

        if not isinstance(text, str) or not text.strip():
            raise ValueError("empty text")
        ids = list(self.encode(text))
        if len(ids) > self.max_text_len:
            ids = ids[: self.max_text_len - 1] + [self.eos_id]
        n = len(ids)
        row = torch.full((1, self.max_text_len), self.pad_id, dtype=torch.long)
        row[0, :n] = torch.tensor(ids, dtype=torch.long)
        pad = torch.ones((1, self.max_text_len), dtype=torch.long)
        pad[0, :n] = 0
        g = torch.Generator().manual_seed(seed)
        masked, tmask = mask_text(
            row,
            pad,
            prob,
            mask_id=self.mask_id,
            protected_ids=(self.bos_id, self.eos_id),
            replace_80_10_10=self.replace_80_10_10,
            generator=g,
        )
        return {"text_ids": masked[0], "padding_mask": pad[0], "text_mask": tmask[0], "text_targets": row[0]}

    def _image(
        self, image: Any, seed: int, masker: Any, record: Any = None, lookup: bool = False
    ) -> dict[str, torch.Tensor]:
        if self.image_transform is None:
            raise ValueError("no image transform configured")
        with seeded_rng(seed):
            pixels, tok_view = self.image_transform(image)
        if lookup and self.visual_targets is not None and masker is not None:
            out = {"image": pixels, "visual_targets": self.visual_targets(record).long()}
        else:
            out = {"image": pixels, "tokenizer_image": tok_view}
        if masker is not None:
            out["image_mask"] = masker(rng=np.random.default_rng(seed ^ 0x5DEECE66D))
        return out

    def __call__(self, stream: str, record: Any, seed: int) -> dict[str, torch.Tensor]:
        """Tensors of one sample of ``stream`` (see :class:`MaskedDataModeling` for the keys)."""
        if stream == "image":
            img = (
                record
                if not isinstance(record, dict) and not hasattr(record, "image")
                else _field(record, "image")
            )
            return self._image(img, seed, self.image_masker, record, lookup=True)
        if stream == "text":
            text = record if isinstance(record, str) else _field(record, "text")
            return self._text(text, self.text_mask_prob, seed)
        if stream == "pair":
            if isinstance(record, tuple):
                img, text = record
            else:
                img, text = _field(record, "image"), _field(record, "text", "caption")
            out = self._text(text, self.pair_text_mask_prob, seed)
            out.update(self._image(img, seed + 1, self.pair_image_masker, record))
            return out
        raise ValueError(f"unknown stream {stream!r}")


SKIPPED_KEY = "skipped"


def pop_skipped(batch: dict[str, Any]) -> list[Any]:
    """Remove and return the skipped records a :class:`StepBatches` item carries (an empty list if none)."""
    return list(batch.pop(SKIPPED_KEY, None) or [])


class PrecomputedTargets:
    """Visual codes looked up by image path in files written by ``imglish tokenizer precompute``
    (:func:`imglish.tokenizers.vqkd_train.precompute_visual_tokens`).

    Such a file holds the codes of each image squash-resized to the tokenizer's size, so the codes are those of the
    un-augmented view; use it only with ``data.augment = false``.

    Args:
        files: ``{image folder the file was made from: token file}``.

    Raises:
        ValueError: (on lookup) for an image the files do not cover or could not read; the sampler counts it as a
            bad record and moves on.
    """

    def __init__(self, files: dict[str | Path, str | Path]) -> None:
        from imglish.tokenizers.vqkd_train import load_visual_tokens

        self.table: dict[str, torch.Tensor] = {}
        for root, file in files.items():
            base = Path(root).resolve()
            for rel, codes in load_visual_tokens(file).items():
                self.table[str(base / rel)] = codes
        self.files = {str(k): str(v) for k, v in files.items()}

    def __len__(self) -> int:
        return len(self.table)

    def __call__(self, record: Any) -> torch.Tensor:
        path = None
        for key in ("path", "image_path"):
            if isinstance(record, dict) and key in record:
                path = record[key]
        if path is None:
            raise ValueError("precomputed visual targets need records with a 'path' or 'image_path' field")
        codes = self.table.get(str(Path(path).resolve()))
        if codes is None:
            raise ValueError(f"no precomputed visual tokens for {path} in {sorted(self.files.values())}")
        if bool((codes < 0).any()):
            raise ValueError(
                f"the precomputed visual tokens of {path} are missing (unreadable when precomputed)"
            )
        return codes


def _is_bad(record: Any) -> bool:
    return type(record).__name__ == "SkippedRecord"


class StepBatches(Dataset):
    """Map-style dataset whose item ``k`` is micro-batch ``k mod A`` of step ``k div A`` of this rank.

    Args:
        sources: the records (training split).
        maker: the :class:`SampleMaker`.
        batch_sizes: global samples per step for each stream (``{"image": 2048, ...}``; 0 leaves a stream out).
        seed: the run's seed.
        rank, world_size: this process and the number of processes.
        accum_steps: micro-steps per optimizer step.
        skip_counter: an ``imglish.data.BadRecordCounter`` (``report`` and ``absorb``); when absent, or strict, a bad
            record raises.
        max_retries: records tried in a row before giving up on a slot.
        batch_transform: optional ``(stacked micro-batch of a stream, seed) -> micro-batch`` (mixup, cutmix), with
            the seed derived from the run's seed, the stream and the micro-batch's position alone.

    ``sources`` may also be a plain mapping ``{stream: records}`` (fine-tuning tasks use one stream).
    """

    def __init__(
        self,
        sources: StreamSources,
        maker: SampleMaker,
        batch_sizes: dict[str, int],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        accum_steps: int = 1,
        skip_counter: Any = None,
        max_retries: int = 100,
        batch_transform: Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.sources, self.maker, self.seed = sources, maker, seed
        self.batch_transform = batch_transform
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps
        self.skip_counter, self.max_retries = skip_counter, max_retries
        self.batch_sizes = {}
        for stream, size in batch_sizes.items():
            if size <= 0:
                continue
            src = sources.get(stream)
            if src is None or len(src) == 0:
                raise ValueError(f"data: the {stream} stream has batch size {size} but no records")
            parts = world_size * accum_steps
            if size % parts:
                raise ValueError(
                    f"the {stream} batch ({size}) must be divisible by world_size x accum_steps "
                    f"({world_size} x {accum_steps} = {parts})"
                )
            self.batch_sizes[stream] = size
        self._perm_cache: dict[tuple[str, int], list[int]] = {}
        self.skipped = 0
        self.pending_skipped: list[Any] = []

    def micro_batch_size(self, stream: str) -> int:
        return self.batch_sizes[stream] // (self.world_size * self.accum_steps)

    def __len__(self) -> int:  # unbounded in principle; the sampler decides what is read
        return 2**62

    def _perm(self, stream: str, epoch: int) -> list[int]:
        key = (stream, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 8:
                self._perm_cache.clear()
            n = len(self.sources.get(stream))
            g = torch.Generator().manual_seed(sample_seed(self.seed, stream, epoch, salt=7))
            self._perm_cache[key] = torch.randperm(n, generator=g).tolist()
        return self._perm_cache[key]

    def sample(self, stream: str, slot: int) -> dict[str, torch.Tensor]:
        """The tensors of global slot ``slot`` of ``stream`` (a bad record gives way to the next one).

        A reader's :class:`~imglish.data.skip.SkippedRecord`, or a record the sample maker cannot use (empty text,
        ...), is counted in ``skip_counter`` and queued in :attr:`pending_skipped` (so that counts made in a
        DataLoader worker reach the main process with the batch); with a strict counter, or none, it raises.
        """
        src = self.sources.get(stream)
        n = len(src)
        for attempt in range(self.max_retries):
            pos = slot + attempt * 1_000_003  # a bad record is replaced by one far along the permutation
            index = self._perm(stream, pos // n)[pos % n]
            record = None
            try:
                record = src[index]
                if _is_bad(record):
                    self._skip(record)
                    continue
                return self.maker(stream, record, sample_seed(self.seed, stream, slot))
            except Exception as err:  # a bad record is counted and replaced, never dropped silently
                if self.skip_counter is None or getattr(self.skip_counter, "strict", False):
                    raise
                self._skip(
                    self.skip_counter.report(f"{stream} stream", index, "unusable sample", repr(err))
                )
        raise RuntimeError(f"{stream} stream: {self.max_retries} bad records in a row around slot {slot}")

    def _skip(self, record: Any) -> None:
        self.skipped += 1
        if self.skip_counter is None:
            raise ValueError(f"bad record {record!r} and no skip counter")
        if _is_bad(record) and hasattr(self.skip_counter, "absorb"):
            self.skip_counter.absorb([record])
        self.pending_skipped.append(record)

    def slots(self, stream: str, step: int, micro: int) -> range:
        """Global slots of ``stream`` in micro-batch ``micro`` of ``step`` on this rank."""
        mb = self.micro_batch_size(stream)
        start = step * self.batch_sizes[stream] + (self.rank * self.accum_steps + micro) * mb
        return range(start, start + mb)

    def __getitem__(self, k: int) -> dict[str, dict[str, torch.Tensor]]:
        step, micro = divmod(int(k), self.accum_steps)
        batch: dict[str, Any] = {}
        for stream in self.batch_sizes:
            samples = [self.sample(stream, g) for g in self.slots(stream, step, micro)]
            batch[stream] = stack_samples(samples)
            if self.batch_transform is not None:
                batch[stream] = self.batch_transform(batch[stream], sample_seed(self.seed, stream, int(k), salt=11))
        if self.pending_skipped:  # travels with the batch out of a DataLoader worker; see pop_skipped
            batch[SKIPPED_KEY], self.pending_skipped = self.pending_skipped, []
        return batch


class WdsStepBatches(torch.utils.data.IterableDataset):
    """Micro-batches from webdataset shards, for corpora too large to index (``data.format = "wds"``).

    Each stream is an :class:`imglish.data.WdsStream` that gives every rank, and every DataLoader worker of a rank,
    its own shards (``split_by_node``, then webdataset's ``split_by_worker``), in a seeded shard order with a seeded
    shuffle buffer; when a stream runs out, its next epoch starts (reseeded with ``set_epoch``). Micro-batch ``k``
    of this rank takes the next ``batch / (world_size x accum_steps)`` records of each stream; sample ``j`` of a
    stream is made with the seed of ``(seed, stream, rank, worker, j)``.

    Unlike :class:`StepBatches`, the samples of a step depend on the number of processes and workers (each reads
    its own shards). With the same process and worker counts the order is fixed by the seed, so a resumed run
    skips the records it had used and continues with the same data as an uninterrupted one.

    Args:
        streams: ``{"image": WdsStream, "text": ..., "pair": ...}`` (kinds ``images``, ``texts``, ``pairs``).
        maker, batch_sizes, seed, rank, world_size, accum_steps, skip_counter: as for :class:`StepBatches`.
    """

    def __init__(
        self,
        streams: dict[str, Any],
        maker: SampleMaker,
        batch_sizes: dict[str, int],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        accum_steps: int = 1,
        skip_counter: Any = None,
    ) -> None:
        self.streams, self.maker, self.seed = streams, maker, seed
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps
        self.skip_counter = skip_counter
        self.batch_sizes: dict[str, int] = {}
        for stream, size in batch_sizes.items():
            if size <= 0:
                continue
            if streams.get(stream) is None:
                raise ValueError(f"data: the {stream} stream has batch size {size} but no shards")
            parts = world_size * accum_steps
            if size % parts:
                raise ValueError(
                    f"data.{stream}_batch ({size}) must be divisible by world_size x accum_steps "
                    f"({world_size} x {accum_steps} = {parts})"
                )
            self.batch_sizes[stream] = size
        self.start, self.stop = 0, None

    def micro_batch_size(self, stream: str) -> int:
        return self.batch_sizes[stream] // (self.world_size * self.accum_steps)

    def set_range(self, start: int, stop: int | None) -> None:
        """Yield micro-batches ``start`` to ``stop`` (exclusive) of this rank (the trainer's resume position)."""
        self.start, self.stop = int(start), stop

    def _records(self, stream: str, worker: int, workers: int):
        """Endless records of one stream for this worker, epoch after epoch."""
        ws = self.streams[stream]
        epoch = 0
        while True:
            ws.set_epoch(epoch)
            empty = True
            for rec in ws:
                empty = False
                yield rec
            if empty:
                raise ValueError(
                    f"the {stream} shards give rank {self.rank} (worker {worker} of {workers}) no records; use at "
                    "least world_size x num_workers shards per stream"
                )
            epoch += 1

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        iters = {s: self._records(s, worker, workers) for s in self.batch_sizes}
        used = dict.fromkeys(self.batch_sizes, 0)
        pending: list[Any] = []
        k = 0
        while self.stop is None or k < self.stop:
            if k % workers != worker:  # workers take turns, each reading its own shards
                k += 1
                continue
            replay = k < self.start  # before the resume position: read past the records, yield nothing
            batch: dict[str, Any] = {}
            for stream in self.batch_sizes:
                samples: list[Any] = []
                while len(samples) < self.micro_batch_size(stream):
                    rec = next(iters[stream])
                    j = used[stream]
                    used[stream] += 1
                    if _is_bad(rec):  # a bad record takes no place in the batch
                        if not replay:
                            self._count(rec, pending)
                        continue
                    try:  # (made during the replay too: whether a record is usable decides the batches)
                        seed = sample_seed(self.seed, f"{stream}/{self.rank}/{worker}", j)
                        samples.append(self.maker(stream, rec, seed))
                    except Exception as err:  # a bad record is counted and replaced, never dropped silently
                        if self.skip_counter is None or getattr(self.skip_counter, "strict", False):
                            raise
                        if not replay:
                            key = rec.get("key", j) if isinstance(rec, dict) else j
                            self._count(
                                self.skip_counter.report(
                                    f"pretraining/{stream}", key, "unusable sample", repr(err)
                                ),
                                pending,
                            )
                if not replay:
                    batch[stream] = stack_samples(samples)
            if not replay:
                if pending:
                    batch[SKIPPED_KEY], pending = pending, []
                yield batch
            k += 1

    def _count(self, record: Any, pending: list[Any]) -> None:
        if self.skip_counter is not None and hasattr(self.skip_counter, "absorb") and _is_bad(record):
            self.skip_counter.absorb([record])
        pending.append(record)


class _Range(torch.utils.data.Sampler):
    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)


def make_step_loader(
    dataset: StepBatches, start_step: int, max_steps: int, num_workers: int = 0
) -> DataLoader:
    """A DataLoader yielding this rank's micro-batches from ``start_step`` to ``max_steps`` (exclusive), in order.

    Workers each build whole micro-batches; as every sample is seeded by its slot, the result does not depend on
    ``num_workers``.
    """
    A = dataset.accum_steps
    if isinstance(dataset, torch.utils.data.IterableDataset):
        dataset.set_range(start_step * A, max_steps * A)
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=False,
            prefetch_factor=2 if num_workers > 0 else None,
        )
    return DataLoader(
        dataset,
        sampler=_Range(start_step * A, max_steps * A),
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )
