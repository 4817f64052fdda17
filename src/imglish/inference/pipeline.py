"""Pipelines: a checkpoint and a task name in, answers in the shapes people know from HF pipelines out.

    pipe = imglish.pipeline("vqa", checkpoint="runs/vqa/model.safetensors")
    pipe("cat.jpg", question="what colour is the cat?", top_k=3)   # [{"answer": "black", "score": 0.91}, ...]

=========  ==================  ===================================================================
task       model (registry)    one input gives
=========  ==================  ===================================================================
classify   imageclassification ``[{"label", "score"}]`` (top ``top_k``, softmax)
vqa        vqav2               ``[{"answer", "score"}]`` (top ``top_k``, sigmoid: VQA is multi-label)
caption    captioning          ``[{"generated_text"}]`` (beam search)
nlvr2      nlvr2               ``{"label": "True"|"False", "score"}``
zeroshot   retrieval           ``[{"label", "score"}]`` over ``labels``, best first (softmax of scaled cosines)
rank       retrieval           ``{"scores": images×texts cosines, "image_to_text", "text_to_image"}``
embed      retrieval/backbone  ``{"image_embeds"|"text_embeds": (N, D) tensor}`` (L2-normalised)
segment    segmentation        ``{"label_map", "segments"}`` (``imglish.inference.dense``)
detect     detection           ``[{"label", "score", "box", "mask"}]`` (``imglish.inference.dense``)
=========  ==================  ===================================================================

Every pipeline takes one input or a list (a list gives a list of answers). Images may be paths, bytes, PIL images,
numpy arrays or tensors (:func:`imglish.inference.inputs.to_image`). Work is split in three steps so that callers
which batch across requests (``imglish serve``) share the code: :meth:`Pipeline.preprocess` (one example to
tensors, on the CPU; bad input raises :class:`InputError`), :meth:`Pipeline.forward` (one stacked batch; the
model runs under ``no_grad`` and the chosen precision) and :meth:`Pipeline.postprocess` (one row to its answer).

Checkpoints are imglish ``model.safetensors`` files made by ``imglish finetune`` (their Processor and ``task.json``,
with the class names or the answer vocabulary, lie beside them) or official ``.pth`` files with ``model=`` (the
registered name) and ``tokenizer=`` (the SentencePiece model, ``beit3.spm``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from imglish.inference.inputs import InputError, describe, to_image

__all__ = [
    "CaptionPipeline",
    "ClassifyPipeline",
    "EmbedPipeline",
    "InputError",
    "NLVR2Pipeline",
    "PIPELINES",
    "Pipeline",
    "RankPipeline",
    "VQAPipeline",
    "ZeroShotPipeline",
    "load_labels",
    "pipeline",
]

#: the finetune task that makes each registry model task (for error messages)
_FINETUNE_OF = {
    "imageclassification": "imagenet",
    "vqav2": "vqav2",
    "captioning": "coco_captioning",
    "nlvr2": "nlvr2",
    "retrieval": "coco_retrieval or flickr30k",
    "segmentation": "ade20k",
    "detection": "coco_detection",
}


def _is_batch(x: Any) -> bool:
    return isinstance(x, (list, tuple))


def _positive_int(value: Any, name: str, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    try:
        n = int(value)
    except ValueError:
        raise InputError(f"{name} must be a positive integer, got {value!r}") from None
    if n < 1 or (upper is not None and n > upper):
        bound = f" and at most {upper}" if upper is not None else ""
        raise InputError(f"{name} must be at least 1{bound}, got {n}")
    return n


def load_labels(source: str | os.PathLike | Sequence[str]) -> list[str]:
    """Class names or answers: a list, or a file with one per line, or the official ``answer2label.txt``
    (``{"answer": ..., "label": n}`` per line).

    Raises:
        FileNotFoundError: for a missing file; ValueError: for an empty list.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"labels file {str(path)!r} does not exist")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if lines and lines[0].startswith("{"):
            from imglish.data.vqav2 import load_answer_vocab

            try:
                labels = load_answer_vocab(path)
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"labels file {str(path)!r}: not one label per line nor answer2label.txt "
                                 f"JSON lines ({err})") from None
        else:
            labels = lines
        where = f"labels file {str(path)!r}"
    else:
        labels = [str(s) for s in source]
        where = "labels"
    if not labels:
        raise ValueError(f"{where} is empty")
    return labels


class Pipeline:
    """Base class; see the module docstring.

    Args:
        model: the task model (put in eval mode and moved to ``device``).
        processor: its :class:`~imglish.tokenizers.Processor`.
        labels: class names / answers for the output rows (classify, vqa); default: the label indices.
        device: where to run (default: CUDA when available, else the CPU).
        precision: ``"fp32"`` or ``"bf16"``: the weights are cast to bfloat16 once and the images follow (no
            autocast, so no per-call weight casts: 1.1-1.4x faster than autocast on an AMX CPU, with embeddings
            within cosine 0.9999 of float32). The model object is cast in place.
        batch_size: examples per forward when a list is given.
        max_pixels: refuse larger images (checked before decoding).
        checkpoint: where the weights came from (shown in messages).
    """

    task: ClassVar[str] = ""
    #: registry model tasks this pipeline runs
    model_tasks: ClassVar[tuple[str, ...]] = ()
    #: needs a text tokenizer
    uses_text: ClassVar[bool] = True
    #: reads images only: built from a checkpoint, the model holds only the vision weights
    image_only: ClassVar[bool] = False
    #: parameters that change the forward (batches must agree on them); the rest only shape the answers
    forward_params: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        *,
        labels: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        batch_size: int = 8,
        max_pixels: int | None = None,
        checkpoint: str | None = None,
    ) -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        task = getattr(model, "task", "backbone")
        if self.model_tasks and task not in self.model_tasks:
            raise ValueError(
                f"the {self.task} pipeline needs a {' or '.join(map(repr, self.model_tasks))} model, got a {task!r} "
                "model"
            )
        if self.uses_text and getattr(processor, "tokenizer", None) is None:
            raise ValueError(
                f"the {self.task} pipeline needs a text tokenizer: {checkpoint or 'the model'} has none beside it "
                "(processor.json and sentencepiece.model); pass tokenizer= the SentencePiece model (the official "
                "checkpoints use beit3.spm)"
            )
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.eval().to(self.device, dtype=torch.bfloat16 if precision == "bf16" else None)
        self.processor = processor
        self.precision = precision
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.max_pixels = max_pixels
        self.checkpoint = checkpoint
        self.labels = list(labels) if labels is not None else None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(checkpoint={self.checkpoint!r}, model={getattr(self.model, 'model_name', None)!r}, "
                f"device={str(self.device)!r}, precision={self.precision!r})")

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike,
        *,
        model: str | None = None,
        tokenizer: Any = None,
        labels: str | os.PathLike | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> "Pipeline":
        """Build the pipeline from a checkpoint file (see the module docstring).

        Raises:
            FileNotFoundError: the checkpoint (or labels file) does not exist.
            ValueError: a checkpoint of another task, an official file without ``model=``, no tokenizer for a text
                task, labels that do not match the model's classes.
        """
        import imglish
        from imglish.model.loading import read_checkpoint_metadata

        checkpoint = str(checkpoint)
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
        try:
            meta = read_checkpoint_metadata(checkpoint)
        except Exception as err:
            raise ValueError(f"checkpoint {checkpoint!r} cannot be read: {err}") from None
        ours = meta.get("format") == "imglish/1"
        if ours and model is None:
            found, name = meta.get("task"), None
            what = f"a {found!r} model ({meta.get('model_name') or 'unnamed'})"
        else:
            if model is None:
                raise ValueError(
                    f"{checkpoint} is not an imglish checkpoint (no imglish metadata): pass the registered model "
                    f"name to build (--model, e.g. {cls._example_name()})"
                )
            found, name = imglish.get_model_info(model).task, model
            what = f"model {model!r}, a {found!r} model"
        if found not in cls.model_tasks:
            made_by = " or ".join(f"`imglish finetune {_FINETUNE_OF[t]}`" for t in cls.model_tasks if t in _FINETUNE_OF)
            raise ValueError(
                f"checkpoint {checkpoint} holds {what}; `{cls.task}` needs a "
                f"{' or '.join(map(repr, cls.model_tasks))} model" + (f" (made by {made_by})" if made_by else "")
            )
        # A pipeline that reads no text loads only the vision weights (BEiT3Config.modalities): the same answers
        # from about 40% of a full checkpoint's weights in memory.
        vision_only = {"modalities": ("vision",)} if cls.image_only else {}
        net, processor = imglish.create_model_and_processor(name, checkpoint, tokenizer=tokenizer, **vision_only)
        if labels is None:
            labels = cls._labels_from_task_file(checkpoint)
        elif labels is not None:
            labels = load_labels(labels)
        return cls(net, processor, labels=labels, checkpoint=checkpoint, **kwargs)

    @classmethod
    def _example_name(cls) -> str:
        suffix = {"imageclassification": "224_imageclassification", "vqav2": "480_vqav2", "nlvr2": "224_nlvr2",
                  "captioning": "480_captioning", "retrieval": "384_retrieval", "segmentation": "512_segmentation",
                  "detection": "1024_detection"}.get(cls.model_tasks[0], "224")
        return f"beit3_base_patch16_{suffix}"

    @staticmethod
    def _labels_from_task_file(checkpoint: str) -> list[str] | None:
        path = Path(checkpoint).parent / "task.json"
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text()).get("state") or {}
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{path} is not a task file written by imglish finetune ({err})") from None
        for key in ("classes", "answers"):
            if isinstance(state.get(key), list) and state[key]:
                return [str(s) for s in state[key]]
        return None

    # ----------------------------------------------------------------------------------------- the three steps
    def check_params(self, **params: Any) -> dict[str, Any]:
        """Validated, normalised call parameters (unknown names raise)."""
        if params:
            raise InputError(f"the {self.task} pipeline takes no parameter {sorted(params)[0]!r}")
        return {}

    def preprocess(self, example: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """One example (a dict of the task's fields) to CPU tensors; raises :class:`InputError`."""
        raise NotImplementedError

    def forward(self, batch: Mapping[str, torch.Tensor], **params: Any) -> list[Any]:
        """One row of raw output per example of a stacked batch."""
        raise NotImplementedError

    def postprocess(self, raw: Any, **params: Any) -> Any:
        """One raw row to its answer."""
        return raw

    # ----------------------------------------------------------------------------------------- helpers
    def split_params(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        fwd = {k: v for k, v in params.items() if k in self.forward_params}
        return fwd, {k: v for k, v in params.items() if k not in self.forward_params}

    def image(self, item: Any) -> torch.Tensor:
        img = to_image(item, max_pixels=self.max_pixels)
        x = self.processor.image_transform(False)(img)
        return x[0] if isinstance(x, tuple) else x

    def text(self, text: Any, field: str = "text") -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, padding_mask)`` at the processor's length; an empty or too long text raises."""
        if not isinstance(text, str):
            raise InputError(f"{field} must be a string, got {type(text).__name__}")
        tok = self.processor.tokenizer
        pieces = tok.encode(text, add_special_tokens=False)
        if not pieces:
            raise InputError(f"{field} {text!r} is empty (no tokens)")
        limit = self.processor.max_length - 2
        if len(pieces) > limit:
            short = text if len(text) <= 60 else text[:57] + "..."
            raise InputError(f"{field} {short!r} is {len(pieces)} tokens; the model takes at most {limit}")
        out = tok([text], max_length=self.processor.max_length)
        return out["input_ids"][0], out["padding_mask"][0]

    def _to_device(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = torch.bfloat16 if self.precision == "bf16" else None
        return {k: v.to(self.device, dtype=dtype if v.is_floating_point() else None) for k, v in batch.items()}

    @staticmethod
    def collate(rows: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def run(self, examples: Sequence[Mapping[str, Any]], *, skip_errors: bool = False, progress: bool = False,
            **params: Any) -> list[Any]:
        """Answers of many examples, ``batch_size`` per forward, in order.

        With ``skip_errors`` a bad example's slot holds its :class:`InputError` and the rest are answered;
        otherwise the first bad example raises.
        """
        fwd, post = self.split_params(self.check_params(**params))
        raws = self.forward_all(examples, skip_errors=skip_errors, progress=progress, **fwd)
        return [r if isinstance(r, InputError) else self.postprocess(r, **post) for r in raws]

    def forward_all(self, examples: Sequence[Mapping[str, Any]], *, skip_errors: bool = False,
                    progress: bool = False, **fwd: Any) -> list[Any]:
        """Raw rows of many examples (no postprocessing), ``batch_size`` per forward, in order; examples whose
        tensors differ in keys (images and texts) go in separate batches."""
        out: list[Any] = [None] * len(examples)
        ready: list[tuple[int, dict[str, torch.Tensor]]] = []
        for i, ex in enumerate(examples):
            try:
                ready.append((i, self.preprocess(ex)))
            except InputError as err:
                if not skip_errors:
                    raise
                out[i] = err
        groups: dict[tuple[str, ...], list[tuple[int, dict[str, torch.Tensor]]]] = {}
        for i, row in ready:
            groups.setdefault(tuple(sorted(row)), []).append((i, row))
        chunks = [rows[s:s + self.batch_size] for rows in groups.values() for s in range(0, len(rows), self.batch_size)]
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc=self.task, unit="batch", leave=False, dynamic_ncols=True)
        for chunk in chunks:
            raws = self.forward(self.collate([r for _, r in chunk]), **fwd)
            for (i, _), raw in zip(chunk, raws):
                out[i] = raw
        return out

    def _label(self, k: int) -> str:
        return self.labels[k] if self.labels is not None else str(k)

    def _check_labels(self, n: int, what: str) -> None:
        if self.labels is not None and len(self.labels) != n:
            raise ValueError(f"{len(self.labels)} {what} were given but the model has {n} classes")


# ============================================================================================= tasks
class ClassifyPipeline(Pipeline):
    """Image classification (ImageNet-style fine-tunes): ``pipe(images, top_k=5)``."""

    task = "classify"
    model_tasks = ("imageclassification",)
    uses_text = False
    image_only = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._check_labels(self.model.num_classes, "class names")

    def check_params(self, top_k: Any = 5) -> dict[str, Any]:
        return {"top_k": _positive_int(top_k, "top_k")}

    def preprocess(self, example: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {"image": self.image(example["image"])}

    @torch.no_grad()
    def forward(self, batch: Mapping[str, torch.Tensor], **params: Any) -> list[torch.Tensor]:
        logits = self.model(image=self._to_device(batch)["image"])
        return list(logits.float().softmax(-1).cpu())

    def postprocess(self, raw: torch.Tensor, top_k: int = 5) -> list[dict[str, Any]]:
        scores, idx = raw.topk(min(top_k, raw.numel()))
        return [{"label": self._label(int(k)), "score": float(s)} for s, k in zip(scores, idx)]

    def __call__(self, images: Any, top_k: int = 5, **kw: Any) -> Any:
        items = list(images) if _is_batch(images) else [images]
        out = self.run([{"image": x} for x in items], top_k=top_k, **kw)
        return out if _is_batch(images) else out[0]


class VQAPipeline(Pipeline):
    """Visual question answering: ``pipe(image, question="...", top_k=1)``; lists of both (or one question for many
    images) give a list."""

    task = "vqa"
    model_tasks = ("vqav2",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._check_labels(self.model.num_classes, "answers")

    def check_params(self, top_k: Any = 1) -> dict[str, Any]:
        return {"top_k": _positive_int(top_k, "top_k")}

    def preprocess(self, example: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        ids, pad = self.text(example.get("question"), "question")
        return {"image": self.image(example["image"]), "question": ids, "padding_mask": pad}

    @torch.no_grad()
    def forward(self, batch: Mapping[str, torch.Tensor], **params: Any) -> list[torch.Tensor]:
        b = self._to_device(batch)
        logits = self.model(image=b["image"], question=b["question"], padding_mask=b["padding_mask"])
        return list(logits.float().sigmoid().cpu())

    def postprocess(self, raw: torch.Tensor, top_k: int = 1) -> list[dict[str, Any]]:
        scores, idx = raw.topk(min(top_k, raw.numel()))
        return [{"answer": self._label(int(k)), "score": float(s)} for s, k in zip(scores, idx)]

    def __call__(self, image: Any, question: str | Sequence[str], top_k: int = 1, **kw: Any) -> Any:
        batch = _is_batch(image) or _is_batch(question)
        images = list(image) if _is_batch(image) else [image]
        questions = list(question) if _is_batch(question) else [question] * len(images)
        if len(images) == 1 and len(questions) > 1:
            images = images * len(questions)
        if len(images) != len(questions):
            raise InputError(f"{len(images)} images and {len(questions)} questions: give one question per image")
        out = self.run([{"image": i, "question": q} for i, q in zip(images, questions)], top_k=top_k, **kw)
        return out if batch else out[0]


class CaptionPipeline(Pipeline):
    """Image captioning: ``pipe(images, num_beams=3, max_length=64)`` (max_length counts BOS)."""

    task = "caption"
    model_tasks = ("captioning",)
    forward_params = ("num_beams", "max_length", "length_penalty")

    def check_params(self, num_beams: Any = 3, max_length: Any = None, length_penalty: Any = 0.6) -> dict[str, Any]:
        upper = self.model.config.max_text_len
        length = min(64, upper) if max_length is None else _positive_int(max_length, "max_length", upper)
        if length < 2:
            raise InputError(f"max_length must be at least 2 (BOS plus one token), got {length}")
        try:
            penalty = float(length_penalty)
        except (TypeError, ValueError):
            raise InputError(f"length_penalty must be a number, got {length_penalty!r}") from None
        if not math.isfinite(penalty):
            raise InputError(f"length_penalty must be finite, got {length_penalty!r}")
        return {"num_beams": _positive_int(num_beams, "num_beams", 16), "max_length": length,
                "length_penalty": penalty}

    def preprocess(self, example: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {"image": self.image(example["image"])}

    @torch.no_grad()
    def forward(self, batch: Mapping[str, torch.Tensor], num_beams: int = 3, max_length: int = 64,
                length_penalty: float = 0.6) -> list[str]:
        from imglish.generation import GenerationConfig, generate

        tok = self.processor.tokenizer
        cfg = GenerationConfig(max_len=max_length, num_beams=num_beams, length_penalty=length_penalty,
                               bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id, mask_token_id=tok.mask_token_id)
        rows = generate(self.model, self._to_device(batch)["image"], cfg).cpu().tolist()
        texts = []
        for ids in rows:
            if tok.eos_token_id in ids[1:]:
                ids = ids[: ids.index(tok.eos_token_id, 1)]
            texts.append(tok.decode(ids, skip_special_tokens=True).strip())
        return texts

    def postprocess(self, raw: str, **params: Any) -> list[dict[str, str]]:
        return [{"generated_text": raw}]

    def __call__(self, images: Any, num_beams: int = 3, max_length: int | None = None, **kw: Any) -> Any:
        items = list(images) if _is_batch(images) else [images]
        out = self.run([{"image": x} for x in items], num_beams=num_beams, max_length=max_length, **kw)
        return out if _is_batch(images) else out[0]


class NLVR2Pipeline(Pipeline):
    """Visual reasoning over two images: ``pipe(left, right, text="...")`` -> ``{"label": "True"|"False", "score"}``."""

    task = "nlvr2"
    model_tasks = ("nlvr2",)
    #: the official label order: 0 = the statement is false, 1 = true
    names = ("False", "True")

    def check_params(self) -> dict[str, Any]:
        return {}

    def preprocess(self, example: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        ids, pad = self.text(example.get("text"), "text")
        return {"image": self.image(example["left"]), "image2": self.image(example["right"]), "text": ids,
                "padding_mask": pad}

    @torch.no_grad()
    def forward(self, batch: Mapping[str, torch.Tensor], **params: Any) -> list[torch.Tensor]:
        b = self._to_device(batch)
        logits = self.model(image_a=b["image"], image_b=b["image2"], text_description=b["text"],
                            padding_mask=b["padding_mask"])
        return list(logits.float().softmax(-1).cpu())

    def postprocess(self, raw: torch.Tensor, **params: Any) -> dict[str, Any]:
        k = int(raw.argmax())
        return {"label": self.names[k] if raw.numel() == 2 else str(k), "score": float(raw[k])}

    def __call__(self, left: Any, right: Any, text: str | Sequence[str], **kw: Any) -> Any:
        batch = _is_batch(left)
        lefts = list(left) if batch else [left]
        rights = list(right) if _is_batch(right) else [right]
        texts = list(text) if _is_batch(text) else [text] * len(lefts)
        if not len(lefts) == len(rights) == len(texts):
            raise InputError(f"{len(lefts)} left images, {len(rights)} right images and {len(texts)} texts: give "
                             "one of each per example")
        out = self.run([{"left": a, "right": b, "text": t} for a, b, t in zip(lefts, rights, texts)], **kw)
        return out if batch else out[0]


class _DualEncoder(Pipeline):
    """Shared by the retrieval-model pipelines: image and text embeddings (L2-normalised, float32, CPU)."""

    model_tasks = ("retrieval",)

    def preprocess(self, example: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if "image" in example:
            return {"image": self.image(example["image"])}
        ids, pad = self.text(example.get("text"), "text")
        return {"text": ids, "padding_mask": pad}

    @torch.no_grad()
    def forward(self, batch: Mapping[str, torch.Tensor], **params: Any) -> list[torch.Tensor]:
        b = self._to_device(batch)
        if "image" in b:
            emb = self.model.encode_image(b["image"])
        else:
            emb = self.model.encode_text(b["text"], b["padding_mask"])
        return list(F.normalize(emb.float(), dim=-1).cpu())

    def embed_images(self, images: Any, **kw: Any) -> torch.Tensor:
        """(N, D) L2-normalised image embeddings."""
        items = list(images) if _is_batch(images) else [images]
        return torch.stack(self.forward_all([{"image": x} for x in items], **kw))

    def embed_texts(self, texts: str | Sequence[str], **kw: Any) -> torch.Tensor:
        """(N, D) L2-normalised text embeddings."""
        items = list(texts) if _is_batch(texts) else [texts]
        return torch.stack(self.forward_all([{"text": t} for t in items], **kw))

    @property
    def logit_scale(self) -> float:
        """The learnt contrastive temperature (exp of ``logit_scale``), capped at 100 as in training."""
        p = getattr(self.model, "logit_scale", None)
        return 100.0 if p is None else float(p.detach().float().exp().clamp(max=100.0))


class EmbedPipeline(_DualEncoder):
    """Embeddings: ``pipe(images=..., texts=...)`` -> ``{"image_embeds", "text_embeds"}`` ((N, D) tensors). Also takes
    a bare backbone or a pretraining checkpoint (CLS features, L2-normalised)."""

    task = "embed"
    model_tasks = ("retrieval", "backbone", "pretraining")
    uses_text = False  # a tokenizer is needed only for texts

    def preprocess(self, example: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if "image" not in example and self.processor.tokenizer is None:
            raise InputError(f"texts need a text tokenizer; {self.checkpoint or 'the model'} has none beside it")
        return super().preprocess(example)

    def __call__(self, images: Any = None, texts: Any = None, **kw: Any) -> dict[str, torch.Tensor]:
        if images is None and texts is None:
            raise InputError("embed needs images, texts or both")
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out["image_embeds"] = self.embed_images(images, **kw)
        if texts is not None:
            out["text_embeds"] = self.embed_texts(texts, **kw)
        return out


class ZeroShotPipeline(_DualEncoder):
    """Zero-shot classification with a dual encoder (the paper's ImageNet-as-retrieval):
    ``pipe(images, labels=["cat", "dog"], templates=None, top_k=None)``.

    A class embedding is the L2-normalised mean of the normalised embeddings of its prompts (every template with
    the label put in); scores are the softmax over labels of the scaled cosines, best first.
    """

    task = "zeroshot"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._class_cache: dict[tuple[tuple[str, ...], tuple[str, ...]], torch.Tensor] = {}

    def check_params(self, labels: Any = None, templates: Any = None, top_k: Any = None) -> dict[str, Any]:
        from imglish.inference.templates import DEFAULT_TEMPLATES, check_templates

        if labels is None:
            labels = self.labels
        if isinstance(labels, str):
            labels = [s.strip() for s in labels.split(",")]
        if not labels or not all(isinstance(s, str) and s.strip() for s in labels):
            raise InputError("zeroshot needs labels: a non-empty list of class names (e.g. 'cat,dog')")
        if len(set(labels)) != len(labels):
            raise InputError(f"zeroshot labels must be distinct, got {labels}")
        templates = check_templates(DEFAULT_TEMPLATES if templates is None else templates)
        k = len(labels) if top_k is None else min(_positive_int(top_k, "top_k"), len(labels))
        return {"labels": tuple(s.strip() for s in labels), "templates": tuple(templates), "top_k": k}

    def class_embeddings(self, labels: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """(len(labels), D): per label the normalised mean over templates of the normalised prompt embeddings
        (cached by labels and templates)."""
        key = (tuple(labels), tuple(templates))
        if key not in self._class_cache:
            prompts = [t.format(label) for label in labels for t in templates]
            emb = self.embed_texts(prompts).view(len(labels), len(templates), -1)
            self._class_cache[key] = F.normalize(emb.mean(1), dim=-1)
            while len(self._class_cache) > 64:
                self._class_cache.pop(next(iter(self._class_cache)))
        return self._class_cache[key]

    def postprocess(self, raw: torch.Tensor, labels: tuple[str, ...] = (), templates: tuple[str, ...] = (),
                    top_k: int | None = None) -> list[dict[str, Any]]:
        classes = self.class_embeddings(labels, templates)
        probs = (self.logit_scale * (classes @ raw)).softmax(-1)
        scores, idx = probs.topk(top_k or len(labels))
        return [{"label": labels[int(k)], "score": float(s)} for s, k in zip(scores, idx)]

    def __call__(self, images: Any, labels: Sequence[str] | str | None = None, templates: Sequence[str] | None = None,
                 top_k: int | None = None, **kw: Any) -> Any:
        items = list(images) if _is_batch(images) else [images]
        out = self.run([{"image": x} for x in items], labels=labels, templates=templates, top_k=top_k, **kw)
        return out if _is_batch(images) else out[0]


class RankPipeline(_DualEncoder):
    """Image-text retrieval scores both ways: ``pipe(images=[...], texts=[...])``.

    Returns ``{"scores": [[cosine]] (images × texts), "image_to_text": per image the text indices best first,
    "text_to_image": per text the image indices best first}``.
    """

    task = "rank"

    def __call__(self, images: Any, texts: Any, **kw: Any) -> dict[str, Any]:
        img = self.embed_images(images, **kw)
        txt = self.embed_texts(texts, **kw)
        scores = img @ txt.t()
        return {
            "scores": scores.tolist(),
            "image_to_text": scores.argsort(dim=1, descending=True).tolist(),
            "text_to_image": scores.t().argsort(dim=1, descending=True).tolist(),
        }


PIPELINES: dict[str, type[Pipeline]] = {
    cls.task: cls
    for cls in (ClassifyPipeline, VQAPipeline, CaptionPipeline, NLVR2Pipeline, ZeroShotPipeline, RankPipeline,
                EmbedPipeline)
}


def _register_dense() -> None:
    from imglish.inference.dense import DetectPipeline, SegmentPipeline

    for cls in (SegmentPipeline, DetectPipeline):
        PIPELINES[cls.task] = cls


_register_dense()


def pipeline(
    task: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    model: str | nn.Module | None = None,
    processor: Any = None,
    tokenizer: Any = None,
    labels: str | os.PathLike | Sequence[str] | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    batch_size: int = 8,
    max_pixels: int | None = None,
) -> Pipeline:
    """A ready pipeline for ``task`` (``classify``, ``vqa``, ``caption``, ``nlvr2``, ``zeroshot``, ``rank``,
    ``embed``, ``segment``, ``detect``).

    Args:
        task: the pipeline's name.
        checkpoint: an imglish ``model.safetensors`` (from ``imglish finetune``) or an official ``.pth``.
        model: the registered name for an official checkpoint, or a model object (then pass ``processor``).
        processor: the Processor of a model object.
        tokenizer: SentencePiece model (path or ``TextTokenizer``) for checkpoints without one beside them.
        labels: class names or the VQA answer vocabulary (list or file) when ``task.json`` has none.
        device, precision, batch_size, max_pixels: see :class:`Pipeline`.

    Raises:
        ValueError: unknown task, a checkpoint of another task, missing tokenizer; FileNotFoundError: no such file.
    """
    if task not in PIPELINES:
        raise ValueError(f"unknown pipeline {task!r}; expected one of {', '.join(PIPELINES)}")
    cls = PIPELINES[task]
    kw = dict(device=device, precision=precision, batch_size=batch_size, max_pixels=max_pixels)
    if isinstance(model, nn.Module):
        if processor is None:
            raise ValueError("a model object needs its processor= (imglish.create_model_and_processor gives both)")
        return cls(model, processor, labels=None if labels is None else load_labels(labels), **kw)
    if checkpoint is None:
        raise ValueError(f"pipeline({task!r}) needs checkpoint= (a model.safetensors made by imglish finetune, or an "
                         "official .pth with model=)")
    return cls.from_checkpoint(checkpoint, model=model, tokenizer=tokenizer, labels=labels, **kw)
