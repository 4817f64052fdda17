"""Text tokenizer: SentencePiece with the XLM-R (fairseq) id convention that BEiT-3 uses.

The official code tokenizes with ``transformers.XLMRobertaTokenizer("beit3.spm")`` (spec §4.1). This module
reproduces its ids exactly with ``sentencepiece`` alone:

====================  ==========================================
id                    token
====================  ==========================================
0                     ``<s>`` (BOS, also the CLS)
1                     ``<pad>``
2                     ``</s>`` (EOS, also the SEP)
3                     ``<unk>`` (SentencePiece id 0)
piece id + 1          every other SentencePiece piece
pieces + 1            ``<mask>`` (64001 for ``beit3.spm``)
====================  ==========================================

``vocab_size`` is ``pieces + 2`` (64002 for ``beit3.spm``); the BEiT-3 embedding has 8 more, unused rows.
As in the XLM-R tokenizer, the literal strings ``<s>``, ``</s>``, ``<pad>``, ``<unk>`` and ``<mask>`` inside a
text are recognised as those special tokens (``<mask>`` also swallows the spaces before it).

A batch call builds model inputs as the official ``_get_text_segment`` does (spec §4.2): truncate the pieces to
``max_length - 2``, wrap them in ``<s> … </s>``, pad with ``<pad>``, and return a ``padding_mask`` where 1 marks
padding. An empty text there is an error, as in the official datasets.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

__all__ = ["TextTokenizer", "train_sentencepiece", "SPECIAL_TOKENS"]

#: The four fairseq special tokens and their fixed ids (``<mask>`` is added after the pieces).
SPECIAL_TOKENS: dict[str, int] = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}

_OFFSET = 1  # fairseq id = sentencepiece id + 1 for ordinary pieces


class TextTokenizer:
    """A SentencePiece model read with the XLM-R / BEiT-3 id convention.

    Args:
        path: a SentencePiece ``.model`` file (the official ``beit3.spm`` or one made by
            :func:`train_sentencepiece`).
        model_proto: the serialized model instead of ``path`` (used when a tokenizer travels inside a
            checkpoint).

    Attributes:
        bos_token_id: 0 (``<s>``). Also ``cls_token_id``.
        pad_token_id: 1 (``<pad>``).
        eos_token_id: 2 (``</s>``). Also ``sep_token_id``.
        unk_token_id: 3 (``<unk>``).
        mask_token_id: number of pieces + 1 (``<mask>``).
        vocab_size: number of pieces + 2.
    """

    bos_token_id: int = 0
    cls_token_id: int = 0
    pad_token_id: int = 1
    eos_token_id: int = 2
    sep_token_id: int = 2
    unk_token_id: int = 3

    def __init__(self, path: str | os.PathLike | None = None, *, model_proto: bytes | None = None) -> None:
        if (path is None) == (model_proto is None):
            raise ValueError("TextTokenizer needs exactly one of `path` (a SentencePiece .model file) or `model_proto`")
        self._sp = spm.SentencePieceProcessor()
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"SentencePiece model file {path} does not exist")
            model_proto = path.read_bytes()
            self.path: Path | None = path
        else:
            self.path = None
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except Exception as err:  # sentencepiece raises RuntimeError/OSError depending on version
            where = str(path) if path is not None else "model_proto"
            raise ValueError(f"{where} is not a valid SentencePiece model: {err}") from err
        self._proto: bytes = bytes(model_proto)
        self.num_pieces: int = self._sp.GetPieceSize()
        if self.num_pieces < 4:
            raise ValueError(f"SentencePiece model has only {self.num_pieces} pieces; expected at least 4")
        self.mask_token_id: int = self.num_pieces + _OFFSET
        self.vocab_size: int = self.num_pieces + 2
        self._special_to_id: dict[str, int] = {**SPECIAL_TOKENS, "<mask>": self.mask_token_id}
        self._id_to_special: dict[int, str] = {v: k for k, v in self._special_to_id.items()}
        # Longest first, so that the alternation prefers "</s>" over a shorter overlap.
        names = sorted(self._special_to_id, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "<in memory>"
        return f"TextTokenizer({where}, vocab_size={self.vocab_size}, mask_token_id={self.mask_token_id})"

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model (to save the tokenizer alongside a checkpoint)."""
        return self._proto

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of ``<s>``, ``<pad>``, ``</s>``, ``<unk>`` and ``<mask>``."""
        return frozenset(self._id_to_special)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the SentencePiece model file (atomically) and return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(self._proto)
        os.replace(tmp, path)
        return path

    # -------------------------------------------------------------- tokens/ids
    def tokenize(self, text: str) -> list[str]:
        """Split a text into pieces, keeping literal special tokens whole (as ``XLMRobertaTokenizer.tokenize``).

        Args:
            text: any string.

        Returns:
            The piece strings, without ``<s>``/``</s>`` around them.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        parts = self._special_re.split(text)
        # parts alternates: plain, special, plain, special, ..., plain
        for i in range(1, len(parts), 2):
            if parts[i] == "<mask>" and parts[i - 1]:
                parts[i - 1] = parts[i - 1].rstrip()  # <mask> eats the whitespace on its left
        tokens: list[str] = []
        for i, part in enumerate(parts):
            if not part:
                continue
            if i % 2 == 1:
                tokens.append(part)
            else:
                tokens.extend(self._sp.encode(part, out_type=str))
        return tokens

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Map piece strings to ids (unknown pieces become ``unk_token_id``)."""
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _token_to_id(self, token: str) -> int:
        special = self._special_to_id.get(token)
        if special is not None:
            return special
        sp_id = self._sp.PieceToId(token)
        return sp_id + _OFFSET if sp_id else self.unk_token_id

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        """Map ids back to piece strings (special ids to their names)."""
        if isinstance(ids, int):
            return self._id_to_token(ids)
        return [self._id_to_token(int(i)) for i in ids]

    def _id_to_token(self, idx: int) -> str:
        if idx in self._id_to_special:
            return self._id_to_special[idx]
        if not 0 <= idx < self.vocab_size:
            raise ValueError(f"token id {idx} is outside the vocabulary [0, {self.vocab_size})")
        return self._sp.IdToPiece(idx - _OFFSET)

    # ---------------------------------------------------------- encode/decode
    def encode(self, text: str, *, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        """Ids of one text, by default wrapped as ``[<s>] + pieces + [</s>]``.

        Args:
            text: any string; an empty one gives ``[0, 2]`` (as the XLM-R tokenizer does).
            add_special_tokens: wrap in ``<s>`` … ``</s>``.
            max_length: if given, truncate the pieces so the result has at most this many ids.

        Returns:
            A list of ints.
        """
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        assert isinstance(ids, list)
        if not add_special_tokens:
            return ids[:max_length] if max_length is not None else ids
        if max_length is not None:
            if max_length < 2:
                raise ValueError(f"max_length must be at least 2 to fit <s> and </s>, got {max_length}")
            ids = ids[: max_length - 2]
        return [self.bos_token_id, *ids, self.eos_token_id]

    def decode(self, ids: Iterable[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        """Turn ids back into text.

        Args:
            ids: a sequence of ids (or a 1-D tensor). Ids outside ``[0, vocab_size)`` (the unused embedding rows
                64002..64009 of BEiT-3) and, by default, the special ids are skipped.
            skip_special_tokens: drop ``<s>``, ``<pad>``, ``</s>``, ``<unk>``, ``<mask>``; when False they are
                written out by name.

        Returns:
            The decoded string.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D sequence of ids, got a tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        pieces: list[int] = []
        out: list[str] = []
        for raw in ids:
            idx = int(raw)
            if idx in self._id_to_special:
                if not skip_special_tokens:
                    if pieces:
                        out.append(self._sp.decode(pieces))
                        pieces = []
                    out.append(self._id_to_special[idx])
                continue
            if not 0 <= idx < self.vocab_size:
                continue
            pieces.append(idx - _OFFSET)
        if pieces:
            out.append(self._sp.decode(pieces))
        return "".join(out)

    def batch_decode(self, batch: Iterable[Iterable[int]] | torch.Tensor, **kwargs: Any) -> list[str]:
        """:meth:`decode` for each row."""
        return [self.decode(row, **kwargs) for row in batch]

    # ------------------------------------------------------------- batch call
    def __call__(
        self,
        texts: str | Sequence[str],
        max_length: int = 64,
        *,
        padding: str = "max_length",
        return_tensors: str | None = "pt",
        allow_empty: bool = False,
    ) -> dict[str, Any]:
        """Build model inputs for a batch of texts (spec §4.2).

        Args:
            texts: one string or a list of strings.
            max_length: the official ``num_max_bpe_tokens`` (64 for VQA/NLVR2/retrieval, 32 for captioning
                training); pieces beyond ``max_length - 2`` are dropped.
            padding: ``"max_length"`` pads every row to ``max_length`` (the official behaviour);
                ``"longest"`` pads to the longest row of the batch.
            return_tensors: ``"pt"`` for int64 tensors, ``None`` for lists.
            allow_empty: accept texts with no pieces (they become ``<s> </s>``); by default they raise, as
                the official datasets do for captions and questions.

        Returns:
            ``{"input_ids": (B, L) long, "padding_mask": (B, L) long}`` with 1 marking padding.

        Raises:
            ValueError: an empty text (unless ``allow_empty``), bad ``max_length`` or ``padding``.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a str or a sequence of str")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 to fit <s> and </s>, got {max_length}")
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        rows: list[list[int]] = []
        for i, text in enumerate(texts):
            pieces = self.encode(text, add_special_tokens=False)
            if not pieces and not allow_empty:
                raise ValueError(
                    f"text {i} of the batch ({text!r}) has no tokens; captions and questions must not be empty"
                )
            rows.append([self.bos_token_id, *pieces[: max_length - 2], self.eos_token_id])
        length = max_length if padding == "max_length" else max((len(r) for r in rows), default=2)
        input_ids = [r + [self.pad_token_id] * (length - len(r)) for r in rows]
        padding_mask = [[0] * len(r) + [1] * (length - len(r)) for r in rows]
        if return_tensors == "pt":
            return {
                "input_ids": torch.tensor(input_ids, dtype=torch.long).reshape(len(rows), length),
                "padding_mask": torch.tensor(padding_mask, dtype=torch.long).reshape(len(rows), length),
            }
        return {"input_ids": input_ids, "padding_mask": padding_mask}


def train_sentencepiece(
    files: Sequence[str | os.PathLike],
    vocab_size: int,
    output: str | os.PathLike,
    *,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    input_sentence_size: int = 2_000_000,
    num_threads: int = 1,
    seed: int | None = None,
    extra_options: dict[str, Any] | None = None,
) -> Path:
    """Train a SentencePiece model whose ids follow the XLM-R convention once loaded by :class:`TextTokenizer`.

    The model is a unigram LM (as XLM-R's) with SentencePiece's default ``nmt_nfkc`` normalisation and pieces
    0/1/2 = ``<unk>``/``<s>``/``</s>``, the layout ``beit3.spm`` has. The resulting :class:`TextTokenizer` has
    ``vocab_size + 2`` ids.

    Args:
        files: plain-text files, one sentence per line.
        vocab_size: number of SentencePiece pieces (``beit3.spm`` has 64000).
        output: the ``.model`` file to write (a ``.vocab`` file is written next to it). Written atomically.
        model_type: ``"unigram"`` (default), ``"bpe"``, ``"char"`` or ``"word"``.
        character_coverage: fraction of characters covered by the alphabet.
        input_sentence_size: at most this many sentences are sampled for training.
        num_threads: training threads.
        seed: if given, seeds SentencePiece's random generator (sentence sampling).
        extra_options: more ``SentencePieceTrainer`` options, passed through.

    Returns:
        The path of the written ``.model`` file.

    Raises:
        FileNotFoundError: an input file is missing.
        ValueError: no input files, a bad ``vocab_size``, or a corpus too small for ``vocab_size``.
    """
    if not files:
        raise ValueError("train_sentencepiece needs at least one input text file")
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"text file {p} does not exist")
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be at least 4, got {vocab_size}")
    if model_type not in ("unigram", "bpe", "char", "word"):
        raise ValueError(f"model_type must be one of unigram, bpe, char, word; got {model_type!r}")
    output = Path(output)
    if output.suffix != ".model":
        output = output.with_name(output.name + ".model")
    output.parent.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = dict(
        input=",".join(str(p) for p in paths),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=num_threads,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    if seed is not None:
        spm.set_random_generator_seed(seed)
    options.update(extra_options or {})
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".spm-train-") as tmp:
        prefix = os.path.join(tmp, "spm")
        try:
            spm.SentencePieceTrainer.Train(model_prefix=prefix, **options)
        except RuntimeError as err:
            raise ValueError(f"SentencePiece training on {[str(p) for p in paths]} failed: {err}") from err
        os.replace(prefix + ".vocab", output.with_suffix(".vocab"))
        os.replace(prefix + ".model", output)
    return output
