"""Per-task image transforms (torchvision transforms v2), as the official recipes use them (spec §5).

==============================  ====================================================  ===============================
task                            train                                                 eval
==============================  ====================================================  ===============================
vqav2, nlvr2, retrieval,        RandomResizedCrop(scale 0.5–1, ratio 3/4–4/3,         squash-resize to (s, s), bicubic;
captioning                      bicubic), flip, RandAugment(2 ops, level 7) for       mean/std 0.5
                                vqav2/captioning; mean/std 0.5
imagenet                        RandomResizedCrop(scale 0.08–1, bicubic), flip,       Resize(s / crop_pct, bicubic),
                                RandAugment(2 ops, magnitude 9), RandomErasing 0.25   CenterCrop(s); ImageNet mean/std
pretraining                     ColorJitter 0.4, flip, one RandomResizedCrop read at  squash-resize, as the VL tasks
                                two sizes: a 0.5-normalised view for the model and
                                a [0, 1] view for the visual tokenizer
==============================  ====================================================  ===============================

The official vision-language RandAugment (``beit3/randaug.py``) has its own op list and fixed level; it is
reproduced here by :class:`OfficialRandAugment` from torchvision's functional ops. ImageNet uses torchvision's
``RandAugment`` in place of timm's ``rand-m9-mstd0.5-inc1`` (close, not identical).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "TASKS",
    "INCEPTION_MEAN",
    "INCEPTION_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TransformConfig",
    "OfficialRandAugment",
    "PretrainingTransform",
    "build_transform",
    "transform_from_config",
]

TASKS: tuple[str, ...] = ("vqav2", "nlvr2", "retrieval", "captioning", "imagenet", "pretraining")
_VL_TASKS = ("vqav2", "nlvr2", "retrieval", "captioning")

INCEPTION_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
INCEPTION_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_INTERP = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
}


@dataclass
class TransformConfig:
    """Everything that defines a task's preprocessing; saved with a model inside its :class:`Processor`.

    Attributes:
        task: one of :data:`TASKS`.
        image_size: output side length in pixels.
        mean: normalisation mean per channel.
        std: normalisation std per channel.
        interpolation: resize filter name (``bicubic`` in every official recipe).
        crop_pct: ImageNet eval only: resize the short side to ``image_size / crop_pct`` then center-crop.
        train_scale: RandomResizedCrop area range for training.
        train_ratio: RandomResizedCrop aspect-ratio range for training.
        randaug: RandAugment in training (None = the recipe's choice: on for vqav2, captioning, imagenet).
        random_erasing: RandomErasing probability in training (ImageNet recipe: 0.25).
        color_jitter: ColorJitter strength in pretraining (0 disables it).
        tokenizer_image_size: pretraining only: side of the [0, 1] view given to the visual tokenizer
            (defaults to ``image_size``).
    """

    task: str
    image_size: int
    mean: tuple[float, float, float] = INCEPTION_MEAN
    std: tuple[float, float, float] = INCEPTION_STD
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    train_scale: tuple[float, float] = (0.5, 1.0)
    train_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    randaug: bool | None = None
    random_erasing: float = 0.0
    color_jitter: float = 0.0
    tokenizer_image_size: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        if not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        if self.interpolation not in _INTERP:
            raise ValueError(f"interpolation must be one of {sorted(_INTERP)}, got {self.interpolation!r}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        self.mean = tuple(float(m) for m in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(s) for s in self.std)  # type: ignore[assignment]
        self.train_scale = tuple(float(s) for s in self.train_scale)  # type: ignore[assignment]
        self.train_ratio = tuple(float(r) for r in self.train_ratio)  # type: ignore[assignment]
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std must have 3 values (RGB)")

    @classmethod
    def for_task(cls, task: str, image_size: int, **overrides: Any) -> "TransformConfig":
        """The official preprocessing of ``task`` at ``image_size`` (spec §5), with optional overrides.

        ``None`` overrides are ignored, so CLI defaults never replace a task's own values.
        """
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        base: dict[str, Any] = {}
        if task == "imagenet":
            base = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, train_scale=(0.08, 1.0), random_erasing=0.25)
        elif task == "pretraining":
            base = dict(train_scale=(0.2, 1.0), color_jitter=0.4)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(task=task, image_size=image_size, **base)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TransformConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TransformConfig keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    @property
    def uses_randaug(self) -> bool:
        """Whether training applies RandAugment (the recipe's default when ``randaug`` is None)."""
        if self.randaug is not None:
            return self.randaug
        return self.task in ("vqav2", "captioning", "imagenet")


class OfficialRandAugment(v2.Transform):
    """The RandAugment of the official BEiT-3 vision-language recipes (``beit3/randaug.py``).

    Draws ``num_ops`` operations with replacement from Identity, AutoContrast, Equalize, Brightness, Sharpness,
    ShearX, ShearY, TranslateX, TranslateY and Rotate; each is applied with probability ``prob`` at a fixed
    ``level`` out of 10: enhance factor ``level/10·1.8 + 0.1`` (1.36), shear ``±level/10·0.3`` (0.21), translate
    ``±level`` pixels, rotate ``±level/10·30`` degrees, fill grey 128. Works on PIL images and uint8 tensors.

    Args:
        num_ops: operations drawn per image (2).
        level: magnitude on the 0..10 scale (7).
        prob: probability of applying each drawn op (0.5).
        fill: fill colour for geometric ops.
    """

    OPS: tuple[str, ...] = (
        "identity", "autocontrast", "equalize", "brightness", "sharpness",
        "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
    )

    def __init__(self, num_ops: int = 2, level: float = 7, prob: float = 0.5, fill: int = 128) -> None:
        super().__init__()
        if num_ops < 0 or not 0 <= level <= 10 or not 0 <= prob <= 1:
            raise ValueError(f"bad RandAugment settings num_ops={num_ops}, level={level}, prob={prob}")
        self.num_ops, self.level, self.prob, self.fill = num_ops, float(level), prob, fill

    def _apply_op(self, img: Any, op: str) -> Any:
        lv = self.level / 10.0
        sign = 1.0 if random.random() < 0.5 else -1.0
        fill = [float(self.fill)] * 3
        if op == "identity":
            return img
        if op == "autocontrast":
            return F.autocontrast(img)
        if op == "equalize":
            return F.equalize(img)
        if op == "brightness":
            return F.adjust_brightness(img, lv * 1.8 + 0.1)
        if op == "sharpness":
            return F.adjust_sharpness(img, lv * 1.8 + 0.1)
        if op in ("shear_x", "shear_y"):
            # The official code warps with [[1, s, 0], [0, 1, 0]] about the top-left corner.
            deg = math.degrees(math.atan(sign * lv * 0.3))
            shear = [deg, 0.0] if op == "shear_x" else [0.0, deg]
            return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
                            interpolation=InterpolationMode.NEAREST, fill=fill, center=[0, 0])
        if op in ("translate_x", "translate_y"):
            t = sign * self.level
            translate = [t, 0.0] if op == "translate_x" else [0.0, t]
            return F.affine(img, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0],
                            interpolation=InterpolationMode.NEAREST, fill=fill)
        if op == "rotate":
            return F.rotate(img, sign * lv * 30.0, interpolation=InterpolationMode.NEAREST, fill=fill)
        raise ValueError(f"unknown RandAugment op {op!r}")

    def forward(self, img: Any) -> Any:  # type: ignore[override]
        for op in random.choices(self.OPS, k=self.num_ops):
            if random.random() < self.prob:
                img = self._apply_op(img, op)
        return img


class PretrainingTransform:
    """BEiT-style two-view pretraining augmentation (spec §9.4).

    One random crop is read at two sizes: the model's view (normalised) and the visual tokenizer's view
    (values in [0, 1], no normalisation), so the tokens describe exactly the pixels the model sees.

    Args:
        config: a ``pretraining`` :class:`TransformConfig`.

    Returns (on call with a PIL image):
        ``(image, tokenizer_image)``: ``(3, S, S)`` normalised float and ``(3, T, T)`` float in [0, 1].
    """

    def __init__(self, config: TransformConfig) -> None:
        self.config = config
        self.size = config.image_size
        self.tok_size = config.tokenizer_image_size or config.image_size
        self.interp = _INTERP[config.interpolation]
        self.jitter = v2.ColorJitter(*(config.color_jitter,) * 3) if config.color_jitter > 0 else None
        self.crop = v2.RandomResizedCrop(self.size, scale=config.train_scale, ratio=config.train_ratio)
        self.to_float = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
        self.normalize = v2.Normalize(config.mean, config.std)

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        if self.jitter is not None:
            img = self.jitter(img)
        if random.random() < 0.5:
            img = F.horizontal_flip(img)
        x = self.to_float(img)
        top, left, h, w = _crop_params(self.crop, x)
        view = F.resized_crop(x, top, left, h, w, [self.size, self.size], interpolation=self.interp, antialias=True)
        tok = F.resized_crop(x, top, left, h, w, [self.tok_size, self.tok_size], interpolation=self.interp,
                             antialias=True)
        return self.normalize(view.clamp(0, 1)), tok.clamp(0, 1)

    def __repr__(self) -> str:
        return f"PretrainingTransform({self.config})"


def _crop_params(rrc: v2.RandomResizedCrop, img: torch.Tensor) -> tuple[int, int, int, int]:
    params = rrc.make_params([img])
    return params["top"], params["left"], params["height"], params["width"]


def transform_from_config(config: TransformConfig, train: bool) -> Callable[[Any], Any]:
    """Build the transform described by ``config`` (see :func:`build_transform`)."""
    interp = _INTERP[config.interpolation]
    s = config.image_size
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    norm = v2.Normalize(config.mean, config.std)
    if config.task == "pretraining" and train:
        return PretrainingTransform(config)
    if not train:
        if config.task == "imagenet":
            return v2.Compose([v2.Resize(int(s / config.crop_pct), interpolation=interp, antialias=True),
                               v2.CenterCrop(s), *to_tensor, norm])
        return v2.Compose([v2.Resize((s, s), interpolation=interp, antialias=True), *to_tensor, norm])
    steps: list[Any] = [
        v2.RandomResizedCrop(s, scale=config.train_scale, ratio=config.train_ratio, interpolation=interp,
                             antialias=True),
        v2.RandomHorizontalFlip(0.5),
    ]
    if config.uses_randaug:
        if config.task == "imagenet":
            steps.append(v2.RandAugment(num_ops=2, magnitude=9, interpolation=InterpolationMode.BICUBIC))
        else:
            steps.append(OfficialRandAugment())
    steps += [*to_tensor, norm]
    if config.random_erasing > 0:
        steps.append(v2.RandomErasing(p=config.random_erasing, value="random"))
    return v2.Compose(steps)


def build_transform(task: str, image_size: int, train: bool, **overrides: Any) -> Callable[[Any], Any]:
    """The image transform of a task, as the official recipe defines it (spec §5).

    Args:
        task: ``vqav2``, ``nlvr2``, ``retrieval``, ``captioning``, ``imagenet`` or ``pretraining``.
        image_size: output side (224 NLVR2/ImageNet, 384 retrieval, 480 VQA/captioning in the recipes).
        train: training augmentation (True) or the deterministic evaluation transform (False).
        **overrides: any :class:`TransformConfig` field (e.g. ``randaug=False``, ``tokenizer_image_size=224``).

    Returns:
        A callable taking a PIL image. It returns a ``(3, S, S)`` float tensor, except the training
        ``pretraining`` transform, which returns ``(image, tokenizer_image)`` (see :class:`PretrainingTransform`).
    """
    return transform_from_config(TransformConfig.for_task(task, image_size, **overrides), train)
