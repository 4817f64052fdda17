"""Teachers for VQ-KD training: what the tokenizer's decoder learns to reconstruct, one vector per patch.

Built in, no weights needed:

* ``pixels``: each patch's colours, average-pooled to ``cells x cells`` and mapped to [-1, 1];
* ``hog``: histograms of oriented gradients (per colour channel, ``cells x cells`` cells, 9 unsigned bins,
  L2-normalised per patch), the target MaskFeat uses;
* ``pixels+hog``: both, each L2-normalised, concatenated.

From a local weights folder (needs ``transformers``; nothing is downloaded):

* ``clip:DIR``: a Hugging Face ``CLIPVisionModelWithProjection`` folder (e.g. a saved
  ``openai/clip-vit-base-patch16``); targets are the last-layer patch tokens through ``post_layernorm`` and
  ``visual_projection`` (512-d for ViT-B/16), as BEiT v2 uses them; inputs get the CLIP mean/std;
* ``dino:DIR``: a Hugging Face ``ViTModel`` folder (e.g. a saved ``facebook/dino-vitb16``); last-layer patch
  tokens after the final LayerNorm (768-d); inputs get the ImageNet mean/std.

From an imglish file (no extra package):

* ``beit3:FILE``: the vision tower of an imglish ``model.safetensors`` of the retrieval task (a dual encoder
  trained contrastively on image-text pairs: CLIP's objective, in BEiT-3's own architecture); targets are the
  last-layer patch tokens through the model's ``vision_head``, the way BEiT v2 reads CLIP's patch tokens
  through its projection. Inputs get the mean/std of the Processor saved beside the file. A semantic teacher
  where no CLIP is at hand, such as on the synthetic world.

Every teacher maps images (B, 3, H, W) in [0, 1] to features (B, N, out_dim) on the tokenizer's grid of
N = (H / patch) * (W / patch) patches (teacher grids of another size are resized bilinearly).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Teacher", "PixelTeacher", "HOGTeacher", "ConcatTeacher", "HFTeacher", "BEiT3Teacher",
           "build_teacher", "TEACHERS"]

TEACHERS = ("pixels", "hog", "pixels+hog", "clip:DIR", "dino:DIR", "beit3:FILE")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Teacher(nn.Module):
    """Base class: ``forward(images (B, 3, H, W) in [0, 1]) -> (B, N, out_dim)``; frozen, eval-only."""

    out_dim: int
    name: str = "teacher"

    def __init__(self, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size

    def train(self, mode: bool = True) -> "Teacher":  # a teacher never trains
        return super().train(False)

    def _check(self, images: torch.Tensor) -> tuple[int, int]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"teacher expects images (B, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {(h, w)} is not a multiple of the patch size {self.patch_size}")
        return h // self.patch_size, w // self.patch_size


class PixelTeacher(Teacher):
    """Patch colours, pooled to ``cells x cells`` per patch, in [-1, 1]: out_dim = 3 * cells^2."""

    name = "pixels"

    def __init__(self, patch_size: int, cells: int = 4) -> None:
        super().__init__(patch_size)
        if patch_size % cells:
            raise ValueError(f"cells {cells} must divide patch_size {patch_size}")
        self.cells = cells
        self.out_dim = 3 * cells * cells

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        gh, gw = self._check(images)
        x = F.adaptive_avg_pool2d(images.float() * 2.0 - 1.0, (gh * self.cells, gw * self.cells))
        b = x.shape[0]
        x = x.reshape(b, 3, gh, self.cells, gw, self.cells).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, gh * gw, self.out_dim)


class HOGTeacher(Teacher):
    """Histograms of oriented gradients per patch: out_dim = 3 channels * cells^2 * bins, L2-normalised."""

    name = "hog"

    def __init__(self, patch_size: int, cells: int = 2, bins: int = 9) -> None:
        super().__init__(patch_size)
        if patch_size % cells:
            raise ValueError(f"cells {cells} must divide patch_size {patch_size}")
        self.cells, self.bins = cells, bins
        self.out_dim = 3 * cells * cells * bins
        k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        self.register_buffer("kx", k.repeat(3, 1, 1, 1), persistent=False)
        self.register_buffer("ky", k.t().contiguous().repeat(3, 1, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        gh, gw = self._check(images)
        x = F.pad(images.float(), (1, 1, 1, 1), mode="reflect")
        gx = F.conv2d(x, self.kx.to(x), groups=3)
        gy = F.conv2d(x, self.ky.to(x), groups=3)
        mag = torch.sqrt(gx**2 + gy**2)
        angle = torch.remainder(torch.atan2(gy, gx), math.pi)  # unsigned orientation in [0, pi)
        idx = (angle / math.pi * self.bins).long().clamp_(max=self.bins - 1)
        b, c, h, w = mag.shape
        hist = torch.zeros(b, c, self.bins, h, w, device=mag.device, dtype=mag.dtype)
        hist.scatter_(2, idx.unsqueeze(2), mag.unsqueeze(2))
        cell = self.patch_size // self.cells
        hist = F.avg_pool2d(hist.reshape(b, c * self.bins, h, w), cell) * cell * cell
        hist = hist.reshape(b, c, self.bins, gh, self.cells, gw, self.cells).permute(0, 3, 5, 1, 4, 6, 2)
        return F.normalize(hist.reshape(b, gh * gw, self.out_dim), dim=-1)


class ConcatTeacher(Teacher):
    """Several teachers, each L2-normalised per patch, concatenated."""

    def __init__(self, teachers: list[Teacher]) -> None:
        super().__init__(teachers[0].patch_size)
        self.teachers = nn.ModuleList(teachers)
        self.out_dim = sum(t.out_dim for t in teachers)
        self.name = "+".join(t.name for t in teachers)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.normalize(t(images), dim=-1) for t in self.teachers], dim=-1)


def _on_grid(feats: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Patch features (B, side * side, D) of a square teacher grid, resized bilinearly onto a (gh, gw) grid."""
    side = int(math.isqrt(feats.shape[1]))
    if (side, side) == (gh, gw):
        return feats
    grid = feats.transpose(1, 2).reshape(feats.shape[0], -1, side, side)
    grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


class _NetworkTeacher(Teacher):
    """A teacher that runs a network: images resized to its input size and normalised with its mean/std."""

    def _set_input(self, size: int | Sequence[int], mean: Sequence[float], std: Sequence[float]) -> None:
        self.input_size = (int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)
        self.register_buffer("mean", torch.tensor(mean)[None, :, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(std)[None, :, None, None], persistent=False)

    def _prepare(self, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """The network's input and the tokenizer's grid (gh, gw)."""
        gh, gw = self._check(images)
        x = images.float()
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False)
        return (x.clamp(0, 1) - self.mean) / self.std, gh, gw


class HFTeacher(_NetworkTeacher):
    """A CLIP or DINO ViT from a local Hugging Face folder (see the module docstring).

    Args:
        kind: ``"clip"`` or ``"dino"``.
        path: folder with ``config.json`` and weights (``local_files_only``; nothing is downloaded).
        patch_size: the tokenizer's patch size (features are put on the tokenizer's grid).
    """

    def __init__(self, kind: str, path: str | os.PathLike, patch_size: int) -> None:
        super().__init__(patch_size)
        try:
            import transformers
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(f"the {kind} teacher needs the `transformers` package (pip install transformers)") from err
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{kind} teacher folder {path} does not exist (expected a saved Hugging Face model)")
        self.name = kind
        if kind == "clip":
            self.model = transformers.CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)
            self.out_dim = self.model.config.projection_dim
            mean, std = CLIP_MEAN, CLIP_STD
        elif kind == "dino":
            self.model = transformers.ViTModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
            self.out_dim = self.model.config.hidden_size
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:
            raise ValueError(f"unknown teacher kind {kind!r}; expected 'clip' or 'dino'")
        self.model.requires_grad_(False).eval()
        self._set_input(int(self.model.config.image_size), mean, std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, gh, gw = self._prepare(images)
        if self.name == "clip":
            vm = self.model.vision_model
            hidden = vm(pixel_values=x).last_hidden_state[:, 1:]
            feats = self.model.visual_projection(vm.post_layernorm(hidden))
        else:
            feats = self.model(pixel_values=x).last_hidden_state[:, 1:]
        return _on_grid(feats, gh, gw)


class BEiT3Teacher(_NetworkTeacher):
    """The vision tower of an imglish retrieval model (see the module docstring).

    Args:
        path: an imglish ``model.safetensors`` of the retrieval task, its Processor beside it.
        patch_size: the tokenizer's patch size (features are put on the tokenizer's grid).
    """

    name = "beit3"

    def __init__(self, path: str | os.PathLike, patch_size: int) -> None:
        super().__init__(patch_size)
        from imglish.model.loading import read_checkpoint_metadata
        from imglish.registry import create_model
        from imglish.tokenizers.processor import Processor

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"beit3 teacher {str(path)!r} does not exist (expected an imglish model.safetensors)"
            )
        meta = read_checkpoint_metadata(path)
        if meta.get("format") != "imglish/1" or meta.get("task") != "retrieval":
            raise ValueError(
                f"beit3 teacher {str(path)!r} must be an imglish model of the retrieval task (a dual "
                f"encoder), got task {meta.get('task')!r}"
            )
        self.model = create_model(None, path)
        self.model.requires_grad_(False).eval()
        self.out_dim = self.model.config.embed_dim
        proc = Processor.find_for(path)
        mean, std = ((0.5,) * 3, (0.5,) * 3)
        if proc is not None:
            mean, std = proc.transform_config.mean, proc.transform_config.std
        self._set_input(self.model.config.img_size, mean, std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, gh, gw = self._prepare(images)
        hidden = self.model.beit3(x).last_hidden_state[:, 1:]
        feats = self.model.vision_head(hidden)
        return _on_grid(feats, gh, gw)


def build_teacher(spec: str, patch_size: int) -> Teacher:
    """Build a teacher from its name: ``pixels``, ``hog``, ``pixels+hog``, ``clip:DIR``, ``dino:DIR`` or
    ``beit3:FILE``.

    Args:
        spec: the teacher name (see :data:`TEACHERS`).
        patch_size: the tokenizer's patch size.
    """
    if spec.startswith("beit3:"):
        return BEiT3Teacher(spec.partition(":")[2], patch_size)
    if spec.startswith(("clip:", "dino:")):
        kind, _, path = spec.partition(":")
        return HFTeacher(kind, path, patch_size)
    parts = spec.split("+")
    built: list[Teacher] = []
    for part in parts:
        if part == "pixels":
            built.append(PixelTeacher(patch_size, cells=min(4, patch_size)))
        elif part == "hog":
            built.append(HOGTeacher(patch_size, cells=2 if patch_size % 2 == 0 else 1))
        else:
            raise ValueError(f"unknown teacher {spec!r}; expected one of {', '.join(TEACHERS)}")
    return built[0] if len(built) == 1 else ConcatTeacher(built)
