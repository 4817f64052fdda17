"""Typed configuration of the BEiT-3 backbone and its named sizes.

`BEiT3Config` holds every setting that changes the numbers a backbone computes. It is frozen and validated: a bad
value raises a `ValueError` that names the field, and `from_dict` rejects unknown keys instead of ignoring them
(the official `EncoderConfig` silently drops typos).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["BEiT3Config", "SIZES", "checkpoint_mode", "size_config"]

CHECKPOINT_MODES = ("none", "full", "selective")


def checkpoint_mode(value: bool | str) -> str:
    """The activation recomputation mode named by `value`: "none", "full" or "selective" (True means "full")."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in CHECKPOINT_MODES:
        raise ValueError(f"grad_checkpointing must be a bool or one of {CHECKPOINT_MODES}, got {value!r}")
    return value


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")


MODALITIES = ("vision", "text")


def _modalities(value: Any) -> tuple[str, ...]:
    """``value`` as a tuple in the canonical order; "vision", "text" or a list of them."""
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (tuple, list)) or not items or any(m not in MODALITIES for m in items):
        raise ValueError(
            f"BEiT3Config.modalities must be a non-empty subset of {list(MODALITIES)}, got {value!r}"
        )
    return tuple(m for m in MODALITIES if m in items)


@dataclass(frozen=True)
class BEiT3Config:
    """Configuration of a BEiT-3 Multiway Transformer.

    The defaults are the released base model at 224 (spec §1.1, §10).

    Args:
        embed_dim: hidden size D.
        num_heads: attention heads H (D must be divisible by H).
        depth: number of layers L.
        ffn_dim: inner size F of each feed-forward expert.
        img_size: input image size, an int or (height, width); both must be multiples of `patch_size`.
        patch_size: side of the square patches.
        in_chans: image channels.
        vocab_size: rows of the text embedding (64010 for the released models).
        max_source_positions: rows of the text position table; text may hold `max_source_positions - 2` tokens
            because of the fairseq offset of 2.
        normalize_output: whether the final multiway LayerNorm exists (False for classification and VQA).
        layernorm_eps: epsilon of every LayerNorm.
        drop_path_rate: stochastic depth, linearly increasing from 0 at the first layer to this at the last.
        shared_attention: the paper's layout, one set of attention projections and norms for all modalities,
            instead of the released per-modality ones.
        vl_ffn_layers: the paper's vision-language FFN expert in the top K layers (paper: 3), used by every token of
            an image-text input in fusion mode. 0 (the released layout) disables it.
        dynamic_img_size: accept images of any size that is a multiple of the patch size by resampling the vision
            position table on the fly; otherwise a different size is an error, as in the official code.
        modalities: the modalities whose weights the model holds: ``("vision", "text")`` (the released models),
            ``("vision",)`` or ``("text",)``. A vision-only model has no text embedding, text position table or
            language experts (and no vision-language expert); a text-only model has no patch embedding, vision
            position table or vision experts. Its outputs on its own modality are those of the full model with the
            same weights, for about 40% (vision, base) or 60% (text) of the parameters, so less memory in
            training and serving and smaller files (see docs/models.md). Loading a full checkpoint into it skips
            the weights it does not hold.
        grad_checkpointing: activation recomputation in training. False/"none": off. True/"full": keep only each
            layer's input and recompute the whole layer in backward (least memory, about one extra forward).
            "selective": keep the outputs of matrix products and attention, recompute LayerNorms, GELU, residual
            adds and copies (about half the activation memory for a few percent of time).
    """

    embed_dim: int = 768
    num_heads: int = 12
    depth: int = 12
    ffn_dim: int = 3072
    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 64010
    max_source_positions: int = 1024
    normalize_output: bool = True
    layernorm_eps: float = 1e-5
    drop_path_rate: float = 0.0
    shared_attention: bool = False
    vl_ffn_layers: int = 0
    dynamic_img_size: bool = False
    grad_checkpointing: bool | str = False
    modalities: tuple[str, ...] = MODALITIES
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "img_size", _pair(self.img_size, "img_size"))
        positive = ("embed_dim", "num_heads", "depth", "ffn_dim", "patch_size", "in_chans", "vocab_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BEiT3Config.{name} must be a positive int, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"BEiT3Config.embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        for side, size in zip(("height", "width"), self.img_size):
            if size <= 0 or size % self.patch_size:
                raise ValueError(
                    f"BEiT3Config.img_size {side} ({size}) must be a positive multiple of patch_size "
                    f"({self.patch_size})"
                )
        if self.max_source_positions < 3:
            raise ValueError(
                f"BEiT3Config.max_source_positions must be at least 3 (2 offset rows plus one token), got "
                f"{self.max_source_positions}"
            )
        if not 0 <= self.vl_ffn_layers <= self.depth:
            raise ValueError(f"BEiT3Config.vl_ffn_layers must be in [0, depth={self.depth}], got {self.vl_ffn_layers}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"BEiT3Config.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.layernorm_eps <= 0:
            raise ValueError(f"BEiT3Config.layernorm_eps must be positive, got {self.layernorm_eps}")
        checkpoint_mode(self.grad_checkpointing)  # validates
        object.__setattr__(self, "modalities", _modalities(self.modalities))

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns) at the configured image size."""
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    @property
    def max_text_len(self) -> int:
        """Longest text (BOS and EOS included) the text position table can hold."""
        return self.max_source_positions - 2

    @property
    def has_vision(self) -> bool:
        return "vision" in self.modalities

    @property
    def has_text(self) -> bool:
        return "text" in self.modalities

    @property
    def has_official_layout(self) -> bool:
        """True when the model can be written with the official key names (no paper-only options)."""
        return not self.shared_attention and self.vl_ffn_layers == 0

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out["img_size"] = list(self.img_size)
        out["modalities"] = list(self.modalities)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BEiT3Config":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown BEiT3Config field(s) {unknown}; valid fields are {sorted(names)}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> "BEiT3Config":
        """A copy with some fields changed (validated like a new config; unknown names are an error)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown BEiT3Config field(s) {unknown}; valid fields are {sorted(names - {'extra'})}")
        return dataclasses.replace(self, **changes)


# Named sizes. base/large are the released models (spec §10); giant is the paper's (patch 14, unreleased).
# tiny and small are ours, for CPU work and tests.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=192, num_heads=3, depth=4, ffn_dim=768, patch_size=16),
    "small": dict(embed_dim=384, num_heads=6, depth=8, ffn_dim=1536, patch_size=16),
    "base": dict(embed_dim=768, num_heads=12, depth=12, ffn_dim=3072, patch_size=16),
    "large": dict(embed_dim=1024, num_heads=16, depth=24, ffn_dim=4096, patch_size=16),
    # The paper's giant: shared self-attention, and a vision-language FFN in the top 3 layers.
    "giant": dict(
        embed_dim=1408, num_heads=16, depth=40, ffn_dim=6144, patch_size=14, shared_attention=True, vl_ffn_layers=3
    ),
}


def size_config(size: str, **overrides: Any) -> BEiT3Config:
    """The config of a named size (`tiny`, `small`, `base`, `large`, `giant`) with overrides applied."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(SIZES)}")
    return BEiT3Config(**{**SIZES[size], **overrides})
