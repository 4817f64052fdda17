"""Text segments, padding and batching, with the one padding-mask convention of imglish: **1 = pad**.

* :func:`text_segment` builds one official sequence (spec §4.2): ``[BOS] + ids[:max_len-2] + [EOS]``, padded.
* :func:`pad_sequences` pads a list of id lists into ``(B, T)`` ids and padding mask.
* :func:`collate_records` turns a list of reader records (dicts) into a batch, dropping
  :class:`~imglish.data.skip.SkippedRecord` items and listing them under ``batch["skipped"]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from imglish.data.skip import SkippedRecord

__all__ = ["Collator", "collate_records", "pad_sequences", "text_segment"]


def text_segment(
    ids: Sequence[int],
    max_len: int,
    *,
    bos_id: int = 0,
    eos_id: int = 2,
    pad_id: int = 1,
    add_special: bool = True,
) -> tuple[list[int], list[int], int]:
    """One text sequence in the official layout (spec §4.2).

    Args:
        ids: the token ids of the text, **without** BOS/EOS when ``add_special`` (as in the official index files),
            or already wrapped when ``add_special=False`` (then only truncation keeps the final EOS).
        max_len: total length including BOS, EOS and padding (``--num_max_bpe_tokens``).
        bos_id, eos_id, pad_id: special ids (XLM-R convention: 0, 2, 1).
        add_special: wrap ``ids`` with BOS/EOS.

    Returns:
        ``(tokens, padding_mask, num_tokens)``: two lists of length ``max_len`` (padding_mask 1 at pads) and the
        number of real tokens.

    Raises:
        ValueError: if ``ids`` is empty (an empty text is an error, as in the official code) or ``max_len < 3``.
    """
    if max_len < 3:
        raise ValueError(f"max_len must be at least 3 (BOS, one token, EOS), got {max_len}")
    ids = list(ids)
    if add_special:
        if not ids:
            raise ValueError("empty text: a text segment needs at least one token")
        tokens = [bos_id] + ids[: max_len - 2] + [eos_id]
    else:
        if len(ids) < 3:
            raise ValueError(f"a wrapped text needs BOS, at least one token and EOS, got {ids}")
        tokens = ids if len(ids) <= max_len else ids[: max_len - 1] + [eos_id]
    n = len(tokens)
    return tokens + [pad_id] * (max_len - n), [0] * n + [1] * (max_len - n), n


def pad_sequences(
    seqs: Sequence[Sequence[int]],
    *,
    pad_id: int = 1,
    max_length: int | None = None,
    eos_id: int | None = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into a batch.

    Args:
        seqs: B id lists (already with BOS/EOS).
        pad_id: padding id (1).
        max_length: pad (and truncate) to this length; ``None`` pads to the longest sequence.
        eos_id: when truncating, the last kept token is replaced by this id (None keeps it as is).

    Returns:
        ``(input_ids, padding_mask)``: ``(B, T)`` long tensors; padding_mask is 1 at padding.

    Raises:
        ValueError: on an empty batch or an empty sequence.
    """
    if len(seqs) == 0:
        raise ValueError("pad_sequences got an empty batch")
    lengths = [len(s) for s in seqs]
    if min(lengths) == 0:
        raise ValueError(f"pad_sequences got an empty sequence at position {lengths.index(0)}")
    t = max(lengths) if max_length is None else int(max_length)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.ones((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        s = list(s)
        if len(s) > t:
            s = s[:t]
            if eos_id is not None:
                s[-1] = eos_id
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 0
    return ids, mask


def _stack(key: str, values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        try:
            return torch.stack(values)
        except RuntimeError as err:
            raise ValueError(f"cannot stack field {key!r}: shapes {[tuple(v.shape) for v in values]}") from err
    if isinstance(first, bool):
        return torch.tensor(values, dtype=torch.bool)
    if isinstance(first, int):
        return torch.tensor(values, dtype=torch.long)
    if isinstance(first, float):
        return torch.tensor(values, dtype=torch.float32)
    return list(values)


def collate_records(
    records: Sequence[Any],
    *,
    pad_id: int = 1,
    max_length: int | None = None,
    text_keys: Sequence[str] = ("text_ids",),
) -> dict[str, Any]:
    """Batch reader records (dicts) into tensors.

    Tensors are stacked; ints become a long tensor, floats a float tensor, bools a bool tensor; other values (PIL
    images, strings, dicts) stay as lists. Each key in ``text_keys`` (lists of ids) is padded into ``(B, T)`` and gets
    a padding mask under ``padding_mask`` (for ``text_ids``) or ``<key>_padding_mask`` (others).

    :class:`SkippedRecord` items are removed and listed under ``"skipped"`` (always present, maybe empty) so the main
    process can count them with :meth:`BadRecordCounter.absorb`. A batch in which every record was skipped contains
    only ``"skipped"`` and ``"batch_size": 0``.

    Args:
        records: items from a reader.
        pad_id: padding id for text fields.
        max_length: fixed text length (``None`` pads to the longest).
        text_keys: record fields holding id lists.

    Returns:
        A dict of batched fields plus ``batch_size`` (int) and ``skipped`` (list of SkippedRecord).
    """
    skipped = [r for r in records if isinstance(r, SkippedRecord)]
    good = [r for r in records if not isinstance(r, SkippedRecord)]
    batch: dict[str, Any] = {"skipped": skipped, "batch_size": len(good)}
    if not good:
        return batch
    for r in good:
        if not isinstance(r, dict):
            raise TypeError(f"collate_records expects dict records, got {type(r).__name__}")
    keys = list(good[0].keys())
    for k in keys:
        values = [r.get(k) for r in good]
        if k in text_keys:
            ids, mask = pad_sequences(values, pad_id=pad_id, max_length=max_length)
            batch[k] = ids
            batch["padding_mask" if k == "text_ids" else f"{k}_padding_mask"] = mask
        elif any(v is None for v in values):
            batch[k] = values
        else:
            batch[k] = _stack(k, values)
    return batch


class Collator:
    """Picklable ``collate_fn`` for a DataLoader: :func:`collate_records` with fixed options.

    Args:
        pad_id: padding id.
        max_length: fixed text length or None.
        text_keys: fields holding id lists.
    """

    def __init__(self, pad_id: int = 1, max_length: int | None = None, text_keys: Sequence[str] = ("text_ids",)):
        self.pad_id = pad_id
        self.max_length = max_length
        self.text_keys = tuple(text_keys)

    def __call__(self, records: Sequence[Any]) -> dict[str, Any]:
        return collate_records(records, pad_id=self.pad_id, max_length=self.max_length, text_keys=self.text_keys)
