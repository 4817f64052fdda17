"""Run imglish retrieval models under CLIP_benchmark (PyPI ``clip-benchmark``, module ``clip_benchmark``).

CLIP_benchmark scores CLIP-like models on zero-shot classification, zero-shot retrieval, linear probes and more. It
loads a model through a loader that returns ``(model, transform, tokenizer)``: ``transform`` turns a PIL image into
a tensor, ``tokenizer(texts)`` gives a tensor that it moves with ``.to(device)``, and the model has
``encode_image(images)`` and ``encode_text(tokens)``. This module gives imglish retrieval models that shape:

    from clip_benchmark.metrics import zeroshot_classification
    from imglish.inference.clip_benchmark import load_imglish

    model, transform, tokenizer = load_imglish("auto", "runs/retrieval/model.safetensors", device="cpu")
    dataset = torchvision.datasets.ImageFolder("val", transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    zeroshot_classification.evaluate(model, loader, tokenizer, ["cat", "dog"], ["a photo of a {c}."], "cpu")

The encoders are those of ``imglish.pipeline("zeroshot")`` (the same forward, normalisation and precision), so a
benchmark scores exactly the embeddings imglish's own pipelines give. The tokenizer returns the ``(B, L)`` token ids
padded to the processor's length; the padding mask is rebuilt from the pad id (it never occurs inside a text).

:func:`register` adds the model type ``imglish`` to CLIP_benchmark's table of loaders; CLIP_benchmark has no plugin
hook (no entry points), so its own ``clip_benchmark`` command cannot see it. ``python -m
imglish.inference.clip_benchmark eval ...`` registers it and then runs CLIP_benchmark's command line with the same
arguments (defaulting ``--model_type imglish --model auto``).

Settings that CLIP_benchmark's command line has no flag for come from the environment: ``IMGLISH_TOKENIZER`` (the
SentencePiece model of an official ``.pth``, e.g. ``beit3.spm``) and ``IMGLISH_PRECISION`` (``fp32``, the default;
``bf16``; or ``amp`` to run the encoders under CLIP_benchmark's own autocast).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "AUTO_MODEL",
    "MODEL_TYPE",
    "PRECISIONS",
    "PRECISION_ENV",
    "TOKENIZER_ENV",
    "BenchmarkModel",
    "BenchmarkTokenizer",
    "EvalTransform",
    "load_imglish",
    "main",
    "patch_clip_benchmark",
    "register",
]

#: the model type under which :func:`register` puts :func:`load_imglish`
MODEL_TYPE = "imglish"
#: ``--model`` value meaning "the model recorded in the imglish checkpoint"
AUTO_MODEL = "auto"
#: environment variable naming the SentencePiece model for checkpoints without one beside them
TOKENIZER_ENV = "IMGLISH_TOKENIZER"
#: environment variable choosing the encoders' precision (one of :data:`PRECISIONS`)
PRECISION_ENV = "IMGLISH_PRECISION"
#: ``fp32``: float32 whatever CLIP_benchmark's ``amp`` says; ``bf16``: bfloat16 autocast (as the pipelines'
#: ``precision="bf16"``); ``amp``: leave CLIP_benchmark's autocast on (float16 on CUDA, bfloat16 on the CPU)
PRECISIONS = ("fp32", "bf16", "amp")


class BenchmarkTokenizer:
    """Texts to the ``(B, L)`` int64 token ids of an imglish text tokenizer, padded to the model's length.

    Texts longer than the model takes are cut (as CLIP tokenizers cut at their context length) and empty texts
    become ``<s> </s>``: a benchmark cannot drop a caption without shifting the ones after it. Both are counted in
    :attr:`truncated` and :attr:`empty` and warned about once.

    Args:
        tokenizer: the :class:`~imglish.tokenizers.TextTokenizer` of the model's processor.
        max_length: the processor's text length (``processor.max_length``).
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.pad_id = int(tokenizer.pad_token_id)
        self.truncated = 0
        self.empty = 0
        self._warned = False

    def __repr__(self) -> str:
        return f"BenchmarkTokenizer({self.tokenizer!r}, max_length={self.max_length})"

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            bad = next(t for t in texts if not isinstance(t, str))
            raise TypeError(f"the imglish tokenizer takes strings, got a {type(bad).__name__} ({bad!r})")
        limit = self.max_length - 2
        lengths = [len(self.tokenizer.encode(t, add_special_tokens=False)) for t in texts]
        cut, empty = sum(n > limit for n in lengths), sum(n == 0 for n in lengths)
        self.truncated += cut
        self.empty += empty
        if (cut or empty) and not self._warned:
            self._warned = True
            warnings.warn(
                f"imglish tokenizer: {cut} of {len(texts)} texts are longer than the model's {limit} tokens and were "
                f"cut, {empty} are empty (counted in tokenizer.truncated and tokenizer.empty; warned once)",
                stacklevel=2,
            )
        return self.tokenizer(texts, max_length=self.max_length, allow_empty=True)["input_ids"]

    def padding_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """The ``(B, L)`` padding mask of token ids (1 = padding), as the text tokenizer builds it."""
        return (ids == self.pad_id).long()


class BenchmarkModel(nn.Module):
    """A CLIP-like face over an imglish retrieval pipeline: ``encode_image`` / ``encode_text`` give ``(B, D)``
    L2-normalised float32 embeddings on the input's device.

    Args:
        pipe: a ``zeroshot`` (or any dual-encoder) pipeline; its model becomes this module's ``model``.
        tokenizer: the :class:`BenchmarkTokenizer` whose ids :meth:`encode_text` receives.
        precision: one of :data:`PRECISIONS`; the pipeline's own precision must agree (``bf16`` or ``fp32``).
    """

    def __init__(self, pipe: Any, tokenizer: BenchmarkTokenizer | None, precision: str = "fp32") -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.pipe = pipe
        self.model = pipe.model
        self.tokenizer = tokenizer
        self.precision = precision

    @property
    def logit_scale(self) -> float:
        """The model's learnt contrastive temperature (CLIP_benchmark itself always scales by 100)."""
        return self.pipe.logit_scale

    def _context(self, device: torch.device) -> contextlib.AbstractContextManager:
        # CLIP_benchmark runs the encoders under torch.autocast(device, enabled=amp); unless asked to follow it,
        # switch it off here so the pipeline's precision alone decides (its bf16 autocast nests inside).
        if self.precision == "amp":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, enabled=False)

    def _run(self, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        # the pipeline moves inputs to its device: keep it on wherever this module's weights are now
        self.pipe.device = next(self.model.parameters()).device
        with self._context(self.pipe.device):
            rows = self.pipe.forward(batch)
        return torch.stack(rows).to(device)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` tensors of the loader's ``transform`` -> ``(B, D)`` embeddings."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(f"encode_image takes a (B, 3, S, S) tensor from the imglish transform, got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        return self._run({"image": images}, images.device)

    def encode_text(self, tokens: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Token ids from the loader's ``tokenizer`` (``(B, L)``; or a dict with ``input_ids`` and
        ``padding_mask``, as the text tokenizer gives) -> ``(B, D)`` embeddings."""
        if isinstance(tokens, Mapping):
            ids, mask = tokens["input_ids"], tokens["padding_mask"]
        else:
            if self.tokenizer is None:
                raise ValueError("this model has no text tokenizer, so encode_text cannot rebuild a padding mask")
            if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
                raise ValueError(f"encode_text takes the (B, L) token ids of the imglish tokenizer, got "
                                 f"{getattr(tokens, 'shape', type(tokens).__name__)}")
            ids, mask = tokens, self.tokenizer.padding_mask(tokens)
        return self._run({"text": ids, "padding_mask": mask}, ids.device)

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(image embeddings, text embeddings)``; either input may be None."""
        return (None if images is None else self.encode_image(images),
                None if tokens is None else self.encode_text(tokens))


class EvalTransform:
    """The processor's evaluation transform as a plain callable (PIL image -> ``(3, S, S)`` tensor) that datasets
    can hold and DataLoader workers can pickle."""

    def __init__(self, processor: Any) -> None:
        self.transform = processor.image_transform(False)

    def __repr__(self) -> str:
        return f"EvalTransform({self.transform})"

    def __call__(self, img: Any) -> torch.Tensor:
        if getattr(img, "mode", "RGB") != "RGB":
            img = img.convert("RGB")
        x = self.transform(img)
        return x[0] if isinstance(x, tuple) else x


def load_imglish(
    model_name: str | None = AUTO_MODEL,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    *,
    tokenizer: Any = None,
    precision: str | None = None,
    **kw: Any,
) -> tuple[BenchmarkModel, Any, BenchmarkTokenizer]:
    """CLIP_benchmark's loader shape for an imglish retrieval checkpoint.

    Args:
        model_name: ``"auto"`` (or empty/None) for an imglish ``model.safetensors``, which records its model; for an
            official ``.pth`` the registered retrieval name, e.g. ``beit3_base_patch16_384_retrieval``.
        pretrained: the checkpoint file.
        device: where the model runs (CLIP_benchmark passes ``"cuda"`` or ``"cpu"``).
        cache_dir: CLIP_benchmark's download cache; unused (imglish never downloads).
        tokenizer: SentencePiece model (path or ``TextTokenizer``) for a checkpoint with none beside it; default:
            the ``IMGLISH_TOKENIZER`` environment variable.
        precision: one of :data:`PRECISIONS`; default: ``IMGLISH_PRECISION`` or ``fp32``.
        **kw: passed to :func:`imglish.pipeline` (e.g. ``max_pixels``).

    Returns:
        ``(model, transform, tokenizer)``: a :class:`BenchmarkModel` in eval mode on ``device``, the processor's
        evaluation transform (:class:`EvalTransform`: PIL image -> ``(3, S, S)`` tensor) and a
        :class:`BenchmarkTokenizer`. When CLIP_benchmark is installed, :func:`patch_clip_benchmark` is applied.

    Raises:
        FileNotFoundError: no checkpoint file. ValueError: a name that is not registered, a checkpoint of another
        task, no tokenizer, an unknown precision.
    """
    import imglish

    if pretrained is None or str(pretrained) == "":
        raise ValueError("load_imglish needs pretrained= the checkpoint (an imglish model.safetensors or an official "
                         ".pth with a registered model name)")
    name = None if model_name in (None, "", AUTO_MODEL) else str(model_name)
    if name is not None and name not in imglish.list_models():
        raise ValueError(
            f"model {name!r} is not a registered imglish model: use {AUTO_MODEL!r} for an imglish model.safetensors "
            "(it records its model) or a retrieval name such as beit3_base_patch16_384_retrieval for an official .pth "
            f"(imglish.list_models('*retrieval') lists them)"
        )
    if tokenizer is None:
        tokenizer = os.environ.get(TOKENIZER_ENV) or None
    if precision is None:
        precision = os.environ.get(PRECISION_ENV) or "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision ({PRECISION_ENV}) must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    pipe = imglish.pipeline("zeroshot", checkpoint=pretrained, model=name, tokenizer=tokenizer, device=device,
                            precision="bf16" if precision == "bf16" else "fp32", **kw)
    if importlib.util.find_spec("clip_benchmark") is not None:
        patch_clip_benchmark()
    text_tok = BenchmarkTokenizer(pipe.processor.tokenizer, pipe.processor.max_length)
    model = BenchmarkModel(pipe, text_tok, precision).eval()
    return model, EvalTransform(pipe.processor), text_tok


def _loader(model_name: str, pretrained: str, cache_dir: str | None = None, device: str | torch.device = "cpu",
            **kw: Any) -> tuple[BenchmarkModel, Any, BenchmarkTokenizer]:
    """The entry CLIP_benchmark's ``load_clip`` calls (keywords only: model_name, pretrained, cache_dir, device)."""
    return load_imglish(model_name, pretrained, device=device, cache_dir=cache_dir, **kw)


def _topk_accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """For each k, the share of rows of ``output`` (N, C) whose ``target`` class is among the k highest scores:
    the numbers CLIP_benchmark's ``accuracy`` computes, without its NumPy array-to-float step."""
    best = output.topk(max(topk), dim=1).indices
    hits = best.eq(target.view(-1, 1))
    return [int(hits[:, :k].sum()) / len(target) for k in topk]


def patch_clip_benchmark() -> bool:
    """Make CLIP_benchmark's top-k accuracy work with NumPy 2.4 and later; True when a fix was needed.

    ``clip_benchmark.metrics.zeroshot_classification.accuracy`` (1.6.2, and its main branch in 2025) converts a
    one-element 1-D array with ``float()``, which NumPy 2.4 refuses (TypeError), so every zero-shot
    classification and linear probe fails after the embeddings are computed. When a probe call shows that
    failure, the function is replaced (there and in ``linear_probe``, which imports it by name) by one that gives
    the same numbers; an installed version that works is left alone.
    """
    from clip_benchmark.metrics import linear_probe, zeroshot_classification

    try:
        zeroshot_classification.accuracy(torch.tensor([[0.0, 1.0]]), torch.tensor([1]), topk=(1,))
        return False
    except TypeError:
        pass
    broken = zeroshot_classification.accuracy
    zeroshot_classification.accuracy = _topk_accuracy
    if getattr(linear_probe, "accuracy", None) is broken:
        linear_probe.accuracy = _topk_accuracy
    return True


def _import_clip_benchmark_models() -> Any:
    try:
        from clip_benchmark import models
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == "clip_benchmark":
            raise ModuleNotFoundError("CLIP_benchmark is not installed: pip install clip-benchmark",
                                      name="clip_benchmark") from None
        raise
    return models


def register(model_type: str = MODEL_TYPE) -> None:
    """Add :func:`load_imglish` to CLIP_benchmark's loaders as ``model_type`` (idempotent).

    ``clip_benchmark.models`` keeps a dict ``TYPE2FUNC`` and a list ``MODEL_TYPES`` that ``load_clip`` checks and
    the command line offers as ``--model_type`` choices; both are updated in place, so modules that imported them
    before (``clip_benchmark.cli``) see the new type too. Also applies :func:`patch_clip_benchmark`.

    Raises:
        ModuleNotFoundError: CLIP_benchmark is not installed (``pip install clip-benchmark``).
    """
    models = _import_clip_benchmark_models()
    patch_clip_benchmark()
    models.TYPE2FUNC[model_type] = _loader
    if model_type not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(model_type)


def main(argv: Sequence[str] | None = None) -> int:
    """CLIP_benchmark's command line with the ``imglish`` model type registered.

    ``python -m imglish.inference.clip_benchmark eval --dataset ... --pretrained model.safetensors`` takes every
    flag of ``clip_benchmark``; ``eval`` gets ``--model_type imglish`` and ``--model auto`` unless given. Returns the
    exit status: 0, or 2 with one line on stderr for a bad checkpoint or model name.
    """
    register()
    from clip_benchmark import cli

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["eval"]:
        given = {a.split("=", 1)[0] for a in args}
        if "--model_type" not in given:
            args += ["--model_type", MODEL_TYPE]
        if not given & {"--model", "--pretrained_model"}:
            args += ["--model", AUTO_MODEL]
    saved = sys.argv
    sys.argv = ["clip_benchmark", *args]
    try:
        cli.main()
    except (ValueError, FileNotFoundError) as err:
        print(f"imglish clip_benchmark: error: {err}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
