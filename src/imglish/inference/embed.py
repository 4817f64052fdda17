"""Batch embeddings of many inputs (``imglish embed``): an image folder, webdataset shards or a text file in, one
safetensors file of L2-normalised float32 embeddings and their ids out.

    from imglish.inference.embed import embed, load_embeddings
    summary = embed("runs/retrieval/model.safetensors", images="photos/", out="photos.safetensors")
    ids, vectors, meta = load_embeddings("photos.safetensors")       # vectors: (N, D) float32, row i is ids[i]

How it works:

* **Index.** The inputs are listed in the main process, in a fixed order, as *records* (an id and where to read it):
  every image under a folder (sorted, id = the path relative to the folder), every sample of local tar shards (in
  shard order, id = the sample's ``__key__``; the index keeps each image member's offset, so workers read it
  directly), or every line of a ``.txt`` (id = the line number from 0) or ``.jsonl`` (``{"id", "text"}``) file.
* **Batches.** Batch ``b`` is always records ``[b * batch_size, (b + 1) * batch_size)``. DataLoader workers run the
  pipeline's :meth:`~imglish.inference.pipeline.Pipeline.preprocess` (decode and transform an image, tokenize a
  text); a bad record becomes a :class:`~imglish.data.skip.SkippedRecord` with its reason and is counted in the main
  process by a :class:`~imglish.data.skip.BadRecordCounter`. The main process stacks the good rows and runs
  :meth:`~imglish.inference.pipeline.Pipeline.forward`. The order, and so the output, does not depend on the number
  of workers.
* **Parts.** Every ``part_batches`` batches the rows so far are written to ``OUT.parts/part-NNNNNN.safetensors``
  (temp file + ``os.replace``), then ``OUT.parts/progress.json`` records how many parts are complete. ``resume=True``
  continues after the last complete part; since batches are fixed by record position, the resumed run computes the
  same batches as an uninterrupted one and its final file is the same. At the end the parts are joined into ``OUT``
  (written atomically) and the parts folder is removed.
* **Ranks.** Under ``torchrun`` each process embeds the parts ``k`` with ``k % world_size == rank`` on its own
  device (``cuda:LOCAL_RANK`` on GPUs) and records them in ``OUT.parts/progress-rankR.json`` (rank 0 in
  ``progress.json``); rank 0 joins all parts in part order, so the file is the one a single process writes. A
  resume may use another number of processes.

Output format (``OUT``, safetensors): tensor ``embeddings`` (N, D) float32; string metadata ``format``
(``imglish-embeddings/1``), ``kind`` (``image``/``text``), ``ids`` (JSON list, row order), ``count``, ``dim``,
``checkpoint``, ``model_name``, ``precision``, ``skipped`` (count), ``skipped_reasons`` (JSON: reason -> count) and
``skipped_records`` (JSON list of ``{"id", "reason", "detail"}``, the first :data:`MAX_SKIPPED_LISTED`). When the
ids' JSON is larger than :data:`MAX_IDS_METADATA_BYTES` (safetensors headers are capped at 100 MB) the ids are
stored instead as a uint8 tensor ``ids_json`` holding the UTF-8 JSON list, and metadata ``ids`` is ``"@ids_json"``;
:func:`load_embeddings` reads both forms.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from imglish.data.skip import BadRecordCounter, BadRecordError, SkippedRecord
from imglish.inference.inputs import InputError
from imglish.training import parallel

__all__ = [
    "FORMAT",
    "MAX_IDS_METADATA_BYTES",
    "MAX_SKIPPED_LISTED",
    "EmbedSummary",
    "embed",
    "load_embeddings",
]

#: the ``format`` metadata of an embeddings file
FORMAT = "imglish-embeddings/1"
#: ids whose JSON list is larger than this go into the ``ids_json`` tensor instead of the metadata
MAX_IDS_METADATA_BYTES = 8 * 1024 * 1024
#: at most this many skipped records are listed (with their reasons) in the output metadata; all are counted
MAX_SKIPPED_LISTED = 1000
#: image members of a webdataset sample, in the order tried
SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
#: the default number of batches per part file
DEFAULT_PART_BATCHES = 20

_PROGRESS = "progress.json"


# ============================================================================================= records
@dataclasses.dataclass(frozen=True)
class _Record:
    """One input: its id and how to read it (a path, a ``(shard, offset, size)`` member, or the text itself)."""

    id: str
    path: str | None = None
    offset: int = 0
    size: int = -1
    text: str | None = None


@dataclasses.dataclass
class _Index:
    """The ordered records of one input, and the records already found bad while listing them."""

    kind: str  # "image" or "text"
    source: str  # the folder, shard pattern or text file (for messages)
    records: list[_Record]
    bad: list[tuple[int, SkippedRecord]]  # (position in records order, record) found while indexing
    fingerprint: str  # identifies the input for --resume


def _fingerprint(kind: str, items: Iterator[str]) -> str:
    h = hashlib.sha256(kind.encode())
    for s in items:
        h.update(b"\0" + s.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _looks_like_shards(spec: str) -> bool:
    if "::" in spec or "{" in spec or spec.endswith(".tar"):
        return True
    p = Path(spec)
    return p.is_dir() and any(f.suffix == ".tar" for f in p.iterdir()) and not any(_walk_images(p))


def _walk_images(root: Path) -> Iterator[Path]:
    from imglish.tokenizers.image import IMAGE_EXTENSIONS

    return (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def _index_folder(root: str) -> _Index:
    from imglish.tokenizers.image import find_images

    base = Path(root)
    files = find_images(base)  # FileNotFoundError / ValueError (no images) name the folder
    if base.is_file():
        records = [_Record(base.name, str(base))]
    else:
        records = [_Record(p.relative_to(base).as_posix(), str(p)) for p in files]
    return _Index("image", root, records, [], _fingerprint("image", (r.id for r in records)))


def _split_member(name: str) -> tuple[str, str] | None:
    """``("dir/key", "ext")`` of a tar member name as webdataset groups them (the key ends at the basename's first
    dot), or None for a name without an extension."""
    m = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)
    return (m.group(1), m.group(2)) if m else None


def _index_shards(spec: str, counter: BadRecordCounter) -> _Index:
    from imglish.data.wds import expand_shards

    shards = expand_shards(spec)
    if not shards:
        raise ValueError(f"--images {spec!r}: no shards")
    records: list[_Record] = []
    bad: list[tuple[int, SkippedRecord]] = []
    seen: set[str] = set()
    for shard in shards:
        if not Path(shard).is_file():
            raise FileNotFoundError(f"shard {shard!r} does not exist (only local tar files are read)")
        name = os.path.basename(shard)
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for info in tar:
                    if not info.isfile() or (parts := _split_member(info.name)) is None:
                        continue
                    key, ext = parts
                    if os.path.basename(key).startswith("_"):
                        continue  # webdataset's convention for shard-level metadata members
                    samples.setdefault(key, {})[ext.lower()] = info
        except (tarfile.TarError, OSError) as err:  # keep the samples read before the damage
            bad.append((len(records), counter.report(name, "<shard>", "shard unreadable", str(err))))
        for key, members in samples.items():
            info = next((members[e] for e in SHARD_IMAGE_EXTS if e in members), None)
            if key in seen:
                bad.append((len(records), counter.report(name, key, "duplicate key")))
            elif info is None:
                bad.append((len(records), counter.report(name, key, "image missing", f"members {sorted(members)}")))
            else:
                records.append(_Record(key, shard, info.offset_data, info.size))
            seen.add(key)
    if not records and not bad:
        raise ValueError(f"--images {spec!r}: the shards hold no samples")
    fp = _fingerprint("image", (f"{os.path.basename(r.path or '')}/{r.id}" for r in records))
    return _Index("image", spec, records, bad, fp)


def _index_texts(path: str, counter: BadRecordCounter) -> _Index:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"texts file {path!r} does not exist")
    suffix = file.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise ValueError(f"texts file {path!r}: expected a .txt (one text per line) or a .jsonl "
                         '({"id": ..., "text": ...} per line)')
    name = file.name
    records: list[_Record] = []
    bad: list[tuple[int, SkippedRecord]] = []
    seen: set[str] = set()
    with open(file, "rb") as fh:
        for n, raw in enumerate(fh):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                bad.append((len(records), counter.report(name, n, "bad encoding", str(err))))
                continue
            if not line.strip():
                bad.append((len(records), counter.report(name, n, "empty line")))
                continue
            if suffix == ".txt":
                records.append(_Record(str(n), text=line.strip()))
                continue
            try:
                obj = json.loads(line)
                rid, text = obj["id"], obj["text"]
                if not isinstance(text, str) or not isinstance(rid, (str, int)) or isinstance(rid, bool):
                    raise TypeError(f'"id" must be a string or integer and "text" a string, got {line[:80]!r}')
            except (ValueError, KeyError, TypeError) as err:
                what = f"missing field {err}" if isinstance(err, KeyError) else str(err)
                bad.append((len(records), counter.report(name, f"line {n}", "malformed record", what)))
                continue
            rid = str(rid)
            if rid in seen:
                bad.append((len(records), counter.report(name, rid, "duplicate id", f"line {n}")))
                continue
            seen.add(rid)
            records.append(_Record(rid, text=text))
    if not records and not bad:
        raise ValueError(f"texts file {path!r} is empty")
    fp = _fingerprint("text", (f"{r.id}\0{r.text}" for r in records))
    return _Index("text", path, records, bad, fp)


# ============================================================================================= dataset
class _EmbedDataset(Dataset):
    """Record ``i`` through the pipeline's ``preprocess`` (in DataLoader workers): ``(i, id, tensors)``, or a
    :class:`SkippedRecord` when it cannot be used."""

    def __init__(self, records: Sequence[_Record], kind: str, pipe: Any, source: str) -> None:
        self.records = records
        self.kind = kind
        self.pipe = pipe  # a copy of the pipeline without its model (only preprocess runs here)
        self.source = source

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, str, dict[str, torch.Tensor]] | SkippedRecord:
        rec = self.records[i]
        try:
            if self.kind == "text":
                return i, rec.id, self.pipe.preprocess({"text": rec.text})
            if rec.size >= 0:  # a tar member
                with open(rec.path, "rb") as fh:
                    fh.seek(rec.offset)
                    data = fh.read(rec.size)
                if len(data) != rec.size:
                    raise InputError(f"image {rec.id}: the shard ends inside the member")
                return i, rec.id, self.pipe.preprocess({"image": data})
            return i, rec.id, self.pipe.preprocess({"image": rec.path})
        except (InputError, OSError) as err:
            source = os.path.basename(rec.path) if rec.size >= 0 and rec.path else self.source
            reason = "text not usable" if self.kind == "text" else "image unreadable"
            return SkippedRecord(source, rec.id, reason, str(err))


def _collate(rows: list[Any]) -> tuple[list[int], list[str], dict[str, torch.Tensor] | None, list[SkippedRecord]]:
    good = [r for r in rows if not isinstance(r, SkippedRecord)]
    skipped = [r for r in rows if isinstance(r, SkippedRecord)]
    if not good:
        return [], [], None, skipped
    tensors = {k: torch.stack([r[2][k] for r in good]) for k in good[0][2]}
    return [r[0] for r in good], [r[1] for r in good], tensors, skipped


class _RangeBatches:
    """Batch sampler: the given batch numbers, batch ``b`` being the fixed record range ``[b * size, (b + 1) *
    size)``."""

    def __init__(self, n: int, size: int, batches: Sequence[int]) -> None:
        self.n, self.size, self.batches = n, size, list(batches)

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.batches:
            yield list(range(b * self.size, min((b + 1) * self.size, self.n)))

    def __len__(self) -> int:
        return len(self.batches)


# ============================================================================================= files
def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _part_path(parts: Path, k: int) -> Path:
    return parts / f"part-{k:06d}.safetensors"


def _skipped_json(records: Sequence[SkippedRecord]) -> str:
    return json.dumps([dataclasses.asdict(r) for r in records])


def load_embeddings(path: str | os.PathLike) -> tuple[list[str], torch.Tensor, dict[str, Any]]:
    """Read a file written by :func:`embed`.

    Returns:
        ``(ids, embeddings, meta)``: the ids in row order, the (N, D) float32 tensor, and the metadata with JSON
        values decoded (``count``, ``dim``, ``skipped`` as ints; ``skipped_reasons`` a dict, ``skipped_records`` a
        list; ``ids`` removed, it is the first element).

    Raises:
        FileNotFoundError: no such file; ValueError: not an imglish embeddings file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
            if raw.get("format") != FORMAT:
                raise ValueError(f"{path} is not an imglish embeddings file (format {raw.get('format')!r}, "
                                 f"expected {FORMAT!r})")
            emb = f.get_tensor("embeddings")
            if raw.get("ids") == "@ids_json":
                ids_json = bytes(f.get_tensor("ids_json").numpy()).decode("utf-8")
            else:
                ids_json = raw["ids"]
    except ValueError:
        raise
    except Exception as err:  # safetensors' own errors
        raise ValueError(f"{path} cannot be read as safetensors: {err}") from None
    meta: dict[str, Any] = dict(raw)
    meta.pop("ids", None)
    for key in ("count", "dim", "skipped"):
        meta[key] = int(meta[key])
    for key in ("skipped_reasons", "skipped_records"):
        meta[key] = json.loads(meta[key])
    return json.loads(ids_json), emb, meta


# ============================================================================================= the run
@dataclasses.dataclass
class EmbedSummary:
    """What :func:`embed` did.

    Attributes:
        out: the output file (written only when ``complete``).
        kind: ``"image"`` or ``"text"``.
        count: rows embedded (in ``out``; so far, when not complete).
        dim: embedding width.
        skipped: bad records skipped (so far).
        skipped_reasons: reason -> count.
        skipped_records: the skipped records (source, id, reason, detail), in input order.
        complete: False when stopped early by ``stop_after_parts`` (the parts stay for ``resume``).
        resumed_records: records already done by earlier runs when this one started.
        seconds: wall time of this call's embedding loop (after loading the model and indexing).
    """

    out: Path
    kind: str
    count: int
    dim: int
    skipped: int
    skipped_reasons: dict[str, int]
    skipped_records: list[SkippedRecord]
    complete: bool
    resumed_records: int = 0
    seconds: float = 0.0

    def skipped_line(self, examples: int = 3) -> str:
        """``skipped N bad files: id (reason), ...`` (empty when nothing was skipped)."""
        if not self.skipped:
            return ""
        noun = ("text" if self.kind == "text" else "file") + ("s" if self.skipped > 1 else "")
        shown = ", ".join(f"{r.record_id} ({r.reason}: {r.detail})" if r.detail else f"{r.record_id} ({r.reason})"
                          for r in self.skipped_records[:examples])
        more = f", ... {self.skipped - examples} more" if self.skipped > examples else ""
        return f"skipped {self.skipped} bad {noun}: {shown}{more}"


def _load_pipeline(checkpoint: str | os.PathLike, model: str | None, tokenizer: Any, device: Any, precision: str,
                   batch_size: int) -> Any:
    import imglish

    return imglish.pipeline("embed", checkpoint, model=model, tokenizer=tokenizer, device=device,
                            precision=precision, batch_size=batch_size)


def embed(
    checkpoint: str | os.PathLike,
    images: str | os.PathLike | None = None,
    texts: str | os.PathLike | None = None,
    out: str | os.PathLike = "embeddings.safetensors",
    *,
    model: str | None = None,
    tokenizer: Any = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    resume: bool = False,
    strict: bool = False,
    part_batches: int = DEFAULT_PART_BATCHES,
    progress: bool = False,
    stop_after_parts: int | None = None,
    pipe: Any = None,
    on_part: Callable[[int], None] | None = None,
) -> EmbedSummary:
    """Embed every input of an image folder, webdataset shards or a text file into one safetensors file.

    Args:
        checkpoint: a retrieval, backbone or pretraining checkpoint (imglish ``model.safetensors``, or an official
            ``.pth`` with ``model=``).
        images: a folder (every image under it, recursively, sorted; id = path relative to it) or local webdataset
            tar shards (a brace pattern, a folder of ``.tar`` files, or a ``::``-separated list; id = ``__key__``).
        texts: a ``.txt`` (one text per line; id = line number from 0; blank lines skipped and counted) or a
            ``.jsonl`` (``{"id": ..., "text": ...}`` per line). Exactly one of ``images`` and ``texts``.
        out: the output safetensors file (see the module docstring); parts go to ``OUT.parts/``.
        model, tokenizer: for official checkpoints (see :func:`imglish.pipeline`).
        batch_size: records per forward; part boundaries and so ``resume`` depend on it (it must not change).
        num_workers: DataLoader worker processes for decoding and transforming (0: in the main process).
        device, precision: where and how the model runs (``"fp32"`` or ``"bf16"``); embeddings are float32.
        resume: continue after the last complete part of an earlier run of the same job.
        strict: stop at the first bad record (ValueError naming it) instead of skipping it.
        part_batches: batches per part file (how much work an interruption can lose at most).
        progress: show a tqdm progress bar (stderr).
        stop_after_parts: stop after this many parts have been written in this call (for tests and time-boxed jobs;
            the summary then has ``complete=False``).
        pipe: an already built embed pipeline to use instead of loading ``checkpoint`` (``checkpoint`` is then only
            recorded in the metadata).
        on_part: called with the number of complete parts after each part is written.

    Returns:
        An :class:`EmbedSummary`.

    Raises:
        FileNotFoundError: a missing checkpoint, folder, shard or texts file.
        ValueError: a checkpoint of another task; no images found; an existing ``out`` or parts folder without
            ``resume``; a resume with other settings or inputs; every record bad; with ``strict``, the first bad
            record.
    """
    if (images is None) == (texts is None):
        raise ValueError("embed needs exactly one of images (a folder or webdataset shards) and texts (a file)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    if isinstance(part_batches, bool) or not isinstance(part_batches, int) or part_batches < 1:
        raise ValueError(f"part_batches must be a positive integer, got {part_batches!r}")
    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    rank, world = _rank_and_world()
    if world > 1 and torch.cuda.is_available() and (device is None or str(device) == "cuda"):
        device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"  # one GPU per process
    if not resume and (out.exists() or parts.exists()):
        which = out if out.exists() else parts
        raise ValueError(f"{which} already exists: pass --resume to continue that run, or remove it")

    # ---- the inputs (cheap checks before the model is loaded)
    counter = BadRecordCounter()
    if texts is not None:
        index = _index_texts(os.fspath(texts), counter)
    else:
        spec = os.fspath(images)
        if not _looks_like_shards(spec) and not Path(spec).exists():
            raise FileNotFoundError(f"image folder {spec!r} does not exist")
        index = _index_shards(spec, counter) if _looks_like_shards(spec) else _index_folder(spec)
    if strict and index.bad:
        _raise_strict(index.bad[0][1])

    if pipe is None:
        pipe = _load_pipeline(checkpoint, model, tokenizer, device, precision, batch_size)
    if index.kind == "text" and getattr(pipe.processor, "tokenizer", None) is None:
        raise ValueError(f"texts need a text tokenizer: {checkpoint} has none beside it; pass tokenizer= "
                         "(--tokenizer) the SentencePiece model")
    model_name = str(getattr(pipe.model, "model_name", None) or "")
    job = {
        "format": FORMAT, "kind": index.kind, "source": str(index.source), "fingerprint": index.fingerprint,
        "records": len(index.records), "checkpoint": str(checkpoint), "model_name": model_name,
        "precision": pipe.precision, "batch_size": batch_size, "part_batches": part_batches,
    }

    # ---- where to start
    if resume and out.exists() and not parts.exists():
        return _already_done(out, job, index)
    complete = _read_progress(parts, job) if resume and parts.exists() else set()
    parallel.barrier("every rank to read the state of the parts folder")
    if rank == 0:  # progress.json lists every finished part (also those other ranks recorded before)
        parts.mkdir(parents=True, exist_ok=True)
        _write_progress(parts, job, sorted(complete), 0)
    parallel.barrier("rank 0 to create the parts folder")

    n_batches = -(-len(index.records) // batch_size)
    n_parts = max(1, -(-n_batches // part_batches))
    mine = [k for k in range(n_parts) if k not in complete and k % world == rank]
    batches = [b for k in mine for b in range(k * part_batches, min((k + 1) * part_batches, n_batches))]
    resumed = sum(_part_records(k, part_batches, batch_size, len(index.records)) for k in complete)
    for k in sorted(complete):  # the bad records of finished parts count in this run's totals too
        counter.absorb(_part_info(_part_path(parts, k))[1])
    my_complete = sorted(complete) if rank == 0 else []

    # ---- the loop
    worker_pipe = copy.copy(pipe)
    worker_pipe.model = None  # workers only preprocess; do not ship the weights
    dataset = _EmbedDataset(index.records, index.kind, worker_pipe, Path(index.source).name)
    loader = DataLoader(dataset, batch_sampler=_RangeBatches(len(index.records), batch_size, batches),
                        num_workers=num_workers, collate_fn=_collate, persistent_workers=False)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        mine_total = sum(_part_records(k, part_batches, batch_size, len(index.records)) for k in mine)
        desc = f"embed {index.kind}s" + (f" (rank 0 of {world})" if world > 1 else "")
        bar = tqdm(total=mine_total, desc=desc, unit="img" if index.kind == "image" else "text",
                   dynamic_ncols=True)
    dim = 0
    written_now = 0
    pending_emb: list[torch.Tensor] = []
    pending_idx: list[int] = []
    pending_skip: list[SkippedRecord] = []
    index_bad = sorted(index.bad, key=lambda t: t[0])
    start = time.perf_counter()
    stopped = False
    try:
        for batch_no, (positions, _ids, tensors, skipped) in zip(batches, loader):
            lo, hi = batch_no * batch_size, min((batch_no + 1) * batch_size, len(index.records))
            # records found bad while indexing sit between records; give them to the part that covers their place
            upper = hi if hi < len(index.records) else len(index.records) + 1
            pending_skip.extend(r for pos, r in index_bad if lo <= pos < upper)
            if strict and skipped:
                _raise_strict(skipped[0], parts, len(complete) + written_now)
            pending_skip.extend(skipped)
            counter.absorb(skipped)
            if tensors is not None:
                rows = pipe.forward(tensors)
                pending_emb.append(torch.stack(rows).float())
                pending_idx.extend(positions)
            if bar is not None:
                bar.update(hi - lo)
                if counter.total:
                    bar.set_postfix(skipped=counter.total, refresh=False)
            if (batch_no + 1) % part_batches == 0 or batch_no + 1 == n_batches:
                part = batch_no // part_batches
                d = _write_part(parts, part, pending_emb, pending_idx, pending_skip)
                dim = dim or d
                written_now += 1
                my_complete.append(part)
                _write_progress(parts, job, my_complete, rank)
                pending_emb, pending_idx, pending_skip = [], [], []
                if on_part is not None:
                    on_part(len(complete) + written_now if world == 1 else written_now)
                if stop_after_parts is not None and written_now >= stop_after_parts and written_now < len(mine):
                    stopped = True
                    break
        if n_batches == 0 and rank == 0:  # every record was found bad while indexing: one empty part lists them
            _write_part(parts, 0, [], [], [r for _, r in index_bad])
            _write_progress(parts, job, [0], rank)
            written_now = 1
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    if world > 1:
        stopped = any(parallel.all_gather_objects(stopped))  # also waits for every rank's parts
    if stopped:
        done = sorted(_read_progress(parts, job))
        rows = sum(_part_info(_part_path(parts, k))[0] for k in done)
        return EmbedSummary(out, index.kind, rows, dim, counter.total, counter.counts, counter.records(),
                            complete=False, resumed_records=resumed, seconds=seconds)
    if rank != 0:
        parallel.barrier("rank 0 to join the parts into the output file")
        summary = _already_done(out, job, index)
        summary.resumed_records, summary.seconds = resumed, seconds
        return summary
    missing = sorted(set(range(n_parts)) - _read_progress(parts, job))
    if missing:
        raise ValueError(f"parts {missing[:5]} of {parts} are missing after every rank finished: rerun with --resume")
    infos = [_part_info(_part_path(parts, k)) for k in range(n_parts)]
    rows_done = sum(n for n, _ in infos)
    # the skipped records in part order: the same list for a resumed and an uninterrupted run
    records = [r for _, skipped in infos for r in skipped]
    summary = EmbedSummary(out, index.kind, rows_done, dim, len(records), dict(Counter(r.reason for r in records)),
                           records, complete=True, resumed_records=resumed, seconds=seconds)
    if rows_done == 0:
        shutil.rmtree(parts)
        parallel.barrier("rank 0 to join the parts into the output file")
        raise ValueError(f"none of the {len(index.records) + len(index.bad)} inputs of {index.source} could be "
                         f"embedded; {summary.skipped_line()}")
    summary.dim = _join_parts(parts, n_parts, out, job, index, records)
    shutil.rmtree(parts)
    parallel.barrier("rank 0 to join the parts into the output file")
    return summary


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size under torchrun (joining the process group), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    info = parallel.init_distributed("gloo")  # only objects and barriers go between the ranks
    return info.rank, info.world_size


def _part_records(k: int, part_batches: int, batch_size: int, n: int) -> int:
    """How many records part ``k`` covers."""
    lo = k * part_batches * batch_size
    return max(0, min(n, (k + 1) * part_batches * batch_size) - lo)


def _raise_strict(rec: SkippedRecord, parts: Path | None = None, complete: int = 0) -> None:
    """Stop at a bad record (``--strict``); the parts folder is kept when it holds finished parts."""
    kept = ""
    if parts is not None and complete:
        kept = f"; the {complete} finished part(s) stay in {parts}: fix the input and rerun with --resume"
    elif parts is not None:
        shutil.rmtree(parts, ignore_errors=True)
    err = BadRecordError(rec.source, rec.record_id, rec.reason, rec.detail)
    raise ValueError(f"stopped at the first bad input (--strict): {err}{kept}")


def _write_part(parts: Path, k: int, embs: list[torch.Tensor], idx: list[int], skipped: list[SkippedRecord]) -> int:
    emb = torch.cat(embs) if embs else torch.zeros(0, 0)
    _atomic_save({"embeddings": emb, "index": torch.tensor(idx, dtype=torch.int64)}, _part_path(parts, k),
                 {"skipped_records": _skipped_json(skipped)})
    return int(emb.shape[1]) if emb.ndim == 2 else 0


def _part_info(path: Path) -> tuple[int, list[SkippedRecord]]:
    from safetensors import safe_open

    if not path.is_file():
        raise ValueError(f"{path} is missing although {path.parent / _PROGRESS} counts it as complete; remove "
                         f"{path.parent} and start again")
    with safe_open(str(path), framework="pt") as f:
        n = int(f.get_slice("index").get_shape()[0])
        skipped = [SkippedRecord(**r) for r in json.loads(f.metadata()["skipped_records"])]
    return n, skipped


def _write_progress(parts: Path, job: dict[str, Any], complete: Sequence[int], rank: int) -> None:
    """Record the parts ``rank`` has finished: rank 0 in ``progress.json`` (with the job), others beside it."""
    from imglish.training.evaluate import write_json

    if rank == 0:
        write_json(parts / _PROGRESS, {**job, "complete": sorted(complete)})
    else:
        write_json(parts / f"progress-rank{rank}.json", {"complete": sorted(complete)})


def _read_progress(parts: Path, job: dict[str, Any]) -> set[int]:
    """The finished parts recorded by every rank (checking that the job is the same)."""
    path = parts / _PROGRESS
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot resume: {path} is missing or unreadable ({err}); remove {parts} and start "
                         "again") from None
    for key, value in job.items():
        if state.get(key) == value:
            continue
        if key in ("fingerprint", "records"):
            raise ValueError(f"cannot resume {parts}: the inputs ({job['source']}) changed since the interrupted "
                             f"run; remove {parts} to start again")
        raise ValueError(f"cannot resume {parts}: {key} was {state.get(key)!r} in the interrupted run, now "
                         f"{value!r}; use the same {key} or remove {parts} to start again")
    complete = {int(k) for k in state.get("complete", [])}
    for other in sorted(parts.glob("progress-rank*.json")):
        try:
            complete |= {int(k) for k in json.loads(other.read_text()).get("complete", [])}
        except (OSError, ValueError, AttributeError) as err:
            raise ValueError(f"cannot resume: {other} is unreadable ({err}); remove {parts} and start again") from None
    return complete


def _already_done(out: Path, job: dict[str, Any], index: _Index) -> EmbedSummary:
    ids, emb, meta = load_embeddings(out)
    if meta.get("fingerprint") != job["fingerprint"] or meta.get("checkpoint") != job["checkpoint"]:
        raise ValueError(f"{out} already exists and was made from other inputs or another checkpoint: remove it to "
                         "embed again")
    records = [SkippedRecord(**r) for r in meta["skipped_records"]]
    return EmbedSummary(out, index.kind, len(ids), int(emb.shape[1]), meta["skipped"], meta["skipped_reasons"],
                        records, complete=True, resumed_records=len(index.records))


def _join_parts(parts: Path, n_parts: int, out: Path, job: dict[str, Any], index: _Index,
                skipped: list[SkippedRecord]) -> int:
    """Write ``out`` (atomically) from parts ``0..n_parts-1``; returns the embedding width."""
    from safetensors import safe_open

    embs: list[torch.Tensor] = []
    positions: list[torch.Tensor] = []
    for k in range(n_parts):
        with safe_open(str(_part_path(parts, k)), framework="pt") as f:
            e = f.get_tensor("embeddings")
            if e.numel():
                embs.append(e)
            positions.append(f.get_tensor("index"))
    emb = torch.cat(embs).float().contiguous()
    ids = [index.records[int(i)].id for i in torch.cat(positions)]
    ids_json = json.dumps(ids)
    meta = {
        "format": FORMAT, "kind": index.kind, "count": str(len(ids)), "dim": str(emb.shape[1]),
        "checkpoint": job["checkpoint"], "model_name": job["model_name"], "precision": job["precision"],
        "source": job["source"], "fingerprint": job["fingerprint"],
        "skipped": str(len(skipped)), "skipped_reasons": json.dumps(dict(Counter(r.reason for r in skipped))),
        "skipped_records": _skipped_json(skipped[:MAX_SKIPPED_LISTED]),
    }
    tensors = {"embeddings": emb}
    if len(ids_json.encode()) <= MAX_IDS_METADATA_BYTES:
        meta["ids"] = ids_json
    else:
        meta["ids"] = "@ids_json"
        tensors["ids_json"] = torch.frombuffer(bytearray(ids_json.encode()), dtype=torch.uint8)
    _atomic_save(tensors, out, meta)
    return int(emb.shape[1])
