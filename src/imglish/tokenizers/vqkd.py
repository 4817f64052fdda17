"""VQ-KD: the vector-quantised knowledge-distillation visual tokenizer of BEiT v2 (spec §9.3).

Paper: "BEiT v2: Masked Image Modeling with Vector-Quantized Visual Tokenizers", Peng et al. 2022,
arXiv:2208.06366. Official code: ``microsoft/unilm`` ``beit2/modeling_vqkd.py`` and ``norm_ema_quantizer.py``.
This is an independent implementation with the same parameter names, so the released
``vqkd_encoder_base_decoder_{1,3}x768x12_clip`` tokenizer files load strictly into it.

How it works:

1. Images in [0, 1] are mapped to [-1, 1] (``process_type="default"``) or ImageNet-normalised
   (``"imagenet_norm"``).
2. A ViT encoder (q/v-bias attention, LayerNorm eps 1e-6, absolute positions, patch tokens through ``fc_norm``)
   gives one feature per patch; ``encode_task_layer`` (Linear, Tanh, Linear) projects it to ``code_dim``, in fp32.
3. :class:`NormEMAQuantizer` L2-normalises it and snaps it to the nearest of ``n_code`` unit-norm codebook
   vectors. The codebook is not learned by gradients: it starts from spherical k-means on the first training batch
   and then follows an EMA of the (normalised) mean of the vectors assigned to each code.
4. A second ViT (patch 1 over the ``code_dim`` x h x w code map) and ``decode_task_layer`` reconstruct the features
   of a teacher (CLIP, DINO, or a built-in one from :mod:`imglish.tokenizers.teachers`); the loss is
   ``mean(1 - cos(reconstruction, target)) + MSE(sg(z_q), z)``.

Differences from the official module that change no outputs: the codebook tensors are buffers rather than
frozen parameters (same state-dict keys); evaluation-mode calls do not update the usage statistics or run
k-means (the official quantizer updates ``quantize.cluster_size`` in eval mode too); the teacher is not a
submodule, so tokenizer state dicts never contain ``teacher.*``/``scaling_layer.*`` keys.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VQKDConfig",
    "VQKD",
    "VQKDOutput",
    "NormEMAQuantizer",
    "NormEMACodebook",
    "VQKDVisionTransformer",
    "KeyReport",
    "VQKD_PRESETS",
    "list_vqkd_models",
    "create_vqkd",
    "filter_official_state_dict",
    "read_state_dict",
    "load_vqkd",
    "save_vqkd",
    "spherical_kmeans",
    "train_visual_tokenizer",
]


# ----------------------------------------------------------------------------------------------- config
@dataclass
class VQKDConfig:
    """Architecture of a VQ-KD tokenizer.

    Attributes:
        img_size: input side in pixels (224 for the released tokenizers).
        patch_size: encoder patch size; the token grid is ``img_size // patch_size`` squared.
        in_chans: image channels.
        embed_dim: encoder width.
        depth: encoder blocks.
        num_heads: encoder attention heads.
        mlp_ratio: MLP hidden size / width.
        qkv_bias: q and v biases (k has none), as in BEiT.
        layernorm_eps: LayerNorm epsilon (1e-6).
        use_mean_pooling: patch tokens go through ``fc_norm`` (True, released) or through ``norm`` (False).
        decoder_embed_dim: decoder width (None: ``embed_dim``).
        decoder_depth: decoder blocks (1 or 3 in the released tokenizers).
        decoder_num_heads: decoder heads (None: ``num_heads``).
        n_code: codebook size (8192).
        code_dim: codebook vector size (32).
        decoder_out_dim: teacher feature size (512 CLIP, 768 DINO).
        decay: EMA decay of the codebook and of the usage statistics.
        eps: smoothing constant of the EMA codebook.
        beta: weight of the commitment loss.
        kmeans_init: start the codebook from spherical k-means on the first training batch.
        process_type: input scaling, ``"default"`` ([0, 1] to [-1, 1]) or ``"imagenet_norm"``.
        drop_path_rate: stochastic depth in the encoder and decoder (0 in the official recipe).
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layernorm_eps: float = 1e-6
    use_mean_pooling: bool = True
    decoder_embed_dim: int | None = None
    decoder_depth: int = 3
    decoder_num_heads: int | None = None
    n_code: int = 8192
    code_dim: int = 32
    decoder_out_dim: int = 512
    decay: float = 0.99
    eps: float = 1e-5
    beta: float = 1.0
    kmeans_init: bool = True
    process_type: str = "default"
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        if self.dec_dim % self.dec_heads:
            raise ValueError(f"decoder_embed_dim {self.dec_dim} must be divisible by decoder_num_heads {self.dec_heads}")
        if self.process_type not in ("default", "imagenet_norm"):
            raise ValueError(f"process_type must be 'default' or 'imagenet_norm', got {self.process_type!r}")
        if self.n_code < 1 or self.code_dim < 1:
            raise ValueError(f"n_code and code_dim must be positive, got {self.n_code}, {self.code_dim}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")

    @property
    def dec_dim(self) -> int:
        return self.decoder_embed_dim or self.embed_dim

    @property
    def dec_heads(self) -> int:
        return self.decoder_num_heads or self.num_heads

    @property
    def grid_size(self) -> int:
        """Tokens per side: ``img_size // patch_size``."""
        return self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens per image."""
        return self.grid_size**2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, strict: bool = True) -> "VQKDConfig":
        """Build from a dict; unknown keys raise unless ``strict`` is False (then they are ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown and strict:
            raise ValueError(f"unknown VQKDConfig keys: {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})


def _base_clip(decoder_depth: int, decoder_out_dim: int = 512, **kw: Any) -> VQKDConfig:
    return VQKDConfig(decoder_depth=decoder_depth, decoder_out_dim=decoder_out_dim, **kw)


#: Named architectures: the released BEiT v2 tokenizers and small ones for CPU work.
VQKD_PRESETS: dict[str, VQKDConfig] = {
    "vqkd_encoder_base_decoder_1x768x12_clip": _base_clip(1),
    "vqkd_encoder_base_decoder_3x768x12_clip": _base_clip(3),
    "vqkd_encoder_base_decoder_1x768x12_dino": _base_clip(1, 768),
    # A tokenizer small enough to train on a CPU in a minute or two (64x64 images, 8x8 grid).
    "vqkd_tiny_patch8_64": VQKDConfig(
        img_size=64, patch_size=8, embed_dim=96, depth=2, num_heads=4, decoder_depth=1, n_code=128, code_dim=16,
        decoder_out_dim=192,
    ),
}


def list_vqkd_models() -> list[str]:
    """Names accepted by :func:`create_vqkd`."""
    return sorted(VQKD_PRESETS)


def create_vqkd(name: str | VQKDConfig, **overrides: Any) -> "VQKD":
    """Build a VQ-KD tokenizer from a preset name (or a config), with field overrides (``None`` ignored)."""
    if isinstance(name, VQKDConfig):
        base = name
    else:
        if name not in VQKD_PRESETS:
            import difflib

            close = difflib.get_close_matches(name, VQKD_PRESETS, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(list_vqkd_models())}"
            raise ValueError(f"unknown VQ-KD model {name!r}{hint}")
        base = VQKD_PRESETS[name]
    cfg = VQKDConfig(**{**asdict(base), **{k: v for k, v in overrides.items() if v is not None}})
    return VQKD(cfg)


# ------------------------------------------------------------------------------------------ ViT blocks
class _Attention(nn.Module):
    """Multi-head self-attention with q and v biases only (BEiT style)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, D)."""
        b, n, d = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, eps: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def _dp(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_path == 0.0:
            return x
        keep = 1.0 - self.drop_path
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._dp(self.attn(self.norm1(x)))
        return x + self._dp(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VQKDVisionTransformer(nn.Module):
    """The ViT used for both the VQ-KD encoder and decoder; returns normalised patch tokens.

    Args:
        img_size: input side (pixels for the encoder, code-map cells for the decoder).
        patch_size: patch side.
        in_chans: input channels (3, or ``code_dim`` for the decoder).
        dim, depth, num_heads, mlp_ratio, qkv_bias, eps: transformer shape.
        use_mean_pooling: final LayerNorm named ``fc_norm`` (True) or ``norm`` (False), as in BEiT.
        drop_path_rate: maximum stochastic depth (linear over blocks).
    """

    def __init__(
        self, img_size: int, patch_size: int, in_chans: int, dim: int, depth: int, num_heads: int,
        mlp_ratio: float, qkv_bias: bool, eps: float, use_mean_pooling: bool = True, drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.patch_embed = _PatchEmbed(patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2 + 1, dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            _Block(dim, num_heads, mlp_ratio, qkv_bias, eps, rates[i]) for i in range(depth)
        )
        self.use_mean_pooling = use_mean_pooling
        if use_mean_pooling:
            self.fc_norm = nn.LayerNorm(dim, eps=eps)
        else:
            self.norm = nn.LayerNorm(dim, eps=eps)

    def init_weights(self) -> None:
        """BEiT initialisation: truncated normal 0.02, zero biases, output projections scaled by depth."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.02, b=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02, a=-0.02, b=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.02, b=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for i, blk in enumerate(self.blocks):
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (i + 1)))

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        if h * w + 1 == self.pos_embed.shape[1] and h == w:
            return self.pos_embed
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        g = int(math.isqrt(grid.shape[1]))
        grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat((cls, grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> patch tokens (B, N, D) after the final LayerNorm (CLS dropped)."""
        if x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not a multiple of the patch size {self.patch_size}")
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self._pos_embed(h, w)
        for blk in self.blocks:
            x = blk(x)
        patches = x[:, 1:]
        return self.fc_norm(patches) if self.use_mean_pooling else self.norm(patches)


# -------------------------------------------------------------------------------------------- quantizer
def _l2norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, p=2, dim=-1)


_COLLECTIVES = contextvars.ContextVar("imglish_vqkd_collectives", default=True)


@contextlib.contextmanager
def local_training() -> Iterator[None]:
    """Inside this block the quantizer enters no collective even when a process group exists: for a tokenizer
    trained by one rank alone (``imglish pretrain`` under torchrun trains it on rank 0 while the others wait)."""
    token = _COLLECTIVES.set(False)
    try:
        yield
    finally:
        _COLLECTIVES.reset(token)


def _distributed() -> bool:
    return _COLLECTIVES.get() and dist.is_available() and dist.is_initialized()


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


def spherical_kmeans(
    samples: torch.Tensor, num_clusters: int, num_iters: int = 10, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical (cosine) k-means, used to initialise the codebook.

    Args:
        samples: (M, C) unit vectors.
        num_clusters: K.
        num_iters: Lloyd iterations (10, as in BEiT v2).
        generator: RNG for the initial centres (drawn without repeats when M >= K).

    Returns:
        ``(centres (K, C) unit vectors, counts (K,) long)``; an empty cluster keeps its previous centre.
    """
    m, _ = samples.shape
    device = samples.device
    if m >= num_clusters:
        idx = torch.randperm(m, generator=generator, device="cpu")[:num_clusters].to(device)
    else:
        idx = torch.randint(0, m, (num_clusters,), generator=generator, device="cpu").to(device)
    means = samples[idx]
    bins = torch.zeros(num_clusters, dtype=torch.long, device=device)
    for _ in range(num_iters):
        buckets = (samples @ means.t()).argmax(dim=-1)
        bins = torch.bincount(buckets, minlength=num_clusters)
        sums = torch.zeros_like(means).index_add_(0, buckets, samples)
        new = _l2norm(sums / bins.clamp(min=1)[:, None].to(samples.dtype))
        means = torch.where((bins == 0)[:, None], means, new)
    return means, bins


class NormEMACodebook(nn.Module):
    """The codebook tensors (state-dict names as the official ``EmbeddingEMA``).

    Buffers: ``weight`` (K, C) unit vectors; ``cluster_size`` (K,) (k-means counts); ``embed_avg`` (K, C)
    (kept for checkpoint compatibility); ``initted`` (1,) 1.0 once initialised.
    """

    def __init__(self, n_code: int, code_dim: int, kmeans_init: bool) -> None:
        super().__init__()
        weight = torch.zeros(n_code, code_dim) if kmeans_init else _l2norm(torch.randn(n_code, code_dim))
        self.register_buffer("weight", weight)
        self.register_buffer("cluster_size", torch.zeros(n_code))
        self.register_buffer("embed_avg", weight.clone())
        self.register_buffer("initted", torch.tensor([0.0 if kmeans_init else 1.0]))

    @property
    def is_initialised(self) -> bool:
        return bool(self.initted.item() > 0)


class NormEMAQuantizer(nn.Module):
    """L2-normalised vector quantiser with an EMA codebook (``NormEMAVectorQuantizer`` of BEiT v2).

    Args:
        n_code: K codes.
        code_dim: C, size of each code.
        beta: weight of the commitment loss ``MSE(sg(z_q), z)``.
        decay: EMA decay (0.99).
        kmeans_init: initialise with spherical k-means on the first training batch.

    The buffer ``cluster_size`` (K,) is an EMA of how many vectors each code received per training batch.
    """

    def __init__(self, n_code: int, code_dim: int, beta: float = 1.0, decay: float = 0.99, kmeans_init: bool = True):
        super().__init__()
        self.n_code, self.code_dim, self.beta, self.decay = n_code, code_dim, beta, decay
        self.embedding = NormEMACodebook(n_code, code_dim, kmeans_init)
        self.register_buffer("cluster_size", torch.zeros(n_code))
        self.update = True
        self.last_z: torch.Tensor | None = None  # the last training batch's unit vectors (M, C), for restarts

    @torch.no_grad()
    def restart_codes(self, dead: torch.Tensor, samples: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """Move unused codes onto randomly chosen recent encoder vectors (not in the official code).

        Dead codes never receive an EMA update, so they stay unused forever; restarting them is the usual remedy
        for codebook collapse on small or repetitive data.

        Args:
            dead: (K,) bool, codes to restart.
            samples: (M, C) unit vectors to draw from (e.g. :attr:`last_z`).
            generator: RNG for the draw.

        Returns:
            Number of codes restarted.
        """
        n = int(dead.sum())
        if n == 0 or samples.numel() == 0:
            return 0
        pick = torch.randint(0, samples.shape[0], (n,), generator=generator, device="cpu").to(samples.device)
        new = samples[pick].to(self.embedding.weight.dtype)
        if _distributed():
            dist.broadcast(new, 0)
        self.embedding.weight[dead.to(self.embedding.weight.device)] = _l2norm(new)
        return n

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code of each unit vector: (M, C) -> (M,) long (argmin of the squared distance)."""
        w = self.embedding.weight
        d = z.pow(2).sum(dim=1, keepdim=True) + w.pow(2).sum(dim=1) - 2.0 * (z @ w.t())
        return d.argmin(dim=1)

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        bins = _all_reduce(torch.bincount(idx, minlength=self.n_code).to(z.dtype))
        self.cluster_size.mul_(self.decay).add_(bins, alpha=1.0 - self.decay)
        empty = bins == 0
        sums = _all_reduce(torch.zeros(self.n_code, self.code_dim, dtype=z.dtype, device=z.device).index_add_(0, idx, z))
        new = _l2norm(sums / bins.masked_fill(empty, 1.0)[:, None])
        w = self.embedding.weight
        new = torch.where(empty[:, None], w, new)
        w.mul_(self.decay).add_(new, alpha=1.0 - self.decay)
        w.copy_(_l2norm(w))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise a feature map.

        Args:
            z: (B, C, h, w) features (not yet normalised).

        Returns:
            ``(z_q (B, C, h, w) with straight-through gradients, commitment loss (), indices (B*h*w,) long)``.
        """
        z = _l2norm(z.permute(0, 2, 3, 1))
        flat = z.reshape(-1, self.code_dim)
        if self.training and not self.embedding.is_initialised:
            with torch.no_grad():
                means, counts = spherical_kmeans(flat.detach(), self.n_code)
                means = means.contiguous()
                if _distributed():
                    dist.broadcast(means, 0)
                self.embedding.weight.copy_(means)
                self.embedding.cluster_size.copy_(counts.to(means.dtype))
                self.embedding.initted.fill_(1.0)
        idx = self.lookup(flat)
        z_q = F.embedding(idx, self.embedding.weight).view(z.shape)
        if self.training and self.update:
            self._ema_update(flat.detach(), idx)
            self.last_z = flat.detach()
        loss = self.beta * F.mse_loss(z_q.detach(), z)
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2), loss, idx


# ------------------------------------------------------------------------------------------------ model
@dataclass
class VQKDOutput:
    """Result of :meth:`VQKD.forward`.

    Attributes:
        loss: total loss ``rec_loss + quant_loss`` (scalar).
        rec_loss: ``mean(1 - cos(reconstruction, target))`` (scalar).
        quant_loss: commitment loss (scalar).
        indices: (B, N) long code ids.
        reconstruction: (B, N, decoder_out_dim) decoder output.
    """

    loss: torch.Tensor
    rec_loss: torch.Tensor
    quant_loss: torch.Tensor
    indices: torch.Tensor
    reconstruction: torch.Tensor


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def cosine_rec_loss(rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean(1 - cos(rec, target))`` over all patches; (B, N, C) x2 -> scalar. Zero vectors count as cos 0."""
    return (1.0 - (_l2norm(rec.float()) * _l2norm(target.float())).sum(-1)).mean()


class VQKD(nn.Module):
    """The VQ-KD visual tokenizer (encoder, quantiser, decoder); see the module docstring.

    Args:
        config: the architecture.
    """

    def __init__(self, config: VQKDConfig) -> None:
        super().__init__()
        self.config = c = config
        self.encoder = VQKDVisionTransformer(
            c.img_size, c.patch_size, c.in_chans, c.embed_dim, c.depth, c.num_heads, c.mlp_ratio, c.qkv_bias,
            c.layernorm_eps, c.use_mean_pooling, c.drop_path_rate,
        )
        self.decoder = VQKDVisionTransformer(
            c.grid_size, 1, c.code_dim, c.dec_dim, c.decoder_depth, c.dec_heads, c.mlp_ratio, c.qkv_bias,
            c.layernorm_eps, c.use_mean_pooling, c.drop_path_rate,
        )
        self.quantize = NormEMAQuantizer(c.n_code, c.code_dim, c.beta, c.decay, c.kmeans_init)
        self.encode_task_layer = nn.Sequential(
            nn.Linear(c.embed_dim, c.embed_dim), nn.Tanh(), nn.Linear(c.embed_dim, c.code_dim)
        )
        self.decode_task_layer = nn.Sequential(
            nn.Linear(c.dec_dim, c.dec_dim), nn.Tanh(), nn.Linear(c.dec_dim, c.decoder_out_dim)
        )
        self.init_weights()

    def init_weights(self) -> None:
        """Fresh random weights (BEiT initialisation); leaves the codebook alone."""
        self.encoder.init_weights()
        self.decoder.init_weights()
        for m in (*self.encode_task_layer, *self.decode_task_layer):
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.02, b=0.02)
                nn.init.zeros_(m.bias)

    @property
    def n_code(self) -> int:
        return self.config.n_code

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay (as the official module)."""
        return {"encoder.cls_token", "encoder.pos_embed", "decoder.cls_token", "decoder.pos_embed"}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1] (float) or uint8 to the encoder's input scale.

        Args:
            images: (B, 3, H, W).

        Returns:
            (B, 3, H, W) float: ``2x - 1`` for ``process_type="default"``, ImageNet-normalised otherwise.
        """
        if images.dim() != 4 or images.shape[1] != self.config.in_chans:
            raise ValueError(
                f"images must be (B, {self.config.in_chans}, H, W), got shape {tuple(images.shape)}"
            )
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        elif not images.is_floating_point():
            raise TypeError(f"images must be float in [0, 1] or uint8, got {images.dtype}")
        dev = self.encoder.cls_token.device
        images = images.to(dev, self.encoder.cls_token.dtype)
        if self.config.process_type == "default":
            return images * 255.0 / 127.5 - 1.0
        mean = torch.tensor(_IMAGENET_MEAN, device=dev, dtype=images.dtype)[None, :, None, None]
        std = torch.tensor(_IMAGENET_STD, device=dev, dtype=images.dtype)[None, :, None, None]
        return (images - mean) / std

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Preprocessed images -> ``(quantize (B, code_dim, h, w), indices (B, N) long, commitment loss)``."""
        feats = self.encoder(x)
        last = self.encode_task_layer[-1].weight
        with torch.autocast(device_type=feats.device.type, enabled=False):
            z = self.encode_task_layer(feats.to(last.dtype))
        b, n, _ = z.shape
        h = w = int(math.isqrt(n))
        if h * w != n:
            raise ValueError(f"the token grid must be square, got {n} tokens")
        z = z.transpose(1, 2).reshape(b, -1, h, w)
        quant, loss, idx = self.quantize(z)
        return quant, idx.view(b, n), loss

    def decode(self, quantize: torch.Tensor) -> torch.Tensor:
        """Code map (B, code_dim, h, w) -> reconstructed teacher features (B, N, decoder_out_dim)."""
        return self.decode_task_layer(self.decoder(quantize))

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Visual tokens of images.

        Args:
            images: (B, 3, H, W) float in [0, 1] (or uint8).

        Returns:
            (B, N) long code ids in ``[0, n_code)``, N = (H / patch) * (W / patch), row-major.
        """
        was_training = self.training
        self.eval()
        try:
            _, idx, _ = self.encode(self.preprocess(images))
        finally:
            self.train(was_training)
        return idx

    def get_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`get_codebook_indices`."""
        return self.get_codebook_indices(images)

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> VQKDOutput:
        """Training forward.

        Args:
            images: (B, 3, H, W) in [0, 1].
            target: (B, N, decoder_out_dim) teacher features for the same N patches.

        Returns:
            A :class:`VQKDOutput`.
        """
        quant, idx, qloss = self.encode(self.preprocess(images))
        rec = self.decode(quant)
        if target.shape != rec.shape:
            raise ValueError(f"teacher target has shape {tuple(target.shape)}, expected {tuple(rec.shape)}")
        rloss = cosine_rec_loss(rec, target)
        return VQKDOutput(rloss + qloss, rloss, qloss, idx, rec)


# --------------------------------------------------------------------------------------------- loading
@dataclass
class KeyReport:
    """What a strict load found: missing, unexpected and mis-shaped keys, and what was dropped on purpose."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = ["all keys matched" if self.ok else "state dict does not match the model:"]

        def block(title: str, items: list[Any]) -> None:
            if items:
                shown = [str(i) for i in items[:20]]
                more = f" ... and {len(items) - 20} more" if len(items) > 20 else ""
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown) + more)

        block("missing", self.missing)
        block("unexpected", self.unexpected)
        block("shape mismatch (key, checkpoint, model)", self.mismatched)
        block("dropped (teacher/scaling/loss)", self.dropped)
        return "\n".join(lines)


_DROP_PREFIXES = ("teacher", "scaling", "loss")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a tokenizer file: safetensors, or a torch file loaded with ``weights_only=True``.

    Official checkpoints may wrap the weights in ``{"model": ...}`` or ``{"state_dict": ...}`` and may carry an
    ``argparse.Namespace`` of training arguments; both are handled without unpickling arbitrary objects.
    """
    return _read(path)[0]


def _read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from imglish.model.loading import read_checkpoint

    return read_checkpoint(path, model_key="model|state_dict")


def filter_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop the training-only keys (``teacher*``, ``scaling*``, ``loss*``) and prefixes ``module.``/``_orig_mod.``.

    Returns:
        ``(state_dict, dropped_keys)``.
    """
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for k, v in state_dict.items():
        for pre in ("module.", "_orig_mod."):
            if k.startswith(pre):
                k = k[len(pre):]
        if k.startswith(_DROP_PREFIXES):
            dropped.append(k)
            continue
        out[k] = v
    return out, dropped


def _load_into(model: VQKD, state_dict: Mapping[str, torch.Tensor], strict: bool) -> KeyReport:
    sd, dropped = filter_official_state_dict(state_dict)
    own = model.state_dict()
    report = KeyReport(dropped=dropped)
    report.missing = [k for k in own if k not in sd]
    report.unexpected = [k for k in sd if k not in own]
    report.mismatched = [
        (k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own if k in sd and sd[k].shape != own[k].shape
    ]
    if strict and not report.ok:
        raise ValueError(str(report))
    usable = {k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(usable, strict=False)
    return report


def load_vqkd(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    config: VQKDConfig | str | None = None,
    *,
    strict: bool = True,
) -> tuple[VQKD, KeyReport]:
    """Load a VQ-KD tokenizer from an official BEiT v2 file, an imglish file, or a state dict.

    Args:
        source: a path (``.pth``/``.pt`` official or imglish file, or ``.safetensors``) or a state dict.
        config: the architecture, or a preset name. Optional for imglish files (which carry their config).
        strict: raise ``ValueError`` with the key report when anything is missing, unexpected or mis-shaped.

    Returns:
        ``(model in eval mode, KeyReport)``.
    """
    if isinstance(source, Mapping):
        sd: Mapping[str, torch.Tensor] = source
    else:
        sd, meta = _read(source)  # read once: weights and the config saved beside them
        saved = meta.get("vqkd_config")
        saved_cfg = VQKDConfig.from_dict(saved) if isinstance(saved, Mapping) else None
        if config is None:
            config = saved_cfg
    if config is None:
        raise ValueError("load_vqkd needs `config` (a VQKDConfig or preset name) for a file without a saved config")
    cfg = VQKD_PRESETS[config] if isinstance(config, str) and config in VQKD_PRESETS else config
    if isinstance(cfg, str):
        create_vqkd(cfg)  # raises the unknown-name error with suggestions
    model = VQKD(cfg)  # type: ignore[arg-type]
    report = _load_into(model, sd, strict)
    return model.eval(), report


def save_vqkd(model: VQKD, path: str | os.PathLike) -> Path:
    """Write a tokenizer as safetensors (official key names, config in the metadata), atomically."""
    import json
    import tempfile

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, tmp, metadata={"format": "imglish-vqkd/1", "vqkd_config": json.dumps(model.config.to_dict())})
    os.replace(tmp, path)
    return path


def train_visual_tokenizer(*args: Any, **kwargs: Any) -> Any:
    """Train a VQ-KD tokenizer; see :func:`imglish.tokenizers.vqkd_train.train_visual_tokenizer`."""
    from imglish.tokenizers.vqkd_train import train_visual_tokenizer as _train

    return _train(*args, **kwargs)
