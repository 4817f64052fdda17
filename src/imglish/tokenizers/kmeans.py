"""A semantic visual tokenizer without a downloaded teacher: k-means codes of a small contrastive model's patches.

BEiT-3's visual tokens come from VQ-KD, a ViT encoder whose quantised patches reconstruct the features of a CLIP
teacher. Where no CLIP is at hand (the synthetic world, a new domain), this module builds the same kind of target in
two cheaper steps, both on the image-text pairs of the pretraining corpus and without labels:

1. :class:`ConvCLIP`: a convolutional image tower (stride = the patch size, so one feature per patch) and a small
   text transformer, trained with CLIP's symmetric contrastive loss (:func:`train_conv_clip`). A convolutional
   tower learns what the captions name far faster than a small ViT does;
2. :class:`KMeansTokenizer`: the tower's patch features, standardised, and quantised to the nearest of ``n_code``
   k-means centroids (:func:`fit_kmeans`). Quantising the teacher directly keeps what it sees; a VQ-KD trained to
   reconstruct the same teacher loses most of it at this scale (docs/quickstart.md has the probes).

A :class:`KMeansTokenizer` is a drop-in visual tokenizer for pretraining: ``get_codebook_indices(images)`` maps
images ``(B, 3, H, W)`` in ``[0, 1]`` to codes ``(B, N)``, ``n_code`` is the codebook size, ``config.img_size`` and
``config.num_tokens`` the grid, and :func:`imglish.tokenizers.vqkd_train.precompute_visual_tokens` accepts it.
:func:`train_kmeans_tokenizer` runs both steps and writes ``kmeans.safetensors`` (the tokenizer: tower, statistics,
centroids) and ``conv_clip.safetensors`` (the whole contrastive model); :func:`load_visual_tokenizer` reads a
k-means or a VQ-KD file alike.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvCLIP",
    "ConvCLIPConfig",
    "KMeansTokenizer",
    "KMeansTokenizerConfig",
    "KMeansTrainConfig",
    "KMeansTrainResult",
    "caption_encoder",
    "fit_kmeans",
    "load_conv_clip",
    "load_kmeans_tokenizer",
    "load_visual_tokenizer",
    "save_kmeans_tokenizer",
    "train_conv_clip",
    "train_kmeans_tokenizer",
]

FORMAT = "imglish-kmeans-tokenizer/1"
CLIP_FORMAT = "imglish-conv-clip/1"


# ------------------------------------------------------------------------------------------------ the teacher
@dataclass
class ConvCLIPConfig:
    """Architecture of :class:`ConvCLIP`.

    Attributes:
        img_size: side of the square input images.
        patch_size: stride of the image tower, a power of two: one ``3x3 conv + BatchNorm + ReLU + 2x2 max-pool``
            block per halving, so a ``img_size`` image becomes a ``(img_size / patch_size)^2`` grid of features.
        width: channels of the last block (the patch feature size) and of the joint embedding.
        vocab_size: text vocabulary (the text tokenizer's size).
        text_layers, text_heads: the text transformer (pre-norm, width ``width``).
        max_text_len: longest caption in tokens (longer ones are cut).
    """

    img_size: int = 64
    patch_size: int = 16
    width: int = 128
    vocab_size: int = 256
    text_layers: int = 2
    text_heads: int = 4
    max_text_len: int = 32

    def __post_init__(self) -> None:
        p = self.patch_size
        if p < 2 or p & (p - 1):
            raise ValueError(f"patch_size must be a power of two >= 2, got {p}")
        if self.img_size % p:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {p}")
        for name in ("width", "vocab_size", "text_layers", "text_heads", "max_text_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.text_heads:
            raise ValueError(f"width {self.width} is not divisible by text_heads {self.text_heads}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size


def conv_tower(patch_size: int, width: int) -> nn.Sequential:
    """``log2(patch_size)`` blocks of 3x3 conv, BatchNorm, ReLU and 2x2 max-pool; channels 32, 64, ... up to
    ``width`` (the last block has ``width``)."""
    blocks = int(math.log2(patch_size))
    chans = [min(32 * 2**i, width) for i in range(blocks - 1)] + [width]
    layers: list[nn.Module] = []
    cin = 3
    for cout in chans:
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        cin = cout
    return nn.Sequential(*layers)


def tower_features(tower: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] through a conv tower (inputs normalised with mean and std 0.5) -> ``(B, N, C)``:
    one feature per patch, row-major."""
    return tower((images - 0.5) / 0.5).flatten(2).transpose(1, 2)


class ConvCLIP(nn.Module):
    """A conv image tower and a small text transformer, each projected and L2-normalised: CLIP's shape.

    Images are ``(B, 3, H, W)`` in ``[0, 1]`` (normalised with mean and std 0.5 inside); texts are token ids with
    a boolean ``padding_mask`` (True at padding).
    """

    def __init__(self, config: ConvCLIPConfig) -> None:
        super().__init__()
        self.config = config
        d = config.width
        self.tower = conv_tower(config.patch_size, d)
        self.image_proj = nn.Linear(d, d)
        self.embed = nn.Embedding(config.vocab_size, d)
        self.pos = nn.Parameter(torch.zeros(config.max_text_len, d))
        layer = nn.TransformerEncoderLayer(d, config.text_heads, 4 * d, 0.0, batch_first=True, norm_first=True)
        self.text = nn.TransformerEncoder(layer, config.text_layers, enable_nested_tensor=False)
        self.text_proj = nn.Linear(d, d)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> ``(B, N, width)``: one feature per patch, row-major."""
        return tower_features(self.tower, images)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.patch_features(images).mean(1)), dim=-1)

    def encode_text(self, ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        ids, pad = ids[:, : self.config.max_text_len], padding_mask[:, : self.config.max_text_len].bool()
        h = self.text(self.embed(ids) + self.pos[: ids.shape[1]], src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return F.normalize(self.text_proj((h * keep).sum(1) / keep.sum(1).clamp(min=1.0)), dim=-1)

    def contrastive_loss(self, images: torch.Tensor, ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """CLIP's symmetric cross-entropy over the batch's image-text similarities."""
        scale = self.log_scale.exp().clamp(max=100.0)
        logits = self.encode_image(images) @ self.encode_text(ids, padding_mask).T * scale
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# ------------------------------------------------------------------------------------------------ k-means
def fit_kmeans(points: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with a k-means++ start on the rows of ``points`` (M, D); returns the (k, D) centroids.

    Seeded and deterministic on CPU. A cluster that empties keeps its previous centroid.

    Raises:
        ValueError: if ``points`` is not 2-d or has fewer rows than ``k``.
    """
    if points.ndim != 2:
        raise ValueError(f"points must be (M, D), got shape {tuple(points.shape)}")
    if k < 1 or len(points) < k:
        raise ValueError(f"k-means with k={k} needs at least k points, got {len(points)}")
    x = points.double()
    gen = torch.Generator().manual_seed(seed)
    cent = x[torch.randint(0, len(x), (1,), generator=gen)]
    d2 = torch.cdist(x, cent).squeeze(1).pow(2)
    for _ in range(1, k):
        total = d2.sum()
        probs = d2 / total if total > 0 else torch.full_like(d2, 1.0 / len(d2))
        nxt = x[torch.multinomial(probs, 1, generator=gen)]
        cent = torch.cat([cent, nxt])
        d2 = torch.minimum(d2, torch.cdist(x, nxt).squeeze(1).pow(2))
    for _ in range(iters):
        assign = torch.cdist(x, cent).argmin(1)
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype).unsqueeze(1)
        new = torch.where(counts > 0, sums / counts.clamp(min=1.0), cent)
        if torch.equal(new, cent):
            break
        cent = new
    return cent.to(points.dtype)


# ------------------------------------------------------------------------------------------------ the tokenizer
@dataclass
class KMeansTokenizerConfig:
    """What a :class:`KMeansTokenizer` is: its teacher's architecture and its codebook size."""

    teacher: ConvCLIPConfig = field(default_factory=ConvCLIPConfig)
    n_code: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.teacher, dict):
            self.teacher = ConvCLIPConfig(**self.teacher)
        if self.n_code < 2:
            raise ValueError(f"n_code must be >= 2, got {self.n_code}")

    @property
    def img_size(self) -> int:
        return self.teacher.img_size

    @property
    def patch_size(self) -> int:
        return self.teacher.patch_size

    @property
    def num_tokens(self) -> int:
        return self.teacher.grid_size**2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class KMeansTokenizer(nn.Module):
    """Visual codes: the nearest k-means centroid of each standardised patch feature of a frozen conv tower."""

    def __init__(self, config: KMeansTokenizerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.teacher.width
        self.tower = conv_tower(config.patch_size, d)
        self.register_buffer("feature_mean", torch.zeros(d))
        self.register_buffer("feature_std", torch.ones(d))
        self.register_buffer("centroids", torch.zeros(config.n_code, d))
        self.requires_grad_(False)
        self.eval()

    @property
    def n_code(self) -> int:
        return self.config.n_code

    def train(self, mode: bool = True) -> KMeansTokenizer:  # a tokenizer never trains (BatchNorm stays frozen)
        return super().train(False)

    @classmethod
    def from_teacher(cls, teacher: ConvCLIP, n_code: int) -> KMeansTokenizer:
        tok = cls(KMeansTokenizerConfig(teacher=teacher.config, n_code=n_code))
        tok.tower.load_state_dict(teacher.tower.state_dict())
        return tok

    def _standardised_features(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        s = self.config.img_size
        if tuple(images.shape[-2:]) != (s, s):
            raise ValueError(f"this k-means tokenizer codes {s}x{s} images, got {images.shape[-2]}x{images.shape[-1]}")
        return (tower_features(self.tower, images.float()) - self.feature_mean) / self.feature_std

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, img_size, img_size)`` in [0, 1] -> ``(B, N)`` code ids (int64), row-major over the grid."""
        z = self._standardised_features(images)
        b, n, d = z.shape
        return torch.cdist(z.reshape(b * n, d), self.centroids).argmin(1).reshape(b, n)

    def get_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.get_codebook_indices(images)


# ------------------------------------------------------------------------------------------------ files
def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a tokenizer is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"visual tokenizer file {str(path)!r} does not exist")
    with safe_open(str(path), "pt") as fh:
        meta = dict(fh.metadata() or {})
    return load_file(str(path)), meta


def save_kmeans_tokenizer(tokenizer: KMeansTokenizer, path: str | os.PathLike) -> Path:
    """Write ``tokenizer`` as one safetensors file (tensors and its config in the metadata), atomically."""
    meta = {"format": FORMAT, "config": json.dumps(tokenizer.config.to_dict()), "n_code": str(tokenizer.n_code),
            "img_size": str(tokenizer.config.img_size)}
    return _atomic_save(tokenizer.state_dict(), meta, Path(path))


def load_kmeans_tokenizer(path: str | os.PathLike) -> KMeansTokenizer:
    """Read a file written by :func:`save_kmeans_tokenizer`.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if it is not a k-means tokenizer file.
    """
    tensors, meta = _read(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a k-means tokenizer file (metadata format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    tok = KMeansTokenizer(KMeansTokenizerConfig(**json.loads(meta["config"])))
    tok.load_state_dict(tensors, strict=True)
    return tok


def load_visual_tokenizer(path: str | os.PathLike) -> nn.Module:
    """A k-means tokenizer file or any VQ-KD file :func:`imglish.tokenizers.vqkd.load_vqkd` reads, by content."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"visual tokenizer file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            if (fh.metadata() or {}).get("format") == FORMAT:
                return load_kmeans_tokenizer(path)
    from imglish.tokenizers.vqkd import load_vqkd

    return load_vqkd(path)[0]


def _save_conv_clip(model: ConvCLIP, path: Path) -> Path:
    return _atomic_save(model.state_dict(), {"format": CLIP_FORMAT, "config": json.dumps(asdict(model.config))},
                        path)


def load_conv_clip(path: str | os.PathLike) -> ConvCLIP:
    """Read the ``conv_clip.safetensors`` that :func:`train_kmeans_tokenizer` writes."""
    tensors, meta = _read(path)
    if meta.get("format") != CLIP_FORMAT:
        raise ValueError(f"{str(path)!r} is not a conv CLIP file (metadata format {meta.get('format')!r})")
    model = ConvCLIP(ConvCLIPConfig(**json.loads(meta["config"])))
    model.load_state_dict(tensors, strict=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------ training
@dataclass
class KMeansTrainConfig:
    """How :func:`train_kmeans_tokenizer` builds a tokenizer.

    Attributes:
        out: folder for ``kmeans.safetensors`` and ``conv_clip.safetensors``.
        img_size, patch_size, width: the teacher (:class:`ConvCLIPConfig`).
        n_code: codebook size.
        steps, batch_size, lr, weight_decay, warmup_fraction: the contrastive training (AdamW, one-cycle
            schedule: linear warm-up over ``warmup_fraction`` of the steps, then cosine to zero).
        kmeans_images: distinct images whose patches k-means is fitted on (all when fewer).
        kmeans_iters: Lloyd iterations.
        precision: ``fp32`` or ``bf16`` (autocast for the contrastive training; the k-means features and the
            tokenizer itself stay float32). bf16 is 1.5-2x faster where the CPU has native bf16 kernels
            (AVX-512 BF16, AMX) and slower where it has not (AVX2).
        seed: every random choice (initialisation, batches, captions, k-means).
        device: where the conv CLIP trains (None: cuda when available, else the CPU).
        progress: a progress bar.
    """

    out: str
    img_size: int = 64
    patch_size: int = 16
    width: int = 128
    n_code: int = 256
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    kmeans_images: int = 2000
    kmeans_iters: int = 30
    precision: str = "fp32"
    seed: int = 0
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("n_code", "steps", "batch_size", "kmeans_images", "kmeans_iters"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (a contrastive batch needs negatives), got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")


@dataclass
class KMeansTrainResult:
    tokenizer_path: str
    teacher_path: str
    steps: int
    losses: list[float]
    codes_used: int
    skipped: int
    elapsed_s: float


def _field(record: Any, *names: str) -> Any:
    if isinstance(record, tuple):
        return record[0] if names[0] == "image" else record[1]
    for n in names:
        if isinstance(record, dict) and n in record:
            return record[n]
        if hasattr(record, n):
            return getattr(record, n)
    raise KeyError(f"pair record has none of the fields {names}")


def _image_key(record: Any) -> Any:
    """What identifies a record's image (a corpus with one record per caption repeats it), or None."""
    for n in ("image_index", "image_path", "image_id"):
        if isinstance(record, dict) and n in record:
            return record[n]
        if not isinstance(record, (dict, tuple)) and hasattr(record, n):
            return getattr(record, n)
    return None


def caption_encoder(tokenizer: Any, max_len: int = 32) -> Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]:
    """``captions -> (ids, padding_mask)`` (B, max_len) from an :class:`imglish.tokenizers.TextTokenizer`."""

    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = tokenizer(texts, max_length=max_len, padding="max_length", return_tensors="pt")
        return out["input_ids"], out["padding_mask"].bool()

    return encode


class _PairReader:
    """Reads pair records as ``[0, 1]`` tensors of the teacher's size and caption strings; bad ones are counted."""

    def __init__(self, pairs: Sequence[Any], img_size: int) -> None:
        from imglish.tokenizers.vqkd_train import _eval_transform

        self.pairs, self.transform, self.skipped = pairs, _eval_transform(img_size), 0

    def read(self, i: int) -> tuple[torch.Tensor, str, Any] | None:
        """``(image, caption, key of the image or None)``, or None for a bad record."""
        from imglish.data.skip import SkippedRecord

        rec = self.pairs[i]
        if rec is None or isinstance(rec, SkippedRecord):
            self.skipped += 1
            return None
        img, text, key = _field(rec, "image"), _field(rec, "text", "caption"), _image_key(rec)
        if isinstance(img, SkippedRecord) or img is None or not isinstance(text, str) or not text.strip():
            self.skipped += 1
            return None
        if isinstance(img, (str, os.PathLike)):
            from imglish.tokenizers.image import ImageLoadError, load_image

            try:
                img = load_image(img)
            except ImageLoadError:
                self.skipped += 1
                return None
        x = img if isinstance(img, torch.Tensor) else self.transform(img.convert("RGB"))
        return x, text, key


def train_conv_clip(
    pairs: Sequence[Any],
    encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]],
    model_config: ConvCLIPConfig,
    config: KMeansTrainConfig,
    reader: _PairReader | None = None,
) -> tuple[ConvCLIP, list[float]]:
    """Train a :class:`ConvCLIP` contrastively on ``pairs`` (records of an image and a caption).

    ``encode(captions)`` returns ``(ids, padding_mask)`` of shape (B, L). Batches are drawn without replacement
    within a batch, seeded by ``config.seed``; a batch whose records are unreadable is filled from further draws.
    Returns the model (in eval mode) and the loss of every step.
    """
    from tqdm.auto import tqdm

    if len(pairs) < 2:
        raise ValueError(f"contrastive training needs at least 2 image-text pairs, got {len(pairs)}")
    reader = reader or _PairReader(pairs, model_config.img_size)
    dev = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)
    model = ConvCLIP(model_config).to(dev, memory_format=torch.channels_last)  # oneDNN's convolutions prefer NHWC
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n != "pos"]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and n != "pos")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=config.lr)
    warm = max(int(config.warmup_fraction * config.steps), 1)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(config.steps - warm, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(config.seed)
    batch = min(config.batch_size, len(pairs))
    losses: list[float] = []
    model.train()
    for _ in tqdm(range(config.steps), disable=not config.progress, desc="conv CLIP"):
        images, texts, keys = [], [], set()
        for i in torch.randperm(len(pairs), generator=gen).tolist():
            item = reader.read(i)
            if item is None:
                continue
            # two captions of one image in a batch would be false negatives: one caption per image where known
            if item[2] is not None and item[2] in keys:
                continue
            keys.add(item[2])
            images.append(item[0])
            texts.append(item[1])
            if len(images) == batch:
                break
        if len(images) < 2:
            raise ValueError("fewer than 2 readable image-text pairs: nothing to train the conv CLIP on")
        ids, pad = encode(texts)
        x = torch.stack(images).to(dev).contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, torch.bfloat16, enabled=config.precision == "bf16"):
            loss = model.contrastive_loss(x, ids.to(dev), pad.to(dev))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"conv CLIP loss became {loss.item()} at step {len(losses) + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return model.cpu().eval(), losses


@torch.no_grad()
def _patch_features(model: ConvCLIP, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([model.patch_features(images[i:i + batch]) for i in range(0, len(images), batch)])


def train_kmeans_tokenizer(
    pairs: Sequence[Any],
    encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]],
    vocab_size: int,
    config: KMeansTrainConfig,
) -> KMeansTrainResult:
    """Train the conv CLIP on ``pairs``, fit k-means to its patch features, and write both files into
    ``config.out`` (``kmeans.safetensors``, ``conv_clip.safetensors``).

    Args:
        pairs: image-caption records (``(image, caption)`` tuples, or records with ``image`` and ``text`` such as
            :class:`imglish.data.KarpathyCaptions`'); images are PIL images, paths or ``[0, 1]`` tensors.
        encode: ``captions -> (ids, padding_mask)``, e.g. from :class:`imglish.tokenizers.TextTokenizer`.
        vocab_size: the size of the ids' vocabulary.
        config: see :class:`KMeansTrainConfig`.
    """
    t0 = time.perf_counter()
    model_cfg = ConvCLIPConfig(img_size=config.img_size, patch_size=config.patch_size, width=config.width,
                               vocab_size=vocab_size)
    most = len(pairs) * model_cfg.grid_size**2
    if most < config.n_code:  # named before the teacher is trained, when it cannot be met at all
        raise ValueError(f"at most {most} patches from {len(pairs)} pairs are fewer than the {config.n_code} codes "
                         "asked for: lower n_code or give more pairs")
    reader = _PairReader(pairs, config.img_size)
    model, losses = train_conv_clip(pairs, encode, model_cfg, config, reader)
    out = Path(config.out)
    teacher_path = _save_conv_clip(model, out / "conv_clip.safetensors")
    # k-means on the patches of distinct images (one record per caption repeats each image)
    gen = torch.Generator().manual_seed(config.seed + 1)
    seen: set[Any] = set()
    images: list[torch.Tensor] = []
    for i in torch.randperm(len(pairs), generator=gen).tolist():
        item = reader.read(i)
        if item is None or (item[2] is not None and item[2] in seen):
            continue
        seen.add(item[2])
        images.append(item[0])
        if len(images) == config.kmeans_images:
            break
    feats = _patch_features(model, torch.stack(images))
    flat = feats.reshape(-1, feats.shape[-1])
    if len(flat) < config.n_code:
        raise ValueError(f"{len(flat)} patches from {len(images)} images are fewer than the {config.n_code} codes "
                         "asked for: lower n_code or give more pairs")
    mean, std = flat.mean(0), flat.std(0) + 1e-6
    z = (flat - mean) / std
    tok = KMeansTokenizer.from_teacher(model, config.n_code)
    tok.feature_mean.copy_(mean)
    tok.feature_std.copy_(std)
    tok.centroids.copy_(fit_kmeans(z, config.n_code, config.kmeans_iters, config.seed))
    used = int(torch.cdist(z, tok.centroids).argmin(1).unique().numel())  # over the patches k-means was fitted on
    path = save_kmeans_tokenizer(tok, out / "kmeans.safetensors")
    return KMeansTrainResult(str(path), str(teacher_path), len(losses), losses, used, reader.skipped,
                             time.perf_counter() - t0)
