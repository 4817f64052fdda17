"""The official fine-tuning recipes (spec §7) and a ``tiny`` recipe per task, as named presets.

Every official base and large recipe is a preset ``<task>_<size>`` (``vqav2_base``, ``coco_retrieval_large``, ...)
with the global batch, learning rate, layer decay, epochs, warmup, drop path, weight decay and task options of the
get_started commands (8 or more V100s). ``<task>_tiny`` fine-tunes the tiny model on the embedded world on a 2-core
CPU in a minute or two. Common to every official recipe: AdamW (eps 1e-8), no gradient clipping, warmup from 0 then
cosine to 1e-6, seed 42. The official runs used DeepSpeed fp16; imglish's presets use bf16 autocast.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

if typing.TYPE_CHECKING:
    from imglish.training.config import TrainConfig

__all__ = ["OFFICIAL_RECIPES", "Recipe", "task_presets"]

# registry suffix and official resolution of each task's model
_MODEL = {
    "imagenet": ("imageclassification", 224),
    "vqav2": ("vqav2", 480),
    "nlvr2": ("nlvr2", 224),
    "coco_retrieval": ("retrieval", 384),
    "flickr30k": ("retrieval", 384),
    "coco_captioning": ("captioning", 480),
    "nocaps": ("captioning", 480),
    "ade20k": ("segmentation", 512),
    "coco_detection": ("detection", 1024),
}
TASK_NAMES = tuple(_MODEL)
_DENSE_TASKS = ("ade20k", "coco_detection")


def model_task_of(task: str) -> str:
    """The registry suffix of a fine-tuning task's model (``imagenet`` -> ``imageclassification``)."""
    if task not in _MODEL:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASK_NAMES)}")
    return _MODEL[task][0]


@dataclass(frozen=True)
class Recipe:
    """One official recipe row (spec §7)."""

    batch: int
    lr: float
    layer_decay: float
    epochs: float
    warmup_epochs: float
    drop_path: float
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.999)
    checkpointing: bool = False
    extra: tuple[tuple[str, typing.Any], ...] = ()


_IMAGENET = (("task.mixup", 0.8), ("task.cutmix", 1.0), ("task.label_smoothing", 0.1), ("task.randaug", True))
_VQA = (("task.randaug", True), ("task.head_lr_weight", 20.0), ("data.max_text_len", 64))
_TEXT64 = (("data.max_text_len", 64),)
_CAPTION = (
    ("task.randaug", True),
    ("data.max_text_len", 32),
    ("task.mask_prob", 0.7),
    ("task.label_smoothing", 0.1),
    ("task.drop_worst_ratio", 0.2),
    ("task.drop_worst_after", 12000),
)

_ADE = (("task.scale_range", (0.5, 2.0)), ("task.aux_weight", 0.4), ("task.photometric", True))
_DET = (("task.scale_range", (0.1, 2.0)),)

OFFICIAL_RECIPES: dict[tuple[str, str], Recipe] = {
    ("imagenet", "base"): Recipe(1024, 7e-4, 0.65, 50, 5, 0.15, 0.05, extra=_IMAGENET),
    ("imagenet", "large"): Recipe(1024, 2e-4, 0.8, 50, 5, 0.25, 0.05, checkpointing=True, extra=_IMAGENET),
    ("vqav2", "base"): Recipe(128, 3e-5, 1.0, 10, 1, 0.1, 0.01, betas=(0.9, 0.98), extra=_VQA),
    ("vqav2", "large"): Recipe(128, 2e-5, 1.0, 10, 1, 0.15, 0.01, betas=(0.9, 0.98), checkpointing=True, extra=_VQA),
    ("nlvr2", "base"): Recipe(256, 7e-4, 0.65, 20, 5, 0.2, 0.2, extra=_TEXT64),
    ("nlvr2", "large"): Recipe(256, 3e-4, 0.85, 20, 5, 0.2, 0.2, checkpointing=True, extra=_TEXT64),
    ("coco_retrieval", "base"): Recipe(3072, 2e-4, 0.65, 15, 3, 0.2, 0.05, checkpointing=True, extra=_TEXT64),
    ("coco_retrieval", "large"): Recipe(3072, 5e-5, 0.85, 15, 3, 0.2, 0.05, checkpointing=True, extra=_TEXT64),
    ("flickr30k", "base"): Recipe(3072, 1e-4, 0.65, 20, 5, 0.2, 0.05, checkpointing=True, extra=_TEXT64),
    ("flickr30k", "large"): Recipe(3072, 5e-5, 0.85, 20, 5, 0.2, 0.05, checkpointing=True, extra=_TEXT64),
    ("coco_captioning", "base"): Recipe(256, 4e-5, 1.0, 10, 1, 0.1, 0.05, checkpointing=True, extra=_CAPTION),
    ("coco_captioning", "large"): Recipe(256, 8e-6, 1.0, 10, 1, 0.1, 0.05, checkpointing=True, extra=_CAPTION),
    ("nocaps", "base"): Recipe(256, 1e-5, 1.0, 10, 1, 0.1, 0.05, checkpointing=True, extra=_CAPTION),
    ("nocaps", "large"): Recipe(256, 8e-6, 1.0, 10, 1, 0.1, 0.05, checkpointing=True, extra=_CAPTION),
    # Dense prediction, never released for BEiT-3: BEiT's ADE20K UperNet recipe (512 crops, 160k iterations at batch
    # 16, AdamW lr 3e-5 with layer decay 0.9, drop path 0.1; a linear decay there, cosine here) and ViTDet's COCO
    # Mask R-CNN recipe (1024 squares with large-scale jitter, 100 epochs at batch 64, AdamW lr 1e-4, weight decay
    # 0.1, layer decay 0.7 for base and 0.9 for large, drop path 0.1 / 0.4; step decay there, cosine here). The
    # epochs below are the iterations over the 20,210 ADE20K and 117,266 COCO training images.
    ("ade20k", "base"): Recipe(16, 3e-5, 0.9, 127, 0.15, 0.1, 0.05, extra=_ADE),
    ("ade20k", "large"): Recipe(16, 3e-5, 0.95, 127, 0.15, 0.15, 0.05, checkpointing=True, extra=_ADE),
    ("coco_detection", "base"): Recipe(64, 1e-4, 0.7, 100, 0.14, 0.1, 0.1, checkpointing=True, extra=_DET),
    ("coco_detection", "large"): Recipe(64, 1e-4, 0.9, 100, 0.14, 0.4, 0.1, checkpointing=True, extra=_DET),
}

# The tiny recipes: the tiny model at 64 pixels (patch 8) on the embedded world, a fixed number of steps, from a
# random start that trains in a few hundred steps (model.init_std, model.pos_init_std in _tiny; docs/finetuning.md).
_TINY: dict[str, dict[str, typing.Any]] = {
    # 64-pixel scenes whose class is the largest shape: lighter augmentation than the ImageNet recipe
    "imagenet": {"optim.lr": 3e-3, "task.batch_size": 32, "schedule.max_steps": 150, "task.randaug": False,
                 "task.crop_scale": 0.5, "task.random_erasing": 0.0},
    # VQA and NLVR2 read the text through the CLS tokens: short runs (16 image tokens, 16 examples a step), and
    # VQA starts its answer bias at the training prior (task.head_bias_prior) and keeps the recipe's head lr x20
    "vqav2": {"optim.lr": 3e-4, "task.batch_size": 16, "schedule.max_steps": 100, "schedule.warmup_steps": 5,
              "task.answer_min_count": 1, "task.randaug": False, "model.patch_size": 16, "data.max_text_len": 24,
              "task.head_bias_prior": True, "task.head_lr_weight": 20.0},
    "nlvr2": {"optim.lr": 3e-4, "task.batch_size": 16, "schedule.max_steps": 100, "schedule.warmup_steps": 5,
              "model.img_size": 32, "model.patch_size": 16},
    # retrieval from scratch: a dual encoder collapses to constant features (loss stuck at ln(batch)) at 1e-3;
    # a low lr and a larger batch (more negatives) learn, and patch 16 (16 image tokens) keeps it quick
    "coco_retrieval": {"optim.lr": 3e-5, "task.batch_size": 64, "schedule.max_steps": 150, "model.patch_size": 16},
    "flickr30k": {"optim.lr": 3e-5, "task.batch_size": 64, "schedule.max_steps": 150, "model.patch_size": 16},
    # captioning from scratch: patch 16 (16 image tokens) learns to look at the image within a few hundred steps
    # where patch 8 does not; half the caption masked instead of the recipe's 70% (which leaves a model from scratch
    # rarely seeing the fully visible context that generation gives it: its beam search then writes run-on
    # captions); the official 3 beams; drop-worst keeps the recipe's start (12000 steps), i.e. never in a tiny run
    "coco_captioning": {"optim.lr": 1e-3, "task.batch_size": 32, "schedule.max_steps": 600, "model.patch_size": 16,
                        "task.mask_prob": 0.5, "task.max_gen_len": 24, "task.num_beams": 3},
    "nocaps": {"optim.lr": 1e-3, "task.batch_size": 32, "schedule.max_steps": 600, "model.patch_size": 16,
               "task.mask_prob": 0.5, "task.max_gen_len": 24, "task.num_beams": 3},
    # dense tasks on the world's 64-pixel scenes: 64-pixel crops at patch 8 (an 8x8 grid) for segmentation; the
    # scenes doubled to 128 pixels at patch 16 for detection (the smallest shapes are then ~20 pixels wide), small
    # anchors and 64-channel heads
    "ade20k": {"optim.lr": 1e-3, "task.batch_size": 16, "schedule.max_steps": 150, "task.head_channels": 64,
               "task.scale_range": (0.75, 1.5), "task.photometric": False, "task.eval_batch_size": 16},
    "coco_detection": {"optim.lr": 3e-4, "task.batch_size": 8, "schedule.max_steps": 150, "model.img_size": 128,
                       "model.patch_size": 16, "task.head_channels": 64, "task.scale_range": (0.8, 1.25),
                       "task.anchor_sizes": (8, 16, 32, 64, 128), "task.eval_batch_size": 8,
                       "task.rpn_proposals": 200, "task.roi_batch": 64},
}


def _official(task: str, size: str) -> TrainConfig:
    from imglish.training.config import (
        CheckpointConfig,
        ModelConfig,
        OptimConfig,
        ParallelConfig,
        ScheduleConfig,
        TaskConfig,
        TrainConfig,
        apply_overrides,
    )

    r = OFFICIAL_RECIPES[(task, size)]
    suffix, res = _MODEL[task]
    cfg = TrainConfig(
        preset=f"{task}_{size}",
        out=f"runs/{task}_{size}",
        seed=42,
        model=ModelConfig(
            name=f"beit3_{size}_patch16_{res}_{suffix}", img_size=res, patch_size=16, drop_path_rate=r.drop_path
        ),
        optim=OptimConfig(
            lr=r.lr, weight_decay=r.weight_decay, betas=r.betas, eps=1e-8, layer_decay=r.layer_decay, clip_grad=None
        ),
        schedule=ScheduleConfig(epochs=r.epochs, warmup_epochs=r.warmup_epochs, min_lr=1e-6, warmup_steps=0),
        checkpoint=CheckpointConfig(save_every=1000, keep_last=2),
        parallel=ParallelConfig(precision="bf16", activation_checkpointing=r.checkpointing),
        task=TaskConfig(name=task, batch_size=r.batch, eval_batch_size=2 if task in _DENSE_TASKS else 64),
    )
    cfg.data.text_vocab_size = 64002
    cfg.data.num_workers = 8
    apply_overrides(cfg, dict(r.extra))
    return cfg


def _tiny(task: str) -> TrainConfig:
    from imglish.training.config import (
        CheckpointConfig,
        ModelConfig,
        OptimConfig,
        ScheduleConfig,
        TaskConfig,
        TrainConfig,
        apply_overrides,
    )

    suffix, res = _MODEL[task]
    res = res if task in _DENSE_TASKS else 224
    cfg = TrainConfig(
        preset=f"{task}_tiny",
        out=f"runs/{task}_tiny",
        seed=0,
        model=ModelConfig(name=f"beit3_tiny_patch16_{res}_{suffix}", img_size=64, patch_size=8, init_std=0.05,
                          pos_init_std=0.02),
        optim=OptimConfig(lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8, clip_grad=None),
        schedule=ScheduleConfig(max_steps=150, warmup_steps=15, min_lr=1e-6),
        checkpoint=CheckpointConfig(save_every=50, keep_last=2),
        task=TaskConfig(name=task, eval_batch_size=64),
    )
    cfg.data.max_text_len = 32
    apply_overrides(cfg, _TINY[task])
    return cfg


def task_presets() -> dict[str, typing.Callable[[], TrainConfig]]:
    """``{preset name: factory}`` for every task: ``<task>_tiny``, ``<task>_base``, ``<task>_large``."""
    out: dict[str, typing.Callable[[], TrainConfig]] = {}
    for task in TASK_NAMES:
        out[f"{task}_tiny"] = lambda t=task: _tiny(t)
        for size in ("base", "large"):
            out[f"{task}_{size}"] = lambda t=task, s=size: _official(t, s)
    return out
