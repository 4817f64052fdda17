"""What every imglish reader shares: lazy image loading, optional transform and tokenizer, bad-record policy.

Readers are index-addressable ``torch.utils.data.Dataset`` classes that hold only their index (paths, texts, labels)
and no global state. ``dataset[i]`` returns a ``dict`` record (or a :class:`~imglish.data.skip.SkippedRecord`):

* ``"image"``: the ``PIL.Image`` from :func:`imglish.tokenizers.image.load_image`, passed through ``transform`` if one
  was given (so it may be a tensor);
* ``"text"``: the raw string, and ``"text_ids"`` when a ``tokenizer`` was given;
* dataset-specific fields (ids, labels, scores...).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from imglish.data.skip import BadRecordCounter, SkippedRecord
from imglish.tokenizers.image import ImageLoadError, load_image

__all__ = ["RecordDataset", "Tokenizer", "Transform", "encode_text"]

Transform = Callable[[Any], Any]
Tokenizer = Any  # an object with ``encode(str) -> list[int]`` (TextTokenizer) or a callable ``str -> list[int]``


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text``: ``tokenizer.encode(text)`` when it has ``encode`` (e.g. ``TextTokenizer``, which adds
    BOS/EOS), else ``tokenizer(text)``."""
    enc = getattr(tokenizer, "encode", None)
    ids = enc(text) if callable(enc) else tokenizer(text)
    return list(ids)


class RecordDataset(Dataset):
    """Base class of the map-style readers.

    Args:
        transform: applied to each loaded PIL image (e.g. a torchvision v2 transform); None keeps the PIL image.
        tokenizer: turns texts into ids (adds ``"text_ids"`` to records); None keeps strings only.
        skip: the bad-record policy and counter; a fresh non-strict counter if None.
        loader: image loader (``load_image`` by default; must raise ``ImageLoadError`` on bad files).
    """

    #: short name used in bad-record messages
    source_name: str = "dataset"

    def __init__(
        self,
        transform: Transform | None = None,
        tokenizer: Tokenizer | None = None,
        skip: BadRecordCounter | None = None,
        loader: Callable[[str | os.PathLike], Any] = load_image,
    ) -> None:
        self.transform = transform
        self.tokenizer = tokenizer
        self.skip = skip if skip is not None else BadRecordCounter()
        self.loader = loader

    def _image(self, path: str | os.PathLike, record_id: Any) -> Any:
        """Load (and transform) an image, or return a SkippedRecord / raise in strict mode."""
        try:
            img = self.loader(path)
        except ImageLoadError as err:
            reason = "image missing" if not Path(path).exists() else "image unreadable"
            return self.skip.report(self.source_name, record_id, reason, str(err))
        return self.transform(img) if self.transform is not None else img

    def _text_fields(self, text: str, record_id: Any) -> dict[str, Any] | SkippedRecord:
        """``{"text": ..., "text_ids": ...}``; a SkippedRecord if tokenization gives no usable ids."""
        out: dict[str, Any] = {"text": text}
        if self.tokenizer is not None:
            try:
                ids = encode_text(self.tokenizer, text)
            except ValueError as err:
                return self.skip.report(self.source_name, record_id, "text not tokenizable", str(err))
            out["text_ids"] = ids
        return out

    def _empty_text(self, text: Any) -> bool:
        return not isinstance(text, str) or not text.strip()
