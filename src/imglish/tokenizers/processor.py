"""``Processor``: the text tokenizer and image transforms of one model, saved and loaded with its weights.

A checkpoint is only usable with the preprocessing it was trained with (the tokenizer file, image size,
mean/std, interpolation, text length). ``Processor`` keeps those together::

    proc = Processor(TextTokenizer("beit3.spm"), TransformConfig.for_task("vqav2", 480), max_length=64)
    batch = proc(images=["a.jpg", "b.png"], text=["what colour is the cube?", "how many balls?"])
    # batch["image"] (2, 3, 480, 480), batch["input_ids"] (2, 64), batch["padding_mask"] (2, 64)

    proc.save_next_to("run/model.safetensors")   # writes run/processor.json and run/sentencepiece.model
    proc = Processor.find_for("run/model.safetensors")

On disk: ``processor.json`` (``{"format": "imglish-processor/1", "transform": {...}, "max_length": N,
"tokenizer_file": "sentencepiece.model" | null}``) and the SentencePiece model file beside it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from imglish.tokenizers.image import load_image
from imglish.tokenizers.text import TextTokenizer
from imglish.tokenizers.transforms import TransformConfig, transform_from_config

__all__ = ["Processor", "PROCESSOR_FILE", "TOKENIZER_FILE"]

PROCESSOR_FILE = "processor.json"
TOKENIZER_FILE = "sentencepiece.model"
_FORMAT = "imglish-processor/1"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


class Processor:
    """Turns raw images and texts into a model's input tensors.

    Args:
        tokenizer: the text tokenizer (None for a vision-only model).
        transform: the preprocessing of the model's task (its evaluation transform is the default).
        max_length: text length in tokens (the official ``num_max_bpe_tokens``).
    """

    def __init__(self, tokenizer: TextTokenizer | None, transform: TransformConfig, max_length: int = 64) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.tokenizer = tokenizer
        self.transform_config = transform
        self.max_length = max_length
        self._eval = transform_from_config(transform, train=False)
        self._train: Any = None

    def __repr__(self) -> str:
        return f"Processor(tokenizer={self.tokenizer!r}, transform={self.transform_config}, max_length={self.max_length})"

    def image_transform(self, train: bool = False) -> Any:
        """The torchvision transform (PIL image -> (3, S, S) tensor); ``train=True`` gives the augmentation."""
        if not train:
            return self._eval
        if self._train is None:
            self._train = transform_from_config(self.transform_config, train=True)
        return self._train

    def preprocess_images(self, images: Any, train: bool = False) -> torch.Tensor:
        """Images (paths, PIL images, or one of them) -> (B, 3, S, S) float tensor."""
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        tf = self.image_transform(train)
        out = []
        for img in images:
            if not isinstance(img, Image.Image):
                img = load_image(img)
            elif img.mode != "RGB":
                img = img.convert("RGB")
            x = tf(img)
            out.append(x[0] if isinstance(x, tuple) else x)
        return torch.stack(out)

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        *,
        train: bool = False,
        allow_empty_text: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Build a batch.

        Args:
            images: paths or PIL images (or one).
            text: a string or a list of strings.
            train: use the training augmentation.
            allow_empty_text: see :meth:`TextTokenizer.__call__`.

        Returns:
            ``{"image": (B, 3, S, S)}`` and/or ``{"input_ids": (B, L), "padding_mask": (B, L)}`` (1 = pad).
        """
        if images is None and text is None:
            raise ValueError("Processor needs images, text, or both")
        batch: dict[str, torch.Tensor] = {}
        if images is not None:
            batch["image"] = self.preprocess_images(images, train)
        if text is not None:
            if self.tokenizer is None:
                raise ValueError("this Processor has no text tokenizer (vision-only model)")
            batch.update(self.tokenizer(text, max_length=self.max_length, allow_empty=allow_empty_text))
        return batch

    # -------------------------------------------------------------------------------------------- disk
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "transform": self.transform_config.to_dict(),
            "max_length": self.max_length,
            "tokenizer_file": TOKENIZER_FILE if self.tokenizer is not None else None,
        }

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``processor.json`` (and the tokenizer model) into ``folder``; returns the JSON path."""
        folder = Path(folder)
        if self.tokenizer is not None:
            _atomic_write(folder / TOKENIZER_FILE, self.tokenizer.model_proto)
        path = folder / PROCESSOR_FILE
        _atomic_write(path, json.dumps(self.to_dict(), indent=2).encode())
        return path

    def save_next_to(self, checkpoint: str | os.PathLike) -> Path:
        """Save into the folder that holds ``checkpoint`` (the imglish convention)."""
        return self.save(Path(checkpoint).parent)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Processor":
        """Read a processor saved by :meth:`save` (``folder`` may also be the ``processor.json`` path)."""
        folder = Path(folder)
        path = folder if folder.suffix == ".json" else folder / PROCESSOR_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {PROCESSOR_FILE} at {path}")
        data = json.loads(path.read_text())
        if data.get("format") != _FORMAT:
            raise ValueError(f"{path} is not an imglish processor file (format {data.get('format')!r})")
        tok = None
        if data.get("tokenizer_file"):
            tok = TextTokenizer(path.parent / data["tokenizer_file"])
        return cls(tok, TransformConfig.from_dict(data["transform"]), int(data["max_length"]))

    @classmethod
    def find_for(cls, checkpoint: str | os.PathLike) -> "Processor | None":
        """The processor saved next to ``checkpoint``, or None when there is none."""
        path = Path(checkpoint).parent / PROCESSOR_FILE
        return cls.load(path) if path.is_file() else None
