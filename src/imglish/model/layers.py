"""Building blocks of the Multiway Transformer: attention masks, drop path, the FFN expert, position tables,
and the key/value cache used for incremental decoding.

Nothing here stores per-call state on a module: the modality split, masks and caches are arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FeedForward",
    "KVCache",
    "LayerKV",
    "build_attention_mask",
    "drop_path_mask",
    "resample_position_table",
    "trunc_normal_",
]


def trunc_normal_(tensor: Tensor, std: float = 0.02) -> Tensor:
    """The official initialiser: a normal of std `std` truncated at ±std (one sigma, spec §11.3)."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-std, b=std)


class FeedForward(nn.Module):
    """One FFN expert: fc1 → exact GELU → sub-LayerNorm over the inner width (Magneto) → fc2."""

    def __init__(self, embed_dim: int, ffn_dim: int, eps: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.norm = nn.LayerNorm(ffn_dim, eps=eps)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(F.gelu(self.fc1(x))))


def drop_path_mask(batch: int, drop_prob: float, training: bool, ref: Tensor) -> Tensor | None:
    """Per-sample stochastic-depth multiplier (B, 1, 1): 0 for dropped samples, 1/keep for kept ones.

    Returns None when nothing is dropped, so callers skip the multiply entirely.
    """
    if drop_prob <= 0.0 or not training:
        return None
    keep = 1.0 - drop_prob
    mask = torch.empty((batch, 1, 1), dtype=ref.dtype, device=ref.device).bernoulli_(keep)
    return mask.div_(keep)


def build_attention_mask(
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    num_queries: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """Combine a key padding mask and an attention mask into one mask for `scaled_dot_product_attention`.

    Args:
        key_padding_mask: (B, S) bool, True where the key is padding; or None.
        attn_mask: (T, S) or (B, T, S). Bool or integer tensors use the official convention (nonzero = blocked);
            a floating tensor is an additive bias. Or None.
        num_queries: T, used to validate `attn_mask`.
        dtype: the dtype of the attention scores (for additive masks).

    Returns:
        None, a bool mask (B|1, 1, T|1, S) with True = may attend, or an additive float mask.
    """
    if attn_mask is None and key_padding_mask is None:
        return None
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        if attn_mask.dim() != 3 or attn_mask.shape[-2] != num_queries:
            raise ValueError(
                f"attn_mask must have shape (T, S) or (B, T, S) with T = {num_queries} queries, "
                f"got {tuple(attn_mask.shape)}"
            )
        attn_mask = attn_mask.unsqueeze(1)  # (B|1, 1, T, S)
        if attn_mask.is_floating_point():
            bias = attn_mask.to(dtype)
            if key_padding_mask is not None:
                pad = key_padding_mask[:, None, None, :]
                bias = bias.masked_fill(pad, float("-inf"))
            return bias
        allowed = attn_mask == 0
        if key_padding_mask is not None:
            allowed = allowed & ~key_padding_mask[:, None, None, :]
        return allowed
    return ~key_padding_mask[:, None, None, :]


def resample_position_table(
    table: Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_extra: int = 3,
    antialias: bool = False,
) -> Tensor:
    """Resample a vision position table to another patch grid (bicubic, align_corners=False).

    The first `num_extra` rows (the two unused fairseq rows and the CLS row) are kept as they are; the remaining
    rows are a row-major (rows, columns) grid. Square and non-square grids both work.

    Args:
        table: (num_extra + old_rows * old_cols, D).
        old_grid: (rows, columns) of the table.
        new_grid: (rows, columns) wanted.
        num_extra: leading rows that are not part of the grid.
        antialias: use antialiasing when shrinking (the official loader does not).

    Returns:
        (num_extra + new_rows * new_cols, D), same dtype as `table`.
    """
    old_rows, old_cols = old_grid
    if table.shape[0] != num_extra + old_rows * old_cols:
        raise ValueError(
            f"position table has {table.shape[0]} rows, expected {num_extra} + {old_rows}x{old_cols} = "
            f"{num_extra + old_rows * old_cols}"
        )
    if tuple(old_grid) == tuple(new_grid):
        return table
    extra, grid = table[:num_extra], table[num_extra:]
    dim = table.shape[1]
    grid = grid.reshape(1, old_rows, old_cols, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=antialias
    ).to(table.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(-1, dim)
    return torch.cat([extra, grid], dim=0)


def square_grid(num_positions: int) -> tuple[int, int]:
    """The square grid of `num_positions` patches, or a ValueError when it is not a perfect square."""
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ValueError(f"{num_positions} patch positions do not form a square grid; pass the grid explicitly")
    return (side, side)


@dataclass
class LayerKV:
    """Cached keys and values of one layer, (B, H, S, head_dim) each."""

    key: Tensor | None = None
    value: Tensor | None = None


@dataclass
class KVCache:
    """Key/value cache for incremental decoding.

    Unlike the official `incremental_state`, it also keeps the key padding mask of every cached position, so
    batches of padded prompts decode correctly (the official encoder drops the padding mask whenever it decodes
    incrementally, spec §11.6).

    Attributes:
        layers: one `LayerKV` per layer.
        key_padding_mask: (B, S) bool, True at cached positions that are padding; None when nothing is padded.
        num_vision_tokens: vision tokens at the front of the cache (0 for text-only prompts).
        num_text_tokens: text tokens cached after them; new text continues at this position index.
    """

    layers: list[LayerKV] = field(default_factory=list)
    key_padding_mask: Tensor | None = None
    num_vision_tokens: int = 0
    num_text_tokens: int = 0

    @classmethod
    def empty(cls, num_layers: int) -> "KVCache":
        return cls(layers=[LayerKV() for _ in range(num_layers)])

    @property
    def length(self) -> int:
        return self.num_vision_tokens + self.num_text_tokens

    def is_empty(self) -> bool:
        return self.length == 0

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (e.g. beams) in place: `index` is a (B',) long tensor into the batch axis."""
        for layer in self.layers:
            if layer.key is not None:
                layer.key = layer.key.index_select(0, index)
                layer.value = layer.value.index_select(0, index)
        if self.key_padding_mask is not None:
            self.key_padding_mask = self.key_padding_mask.index_select(0, index)

    def truncate(self, length: int) -> None:
        """Keep only the first `length` cached positions (drop the rest, e.g. a trailing [MASK])."""
        if not self.num_vision_tokens <= length <= self.length:
            raise ValueError(
                f"cannot truncate a cache of {self.length} positions ({self.num_vision_tokens} vision) to {length}"
            )
        for layer in self.layers:
            if layer.key is not None:
                layer.key = layer.key[:, :, :length]
                layer.value = layer.value[:, :, :length]
        if self.key_padding_mask is not None:
            self.key_padding_mask = self.key_padding_mask[:, :length]
        self.num_text_tokens = length - self.num_vision_tokens
