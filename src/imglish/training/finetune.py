"""``finetune(cfg)``: a task's training split to ``OUT/model.safetensors`` and ``OUT/metrics.json``, through the one
trainer.

1. the text tokenizer (tasks with text): ``data.text_tokenizer``, else the Processor saved next to
   ``model.init_from`` (a pretraining run's), else ``OUT/tokenizers/text.model`` trained on the data folder's texts;
2. the task (``imglish.tasks.get_task``) and its training records (``task.max_train_examples`` of them, a seeded
   subset, when set);
3. the model: the task's registered model; with ``model.init_from`` the backbone (and any fitting head) of that file:
   an imglish file gives its own architecture, an official ``.pth`` the one ``model.name`` names. Without it the
   model starts from random weights (training from scratch);
4. :class:`~imglish.training.trainer.Trainer` with the task (periodic evaluation every ``task.eval_every`` steps),
   resuming the newest checkpoint with ``checkpoint.resume``;
5. ``OUT/model.safetensors`` with its Processor and ``OUT/task.json`` (what evaluation needs besides the weights,
   e.g. the VQA answer vocabulary) beside it, and the evaluation of ``task.eval_split`` in ``OUT/metrics.json`` and
   ``OUT/predictions.json``; ``OUT/summary.json`` sums the run up.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imglish.training import parallel
from imglish.training.config import TrainConfig, save_config

__all__ = ["FinetuneSummary", "build_task_model", "finetune", "load_task_and_model", "make_task"]

TASK_FILE = "task.json"


@dataclass
class FinetuneSummary:
    """What a fine-tuning run produced and measured.

    Attributes:
        out: the run folder; model_path: ``OUT/model.safetensors``.
        task, split: the task and the split of the final evaluation.
        metrics: the final evaluation (percent).
        train_examples: training records used; steps, skipped_steps: optimizer steps (and non-finite skips).
        init: the weights the run started from (``None``: random).
        history: the logged rows; elapsed_s: wall time of the loop; stopped_early: ended by the time limit.
        bad_records: skipped training records by reason (all ranks); eval_skipped: skipped evaluation records.
    """

    out: str
    model_path: str
    task: str
    split: str
    metrics: dict[str, float]
    train_examples: int
    steps: int
    skipped_steps: int
    init: str | None = None
    samples_per_s: float = 0.0
    elapsed_s: float = 0.0
    stopped_early: bool = False
    eval_skipped: int = 0
    bad_records: dict[str, int] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- tokenizer
def resolve_text_tokenizer(
    cfg: TrainConfig, checkpoint: str | None, is_main: bool = True, train: bool = True
) -> Any:
    """The text tokenizer of a run: ``data.text_tokenizer``, else the Processor next to ``checkpoint``, else the one
    in ``OUT/tokenizers/text.model`` (trained there, on rank 0, from the data folder's texts when missing)."""
    from imglish.tokenizers.processor import Processor
    from imglish.tokenizers.text import TextTokenizer

    if cfg.data.text_tokenizer:
        return TextTokenizer(cfg.data.text_tokenizer)
    if checkpoint:
        proc = Processor.find_for(checkpoint)
        if proc is not None and proc.tokenizer is not None:
            return proc.tokenizer
        if not str(checkpoint).endswith(".safetensors"):
            raise ValueError(
                f"{checkpoint} has no imglish Processor beside it: pass its SentencePiece model with "
                "--data.text_tokenizer (the official checkpoints use beit3.spm)"
            )
    from imglish.training.pretrain import load_world_sources, prepare_text_tokenizer, tokenizer_corpus

    if not train:
        raise ValueError(
            f"{checkpoint} has no text tokenizer beside it (processor.json): pass --data.text_tokenizer"
        )
    if not cfg.data.path:
        raise ValueError("no text tokenizer: give --data.text_tokenizer, --init with a Processor, or --data")
    out = Path(cfg.out)
    sources = load_world_sources(cfg.data.path, "train")
    return prepare_text_tokenizer(cfg, lambda: tokenizer_corpus(sources, out / "tokenizers"), is_main)


def make_task(cfg: TrainConfig, tokenizer: Any, state: dict[str, Any] | None, need_tokenizer: bool = True) -> Any:
    """The task object of ``cfg.task.name`` over ``data.path``."""
    from imglish.tasks import get_task

    cls = get_task(cfg.task.name)
    if need_tokenizer and cls.uses_text and tokenizer is None:
        raise ValueError(f"task {cls.name!r} needs a text tokenizer")
    return cls(cfg, cfg.data.path, tokenizer, state)


# --------------------------------------------------------------------------------------------- model
def _task_config_overrides(model_task: str) -> dict[str, Any]:
    from imglish.registry import _TASK_DEFAULTS

    return dict(_TASK_DEFAULTS.get(model_task, {}).get("config_overrides", {}))


def build_task_model(cfg: TrainConfig, task: Any, vocab_size: int | None, init: str | None = None) -> nn.Module:
    """The task's model, random or from ``init`` (seeded by ``cfg.seed``).

    An imglish ``.safetensors`` ``init`` brings its architecture (sizes, vocabulary, patch size) and only the
    image size and drop path come from ``cfg.model``; an official ``.pth`` is loaded into ``cfg.model.name``.

    Raises:
        ValueError: when the weights do not fit (the message names the file, the model and the report).
    """
    import imglish
    from imglish.model.config import BEiT3Config
    from imglish.model.heads import TASK_MODELS
    from imglish.model.loading import load_checkpoint, read_checkpoint_metadata

    torch.manual_seed(cfg.seed)
    m = cfg.model
    kwargs = task.model_kwargs()
    modal: dict[str, Any] = {}
    if m.modalities == "vision":
        if task.uses_text:
            raise ValueError(f"model.modalities='vision' drops the text weights, but task {task.name!r} reads text")
        modal = {"modalities": ("vision",)}
    meta: dict[str, Any] = {}
    if init:
        if not Path(init).is_file():
            raise FileNotFoundError(f"--init {init!r} does not exist")
        meta = read_checkpoint_metadata(init)  # the tensors are read once, by load_checkpoint below
    if meta.get("format") == "imglish/1":
        config = BEiT3Config.from_dict(meta["config"]).replace(
            img_size=m.img_size, drop_path_rate=m.drop_path_rate, **_task_config_overrides(task.model_task), **modal
        )
        model = TASK_MODELS[task.model_task](config, **kwargs)
        model.model_name = m.name
    else:
        over: dict[str, Any] = {
            "img_size": m.img_size, "patch_size": m.patch_size, "drop_path_rate": m.drop_path_rate, **modal
        }
        if vocab_size is not None and not init:
            over["vocab_size"] = vocab_size
        model = imglish.create_model(m.name, **over, **kwargs)
    if getattr(model, "task", None) != task.model_task:
        raise ValueError(
            f"model.name {m.name!r} builds a {model.task} model; task {task.name!r} needs a {task.model_task} model"
        )
    if not init:
        model.beit3.init_for_scratch(m.init_std, m.pos_init_std)
        task.init_head(model)
        return model
    try:
        model.load_report = load_checkpoint(model, init, strict=True)
    except ValueError as err:
        raise ValueError(f"{init} does not fit the {task.name} model {m.name!r}:\n{err}") from None
    report = model.load_report
    if any(k.startswith("head") for k in (*report.missing, *report.dropped_heads)):  # the head is new
        task.init_head(model)
    return model


def _read_task_state(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(checkpoint).parent / TASK_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data.get("state")


def load_task_and_model(
    cfg: TrainConfig,
    checkpoint: str | os.PathLike,
    model_name: str | None = None,
    size_overrides: Mapping[str, Any] | None = None,
) -> tuple[Any, nn.Module]:
    """The task and the model of a checkpoint to evaluate or predict with.

    An imglish file rebuilds the model it records (its task must be ``cfg.task.name``'s); an official ``.pth`` is
    loaded into ``model_name`` (or ``cfg.model.name``) at that name's resolution, or at ``size_overrides``
    (``img_size``, ``patch_size``) when given.

    Raises:
        ValueError: for a checkpoint of another task or a model it does not fit, naming the file and both layouts.
    """
    import imglish
    from imglish.model.loading import read_checkpoint_metadata

    checkpoint = str(checkpoint)
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
    from imglish.training.recipes import model_task_of

    meta = read_checkpoint_metadata(checkpoint)
    expected = model_task_of(cfg.task.name)
    ours = meta.get("format") == "imglish/1" and model_name is None
    if ours and meta.get("task") != expected:
        raise ValueError(
            f"{checkpoint} holds a {meta.get('task')!r} model ({meta.get('model_name')}); task {cfg.task.name!r} "
            f"needs a {expected!r} model"
        )
    if not ours:
        name = model_name or cfg.model.name
        found = imglish.get_model_info(name).task
        if found != expected:
            raise ValueError(f"--model {name!r} is a {found} model; task {cfg.task.name!r} needs a {expected} model")
    tokenizer = None
    from imglish.tasks import get_task

    cls = get_task(cfg.task.name)
    if cls.uses_text:
        tokenizer = resolve_text_tokenizer(cfg, checkpoint, train=False)
    state = _read_task_state(checkpoint)
    task = make_task(cfg, tokenizer, state)
    if ours:
        model = imglish.create_model(None, pretrained=checkpoint)
        _sizes_from_model(cfg, model)
        task._transforms.clear()
        return task, model
    over: dict[str, Any] = dict(size_overrides or {})
    if model_name is None and not over:
        over = {"img_size": cfg.model.img_size, "patch_size": cfg.model.patch_size}
    kwargs = task.model_kwargs()
    try:
        model = imglish.create_model(name, pretrained=checkpoint, **over, **kwargs)
    except ValueError as err:
        raise ValueError(f"{checkpoint} does not fit the model {name!r}:\n{err}") from None
    _sizes_from_model(cfg, model)
    task._transforms.clear()
    return task, model


def _sizes_from_model(cfg: TrainConfig, model: nn.Module) -> None:
    """The image and patch size the model was built for, as the (square) sizes the transforms take."""
    img, patch = model.config.img_size, model.config.patch_size
    cfg.model.img_size = int(img if isinstance(img, int) else img[0])
    cfg.model.patch_size = int(patch if isinstance(patch, int) else patch[0])


# --------------------------------------------------------------------------------------------- data
def _subset(records: Any, n: int, seed: int) -> Any:
    from imglish.training.streams import _Subset, sample_seed

    if not n or n >= len(records):
        return records
    g = torch.Generator().manual_seed(sample_seed(seed, "subset", n))
    return _Subset(records, sorted(torch.randperm(len(records), generator=g)[:n].tolist()))


def _resolve_schedule(cfg: TrainConfig, num_train: int) -> None:
    s = cfg.schedule
    if s.epochs > 0:
        per_epoch = max(num_train // cfg.task.batch_size, 1)
        s.max_steps = max(math.ceil(s.epochs * per_epoch), 1)
        if s.warmup_epochs > 0:
            s.warmup_steps = round(s.warmup_epochs * per_epoch)


# --------------------------------------------------------------------------------------------- main entry
def finetune(
    cfg: TrainConfig,
    *,
    loss_hook: Any = None,
    on_step: Any = None,
) -> FinetuneSummary:
    """Fine-tune ``cfg.task.name`` as ``cfg`` describes (call on every rank under torchrun).

    Returns:
        The :class:`FinetuneSummary` (also ``OUT/summary.json``); the final metrics are in ``OUT/metrics.json``.
    """
    from imglish.data import BadRecordCounter
    from imglish.tasks import STREAM, TaskSampleMaker
    from imglish.training.evaluate import run_evaluation, write_json
    from imglish.training.pretrain import _gather_bad_records, export_model
    from imglish.training.streams import StepBatches
    from imglish.training.trainer import Trainer

    cfg.validate()
    if cfg.task.name == "pretraining":
        raise ValueError("task 'pretraining' is run by `imglish pretrain`; finetune takes a downstream task")
    if not cfg.data.path:
        raise ValueError("data.path (--data) is required: a world from `imglish data shapes` or a dataset folder")
    if not Path(cfg.data.path).is_dir():
        raise FileNotFoundError(f"data folder {cfg.data.path!r} does not exist")
    device = parallel.resolve_device(cfg.parallel.device, int(os.environ.get("LOCAL_RANK", "0")))
    info = parallel.init_distributed(cfg.parallel.backend, device, cfg.parallel.timeout_s)
    if cfg.parallel.threads > 0:
        torch.set_num_threads(cfg.parallel.threads)
    out = Path(cfg.out)
    init = cfg.model.init_from
    from imglish.tasks import get_task

    cls = get_task(cfg.task.name)
    tokenizer = resolve_text_tokenizer(cfg, init, info.is_main) if cls.uses_text else None
    task = make_task(cfg, tokenizer, None)
    skip = BadRecordCounter(strict=cfg.data.strict)
    train = _subset(task.dataset("train", skip), cfg.task.max_train_examples, cfg.seed)
    if len(train) == 0:
        raise ValueError(f"the training split of {cfg.task.name!r} in {cfg.data.path!r} has no usable record")
    _resolve_schedule(cfg, len(train))
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.json")
    # image-only tasks from scratch: the (unused) text embedding gets data.text_vocab_size rows, not 64010
    vocab = tokenizer.vocab_size if tokenizer is not None else cfg.data.text_vocab_size
    model = build_task_model(cfg, task, vocab, init)
    dataset = StepBatches(
        {STREAM: train},
        TaskSampleMaker(task),
        {STREAM: cfg.task.batch_size},
        cfg.seed,
        info.rank,
        info.world_size,
        cfg.optim.accum_steps,
        skip_counter=skip,
        batch_transform=task.batch_transform,
    )

    def eval_model(trainer: Trainer) -> nn.Module:
        if trainer.strategy != "fsdp":
            return trainer.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from imglish.model.heads import TASK_MODELS

        full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
        copy = TASK_MODELS[task.model_task](trainer.model.config, **task.model_kwargs()).to(device)
        copy.load_state_dict({k: v.detach() for k, v in full.items()})
        return copy

    def evaluator(trainer: Trainer) -> dict[str, float]:
        res = run_evaluation(task, eval_model(trainer), cfg.task.eval_split, device=device, dist_info=info)
        return res.metrics

    trainer = Trainer(cfg, model, dataset, dist_info=info, device=device, loss_hook=loss_hook, task=task,
                      evaluator=evaluator)
    if cfg.checkpoint.resume:
        trainer.maybe_resume()
    result = trainer.train(on_step=on_step)
    full_state = trainer._model_state() if trainer.strategy == "fsdp" else None  # collective under FSDP
    bad = _gather_bad_records(skip)  # collective
    if info.is_main:
        path = export_model(model, out, cfg.checkpoint.export_official, state_dict=full_state)
        from imglish.tokenizers.processor import Processor
        from imglish.tokenizers.transforms import TransformConfig

        transform = TransformConfig.for_task(task.transform_task, cfg.model.img_size)
        Processor(tokenizer, transform, cfg.data.max_text_len).save_next_to(path)
        write_json(out / TASK_FILE, {"task": task.name, "state": task.state_dict()})
    parallel.barrier("rank 0 to write the model, its processor and task.json")
    final = run_evaluation(
        task, eval_model(trainer), cfg.task.eval_split, device=device, dist_info=info, out=out,
        progress=cfg.logging.progress,
    )
    summary = FinetuneSummary(
        out=str(out),
        model_path=str(out / "model.safetensors"),
        task=task.name,
        split=cfg.task.eval_split,
        metrics=final.metrics,
        train_examples=len(train),
        steps=result.step,
        skipped_steps=result.skipped_steps,
        init=init,
        samples_per_s=result.samples_per_s,
        elapsed_s=result.elapsed_s,
        stopped_early=result.stopped_early,
        eval_skipped=final.skipped,
        bad_records=bad.counts,
        history=result.history,
    )
    if info.is_main:
        write_json(out / "summary.json", asdict(summary))
        if bad.total:
            print(f"bad records (training): {bad.summary()}")
    parallel.barrier("rank 0 to write summary.json")
    return summary
