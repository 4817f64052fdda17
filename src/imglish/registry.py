"""Model names: a registry of entry points, `create_model` and `list_models`.

Every official name of `beit3/modeling_finetune.py` is registered (e.g. `beit3_base_patch16_480_vqav2`), plus the
same tasks in our `tiny` and `small` sizes and the paper's `giant`, the bare backbones (`beit3_base_patch16_224`) and
the pretraining models (`beit3_base_patch16_224_pretraining`). Names follow `beit3_{size}_patch{p}_{img}[_{task}]`.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any


from imglish.model.config import SIZES, BEiT3Config, size_config
import imglish.model.dense  # noqa: F401  (registers the dense task models)
from imglish.model.heads import TASK_MODELS, BEiT3Model

__all__ = [
    "ModelInfo",
    "create_model",
    "create_model_and_processor",
    "get_model_info",
    "list_models",
    "register_model",
]

# Preprocessing constants that travel with the weights (spec §5).
VL_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class ModelInfo:
    """What a registered name builds, and the preprocessing its weights expect."""

    name: str
    size: str
    task: str
    img_size: int
    config_overrides: dict[str, Any] = field(default_factory=dict)
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = VL_MEAN_STD[0]
    std: tuple[float, float, float] = VL_MEAN_STD[1]
    interpolation: str = "bicubic"
    official: bool = False

    def config(self, **overrides: Any) -> BEiT3Config:
        return size_config(self.size, **{"img_size": self.img_size, **self.config_overrides, **overrides})


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(info: ModelInfo) -> ModelInfo:
    """Add a name to the registry; a duplicate name is an error."""
    if info.name in _REGISTRY:
        raise ValueError(f"model name {info.name!r} is already registered")
    if info.task not in TASK_MODELS:
        raise ValueError(f"unknown task {info.task!r} for {info.name!r}; expected one of {sorted(TASK_MODELS)}")
    _REGISTRY[info.name] = info
    return info


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern, sorted (e.g. `list_models("*vqav2")`)."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_model_info(name: str) -> ModelInfo:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see imglish.list_models()"
        raise ValueError(f"unknown model name {name!r}{hint}")
    return _REGISTRY[name]


def _split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    config_fields = set(BEiT3Config.__dataclass_fields__) - {"extra"}
    cfg = {k: v for k, v in overrides.items() if k in config_fields}
    rest = {k: v for k, v in overrides.items() if k not in config_fields}
    return cfg, rest


def create_model(
    name: str | None,
    pretrained: str | os.PathLike | None = None,
    *,
    strict: bool = True,
    **overrides: Any,
) -> BEiT3Model:
    """Build a model by name, optionally loading weights from a local file.

    Args:
        name: a registered name (`list_models()`), or None to rebuild the model recorded in an imglish
            `.safetensors` file given as `pretrained`.
        pretrained: None, or the path of an official `.pth` or an imglish `.safetensors` file. Nothing is downloaded.
        strict: see `imglish.model.loading.load_checkpoint`.
        **overrides: config fields (`img_size`, `drop_path_rate`, `vocab_size`, ...) and task arguments
            (`num_classes`, `num_visual_tokens`). `None` values are ignored, so CLI defaults never override a
            model's own defaults.

    Returns:
        The model, in training mode like any fresh `nn.Module` (call `.eval()` for inference). The load report of
        `pretrained` is kept as `model.load_report`.
    """
    from imglish.model.loading import load_checkpoint, read_checkpoint_metadata

    overrides = {k: v for k, v in overrides.items() if v is not None}
    cfg_over, task_over = _split_overrides(overrides)
    meta: dict[str, Any] = {}
    if name is None:
        if pretrained is None:
            raise ValueError("create_model needs a model name, or pretrained= an imglish .safetensors file")
        meta = read_checkpoint_metadata(pretrained)  # the tensors are read once, by load_checkpoint
        if meta.get("format") != "imglish/1":
            raise ValueError(
                f"{pretrained} carries no imglish metadata; pass the model name to build (e.g. "
                f"'beit3_base_patch16_480_vqav2')"
            )
        config = BEiT3Config.from_dict(meta["config"]).replace(**cfg_over)
        task = meta["task"]
        kwargs = {**meta.get("task_kwargs", {}), **task_over}
        model_name = meta.get("model_name")
    else:
        info = get_model_info(name)
        config = info.config(**cfg_over)
        task = info.task
        kwargs = {**info.task_kwargs, **task_over}
        model_name = name
    cls = TASK_MODELS[task]
    try:
        model = cls(config, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad argument for a {task} model: {err}") from err
    model.model_name = model_name
    model.load_report = None
    if pretrained is not None:
        model.load_report = load_checkpoint(model, pretrained, strict=strict)
    return model


# The transform family of each task model (spec §5): ImageNet statistics for classification, 0.5 elsewhere.
_TRANSFORM_TASK = {
    "imageclassification": "imagenet",
    "vqav2": "vqav2",
    "nlvr2": "nlvr2",
    "retrieval": "retrieval",
    "captioning": "captioning",
    "pretraining": "pretraining",
    "backbone": "retrieval",
    # dense models: the pretraining normalisation; their pipelines resize and tile the image themselves
    "segmentation": "retrieval",
    "detection": "retrieval",
}


def create_model_and_processor(
    name: str | None,
    pretrained: str | os.PathLike | None = None,
    *,
    tokenizer: Any = None,
    max_length: int = 64,
    strict: bool = True,
    **overrides: Any,
):
    """A model and the `Processor` that turns raw images and texts into its inputs (like open_clip's
    `create_model_and_transforms`).

    The processor saved next to `pretrained` (by `save_model(..., processor=...)` or the trainers) is used when
    there is one; otherwise one is built from the model's task and image size (spec §5 preprocessing), with
    `tokenizer` (a `TextTokenizer` or the path of a SentencePiece model such as the official `beit3.spm`) for text.

    Returns:
        `(model, processor)`.
    """
    from imglish.tokenizers.processor import Processor
    from imglish.tokenizers.text import TextTokenizer
    from imglish.tokenizers.transforms import TransformConfig

    model = create_model(name, pretrained, strict=strict, **overrides)
    processor = Processor.find_for(pretrained) if pretrained is not None else None
    if processor is None or tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = TextTokenizer(tokenizer)
        if processor is not None:
            processor = Processor(tokenizer, processor.transform_config, processor.max_length)
        else:
            height, width = model.config.img_size
            if height != width:
                raise ValueError(
                    f"the model takes {height}x{width} images; build a Processor with a matching transform yourself"
                )
            transform = TransformConfig.for_task(_TRANSFORM_TASK[model.task], height)
            processor = Processor(tokenizer, transform, max_length)
    return model, processor


# ---------------------------------------------------------------------------------------------- registrations
_OFFICIAL: dict[str, list[tuple[str, int]]] = {
    # task -> [(size, img_size)] exactly as registered by the official code (spec §2.2)
    "imageclassification": [("base", 224), ("large", 224)],
    "nlvr2": [("base", 224), ("large", 224)],
    "vqav2": [("base", 384), ("base", 480), ("large", 384), ("large", 480), ("large", 768)],
    "captioning": [("base", 224), ("base", 480), ("large", 480)],
    "retrieval": [("base", 224), ("base", 384), ("large", 384)],
}
_OURS: dict[str, list[int]] = {
    # our sizes (tiny, small) and the paper's giant (patch 14: resolutions must be multiples of 14)
    "imageclassification": [224],
    "nlvr2": [224],
    "vqav2": [224, 384, 480],
    "captioning": [224, 480],
    "retrieval": [224, 384],
}
_GIANT_RES = {224: 224, 384: 392, 480: 476}
_TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "imageclassification": dict(config_overrides={"normalize_output": False}, task_kwargs={"num_classes": 1000},
                                mean=IMAGENET_MEAN_STD[0], std=IMAGENET_MEAN_STD[1]),
    "vqav2": dict(config_overrides={"normalize_output": False}, task_kwargs={"num_classes": 3129}),
    "nlvr2": dict(task_kwargs={"num_classes": 2}),
    "captioning": {},
    "retrieval": {},
    "pretraining": dict(task_kwargs={"num_visual_tokens": 8192}),
    "backbone": {},
    "segmentation": dict(config_overrides={"normalize_output": False, "dynamic_img_size": True},
                         task_kwargs={"num_classes": 150}),
    "detection": dict(config_overrides={"normalize_output": False, "dynamic_img_size": True},
                      task_kwargs={"num_classes": 81}),
}
# Dense prediction (never released officially): UperNet at 512 (BEiT's ADE20K crops; large also at 640) and Mask
# R-CNN at 1024 (ViTDet), in every size but giant (patch 14).
_DENSE: dict[str, list[int]] = {"segmentation": [512, 640], "detection": [1024]}


def _name(size: str, img: int, task: str | None) -> str:
    patch = SIZES[size]["patch_size"]
    base = f"beit3_{size}_patch{patch}_{img}"
    return base if task in (None, "backbone") else f"{base}_{task}"


def _register_all() -> None:
    for task, entries in _OFFICIAL.items():
        for size, img in entries:
            register_model(ModelInfo(_name(size, img, task), size, task, img, official=True, **_TASK_DEFAULTS[task]))
    for task, resolutions in _OURS.items():
        for size in ("tiny", "small", "giant"):
            for img in resolutions:
                img = _GIANT_RES[img] if size == "giant" else img
                name = _name(size, img, task)
                if name not in _REGISTRY:
                    register_model(ModelInfo(name, size, task, img, **_TASK_DEFAULTS[task]))
    for task, resolutions in _DENSE.items():
        for size in ("tiny", "small", "base", "large"):
            for img in resolutions:
                register_model(ModelInfo(_name(size, img, task), size, task, img, **_TASK_DEFAULTS[task]))
    for size in SIZES:
        img = 224
        register_model(ModelInfo(_name(size, img, "backbone"), size, "backbone", img))
        register_model(ModelInfo(_name(size, img, "pretraining"), size, "pretraining", img,
                                 **_TASK_DEFAULTS["pretraining"]))


_register_all()
