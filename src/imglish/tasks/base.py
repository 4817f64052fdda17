"""The task layer: what a task supplies to the one trainer, and the registry of tasks by their official names.

A :class:`Task` is a small object with a fixed set of verbs; the trainer (``imglish.training.trainer``) and the
evaluation loop (``imglish.training.evaluate``) never import a task module, they receive a task object:

* data: :meth:`Task.dataset` (the split's records, read with ``imglish.data`` readers or the official index files),
  :meth:`Task.sample` (one record to tensors, every random choice seeded by the sample's seed; evaluation
  transforms when ``train`` is false), :meth:`Task.batch_transform` (batch-level augmentation such as mixup);
* model: :meth:`Task.model_kwargs` (head sizes known from the data);
* loss: :meth:`Task.loss_terms` (sums over the micro-batch, pure) and :meth:`Task.count_targets` (what each sum is
  divided by, counted over the global batch by the trainer so that accumulation and data parallelism give the
  gradient of the global mean);
* evaluation: :meth:`Task.eval_sets` (what is encoded: for retrieval the unique images and the texts),
  :meth:`Task.predict` (plain records), :meth:`Task.predictions` (the submission file's content),
  :meth:`Task.ground_truth` and :meth:`Task.score` (metrics of a predictions file: the same function scores
  imglish's predictions and anybody else's).

A training batch has the trainer's layout ``{stream: {key: tensor}}``; fine-tuning tasks have one stream,
:data:`STREAM`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from imglish.training.config import TrainConfig

__all__ = [
    "STREAM",
    "StepOutput",
    "Task",
    "TaskSampleMaker",
    "TaskStep",
    "get_task",
    "list_tasks",
    "register_task",
]

STREAM = "task"

_TASKS: dict[str, type[Task]] = {}


@dataclass
class StepOutput:
    """Result of one forward over a micro-batch.

    Attributes:
        loss: the weighted, normalised loss to back-propagate (a 0-dim tensor).
        loss_sum: per term, the summed loss (detached, float64).
        count: per term, the number of examples or tokens the sum is over.
        correct: per term, how many argmax predictions were right (where that means something).
    """

    loss: torch.Tensor
    loss_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    count: dict[str, torch.Tensor] = field(default_factory=dict)
    correct: dict[str, torch.Tensor] = field(default_factory=dict)


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register a task under ``cls.name`` (and its ``aliases``)."""
    for name in (cls.name, *cls.aliases):
        _TASKS[name] = cls
    return cls


def _load_all() -> None:
    import importlib

    for module in ("classification", "vqa", "nlvr2", "retrieval", "captioning", "segmentation", "detection"):
        try:
            importlib.import_module(f"imglish.tasks.{module}")
        except ModuleNotFoundError as err:  # a task module not written yet
            if err.name != f"imglish.tasks.{module}":
                raise


def list_tasks() -> list[str]:
    """The fine-tuning tasks, by official name."""
    _load_all()
    return sorted(_TASKS)


def get_task(name: str) -> type[Task]:
    """The task class of ``name``.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    _load_all()
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


class Task:
    """Base class of the fine-tuning tasks (see the module docstring for the verbs).

    Args:
        cfg: the run's configuration (``cfg.task`` holds the task's knobs).
        data_dir: the data folder (a world written by ``imglish data shapes`` or the real datasets' layout).
        tokenizer: the text tokenizer (``encode``/``decode``), or ``None`` for image-only tasks.
        state: what the task learnt from the training data and must keep for evaluation (e.g. the VQA answer
            vocabulary), as written by :meth:`state_dict`; ``None`` builds it from the data.
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    #: registry suffix of the task's model (``beit3_<size>_patch16_<res>_<suffix>``)
    model_task: ClassVar[str] = ""
    #: the transform family (``imglish.tokenizers.transforms.TASKS``)
    transform_task: ClassVar[str] = ""
    terms: ClassVar[tuple[str, ...]] = ("loss",)
    uses_text: ClassVar[bool] = True
    #: the metric that ranks checkpoints (``metrics.json`` key)
    main_metric: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    #: DDP must look for parameters without gradient: a fine-tuning model never uses the vision ``mask_token`` (and
    #: an image-only task none of the text expert's weights)
    find_unused_parameters: ClassVar[bool] = True

    def __init__(
        self, cfg: TrainConfig, data_dir: Any = None, tokenizer: Any = None, state: Mapping[str, Any] | None = None
    ) -> None:
        self.cfg = cfg
        self.data_dir = data_dir
        self.tokenizer = tokenizer
        self.state: dict[str, Any] = dict(state or {})
        self._transforms: dict[bool, Any] = {}

    # ----------------------------------------------------------------------------------------- data
    def dataset(self, split: str, skip: Any) -> Sequence[Any]:
        """The records of ``split`` (reader records: dicts with PIL images and texts)."""
        raise NotImplementedError

    def sample(self, record: Any, seed: int | None, train: bool) -> dict[str, torch.Tensor]:
        """One record as tensors; random choices (training only) are seeded by ``seed``."""
        raise NotImplementedError

    def batch_transform(self, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """Batch-level training augmentation (identity by default)."""
        return batch

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"task {self.name!r} has no split {split!r}; expected one of {', '.join(self.splits)}")

    def image_transform(self, train: bool) -> Any:
        """The task's transform (spec §5) at ``model.img_size``, cached."""
        if train not in self._transforms:
            from imglish.tokenizers.transforms import build_transform

            t = self.cfg.task
            over: dict[str, Any] = {} if t.randaug is None else {"randaug": t.randaug}
            if t.crop_scale is not None:
                over["train_scale"] = (t.crop_scale, 1.0)
            if t.random_erasing is not None and self.transform_task == "imagenet":
                over["random_erasing"] = t.random_erasing
            self._transforms[train] = build_transform(
                self.transform_task, self.cfg.model.img_size, train=train, **over
            )
        return self._transforms[train]

    def seeded_image(self, image: Any, seed: int | None, train: bool) -> torch.Tensor:
        """Apply :meth:`image_transform` with torch's and Python's RNGs seeded by ``seed`` (restored after)."""
        from imglish.training.streams import seeded_rng

        tf = self.image_transform(train)
        if seed is None or not train:
            return tf(image)
        with seeded_rng(seed):
            return tf(image)

    def text(self, record: Mapping[str, Any], key: str = "text") -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, padding_mask)`` of length ``data.max_text_len`` (spec §4.2) from ``text_ids`` (ids without
        BOS/EOS, as in the official index files) or from the raw ``text`` through the tokenizer.

        Raises:
            ValueError: for an empty text, or a raw text with no tokenizer.
        """
        from imglish.data.collate import text_segment

        ids = record.get("text_ids")
        if ids is None:
            raw = record.get(key)
            if not isinstance(raw, str) or not raw.strip():
                raise ValueError("empty text")
            if self.tokenizer is None:
                raise ValueError("a raw text needs a text tokenizer")
            ids = self.tokenizer.encode(raw, add_special_tokens=False)
        tok = self.tokenizer
        special = {}
        if tok is not None:
            special = {"bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id}
        tokens, pad, _ = text_segment(list(ids), self.cfg.data.max_text_len, **special)
        return torch.tensor(tokens, dtype=torch.long), torch.tensor(pad, dtype=torch.long)

    # ----------------------------------------------------------------------------------------- model
    def model_kwargs(self) -> dict[str, Any]:
        """Task arguments of the model (``num_classes``, ...), known once the training data is read."""
        return {}

    def init_head(self, model: nn.Module) -> None:
        """Initialise a new task head beyond the official init (called only when the head was not loaded)."""

    def state_dict(self) -> dict[str, Any]:
        """What evaluation needs besides the weights (JSON-ready); saved as ``OUT/task.json``."""
        return dict(self.state)

    # ----------------------------------------------------------------------------------------- loss
    def loss_terms(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], step: int
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Per term: ``(sum of the loss over the micro-batch, correct predictions or None)``."""
        raise NotImplementedError

    def count_targets(self, batch: Mapping[str, Mapping[str, torch.Tensor]], step: int) -> dict[str, int]:
        """Per term, how many examples (or tokens) its sum is over in this micro-batch (default: examples)."""
        part = batch[STREAM]
        n = int(next(iter(part.values())).shape[0])
        return {t: n for t in self.terms}

    def prepare(self, batch: dict[str, dict[str, torch.Tensor]]) -> None:
        """Device-side work on a micro-batch before the forward (nothing by default)."""

    def term_weight(self, term: str) -> float:
        """Weight of a term in the logged total loss (1 by default)."""
        return 1.0

    def step_module(self, model: nn.Module) -> nn.Module:
        """The module the trainer calls (and DDP/FSDP wrap): ``forward(batch, denominators, step)``."""
        return TaskStep(self, model)

    # ----------------------------------------------------------------------------------------- evaluation
    def eval_sets(self, split: str, skip: Any) -> dict[str, Sequence[Any]]:
        """What evaluation encodes, by name (default: the split's records as one set)."""
        return {"records": self.dataset(split, skip)}

    def predict(self, model: nn.Module, set_name: str, batch: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Plain records for one evaluation batch (``batch["index"]`` holds the records' positions)."""
        raise NotImplementedError

    def predictions(self, records: Mapping[str, list[dict[str, Any]]], split: str) -> Any:
        """The submission file's content (``OUT/predictions.json``) from the gathered records of every set."""
        raise NotImplementedError

    def ground_truth(self, split: str, skip: Any) -> Any:
        """What :meth:`score` compares predictions with."""
        raise NotImplementedError

    def score(self, predictions: Any, ground_truth: Any, allow_missing: bool = False) -> dict[str, float]:
        """Metrics (percent) of a predictions file against the ground truth; unknown ids raise, and so do missing
        ones unless ``allow_missing`` (then only the predicted ids are scored: records skipped as unusable)."""
        raise NotImplementedError

    def evaluate_records(
        self, records: Mapping[str, list[dict[str, Any]]], split: str, skip: Any
    ) -> tuple[Any, dict[str, float]]:
        """``(predictions, metrics)`` of gathered records: the submission scored like any file, over the records
        that could be predicted (the skipped ones are counted by the caller)."""
        preds = self.predictions(records, split)
        return preds, self.score(preds, self.ground_truth(split, skip), allow_missing=True)


class TaskSampleMaker:
    """Adapts a task to the trainer's sampler (:class:`imglish.training.streams.StepBatches`)."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def __call__(self, stream: str, record: Any, seed: int) -> dict[str, torch.Tensor]:
        return self.task.sample(record, seed, train=True)


class TaskStep(nn.Module):
    """A task's loss over a micro-batch as a module (what DDP/FSDP wrap).

    Each term's sum is divided by the denominator the trainer passes (its count over the global batch divided by
    the number of processes), or by its own count when none is given.
    """

    def __init__(self, task: Task, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._task = task

    def forward(
        self,
        batch: Mapping[str, Mapping[str, torch.Tensor]],
        denominators: Mapping[str, float] | None = None,
        step: int = 0,
    ) -> StepOutput:
        part = batch[STREAM]
        counts = self._task.count_targets(batch, step)
        terms = self._task.loss_terms(self.model, part, step)
        total = None
        out = StepOutput(loss=torch.zeros(()))
        for name, (loss_sum, correct) in terms.items():
            n = counts[name]
            denom = float(denominators[name]) if denominators and name in denominators else float(max(n, 1))
            term = loss_sum / max(denom, 1e-12)
            total = term if total is None else total + term
            out.loss_sum[name] = loss_sum.detach().double()
            out.count[name] = torch.tensor(n, dtype=torch.float64)
            if correct is not None:
                out.correct[name] = correct.detach().double()
        out.loss = total if total is not None else out.loss
        return out
