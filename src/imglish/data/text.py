"""The text-only stream: plain text files, one text per line, index-addressable without loading them whole."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imglish.data.base import RecordDataset, Tokenizer
from imglish.data.skip import BadRecordCounter, SkippedRecord

__all__ = ["TextCorpus"]


class TextCorpus(RecordDataset):
    """Lines of one or more UTF-8 text files as records.

    The constructor scans the files once and keeps the byte offset of every non-blank line (a compact int64 array),
    so ``corpus[i]`` seeks and reads one line. Blank or whitespace-only lines are not texts: they are counted as
    ``"empty text"`` and left out. Lines that are not valid UTF-8 are skipped when read (``"bad encoding"``).

    Args:
        paths: a file or a list of files.
        tokenizer, skip: see :class:`~imglish.data.base.RecordDataset`.

    Records: ``text`` [, ``text_ids``], ``index`` (int), ``source`` (``"<file>:<line>"``).

    Raises:
        FileNotFoundError: if a file is missing.
    """

    source_name = "text"

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], tokenizer: Tokenizer | None = None,
                 skip: BadRecordCounter | None = None, **kwargs: Any) -> None:
        super().__init__(None, tokenizer, skip, **kwargs)
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [Path(p) for p in paths]
        file_idx, offsets, lines = [], [], []
        for k, p in enumerate(self.paths):
            if not p.is_file():
                raise FileNotFoundError(f"text file {p} does not exist")
            pos = 0
            with open(p, "rb") as f:
                for n, raw in enumerate(f, start=1):
                    if raw.strip():
                        file_idx.append(k)
                        offsets.append(pos)
                        lines.append(n)
                    else:
                        self.skip.report(p.name, f"line {n}", "empty text")
                    pos += len(raw)
        self._file = np.asarray(file_idx, dtype=np.int32)
        self._offset = np.asarray(offsets, dtype=np.int64)
        self._line = np.asarray(lines, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._offset)

    def __getitem__(self, i: int) -> dict[str, Any] | SkippedRecord:
        if not -len(self) <= i < len(self):
            raise IndexError(f"text index {i} out of range for {len(self)} lines")
        k = int(self._file[i])
        src = f"{self.paths[k].name}:{int(self._line[i])}"
        with open(self.paths[k], "rb") as f:
            f.seek(int(self._offset[i]))
            raw = f.readline()
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            return self.skip.report(self.source_name, src, "bad encoding", str(err))
        fields = self._text_fields(text, src)
        if isinstance(fields, SkippedRecord):
            return fields
        return {**fields, "index": int(i) % len(self), "source": src}
