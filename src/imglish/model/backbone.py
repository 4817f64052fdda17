"""The BEiT-3 backbone: a Multiway Transformer over vision tokens, text tokens, or both.

Paper: Wang et al., "Image as a Foreign Language: BEiT Pretraining for All Vision and Vision-Language Tasks",
arXiv 2208.10442. Official code: microsoft/unilm `beit3/` on microsoft/torchscale (spec §1).

What the released model computes, and how this file differs in *how* (never in *what*):

- The sequence is `[vision CLS, patches..., text BOS, text..., EOS, pad...]`; every layer has one self-attention over
  the whole sequence and per-modality experts ("A" = vision, "B" = language) for its LayerNorms, q/k/v/out
  projections, the attention sub-LN and the FFN (Magneto sub-LN, pre-LN, exact GELU, eps 1e-5).
- The official code keeps the modality split in a mutable attribute of every module and splits/concatenates the
  sequence around each of its eight multiway modules per layer. Here the vision and text streams stay separate
  tensors for the whole network; each layer concatenates them only once, for the shared attention, whose q/k/v
  projections are fused into one matmul per expert. Attention runs through `scaled_dot_product_attention` (explicit
  matmuls for bf16 training on the CPU, where they are faster: `attention`).
- Position tables keep the fairseq layout (two unused leading rows), so official weights map one to one.
- Options beyond the release: the paper's shared attention and vision-language FFN expert (config), dynamic image
  size, per-layer hidden states, and a key/value cache that keeps working with padded batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from imglish.model.config import BEiT3Config, checkpoint_mode
from imglish.model.layers import (
    FeedForward,
    KVCache,
    LayerKV,
    build_attention_mask,
    drop_path_mask,
    resample_position_table,
    trunc_normal_,
)

__all__ = ["BEiT3", "BEiT3Output", "MultiwayBlock"]

VISION, TEXT, VL, SHARED = "A", "B", "C", "shared"


def expert_keys(config: BEiT3Config, shared: bool = False) -> tuple[str, ...]:
    """The experts a multiway module holds: one per modality of `config.modalities`, or the shared one."""
    if shared:
        return (SHARED,)
    return tuple(k for k, held in ((VISION, config.has_vision), (TEXT, config.has_text)) if held)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """Scaled dot-product attention, (B, H, T, hd) each; `mask` as `scaled_dot_product_attention` takes it.

    When autograd records a bf16/fp16 step on the CPU, the attention is written out as two batched matrix
    products around a softmax: there the CPU flash kernel runs no faster than in float32, while the explicit form
    (the official code's) takes the attention's forward and backward 1.7-2.2x faster at 197-965 tokens on an AMX
    Xeon (docs/benchmarks.md). Everywhere else (float32, inference, GPUs) `scaled_dot_product_attention`.
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled():
        scores = torch.matmul(q * scale, k.transpose(-2, -1))
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask.to(scores.dtype)
        return torch.matmul(scores.softmax(dim=-1), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _expert(modules: nn.ModuleDict, key: str) -> nn.Module:
    """The expert for `key`, or the shared module when the layout shares it across modalities."""
    return modules[key] if key in modules else modules[SHARED]


class MultiwayAttention(nn.Module):
    """Self-attention shared by all tokens, with per-modality (or shared) projections and sub-LN."""

    def __init__(self, config: BEiT3Config) -> None:
        super().__init__()
        dim, eps = config.embed_dim, config.layernorm_eps
        keys = expert_keys(config, config.shared_attention)
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.ModuleDict({k: nn.Linear(dim, 3 * dim) for k in keys})  # rows: q, k, v
        self.inner_norm = nn.ModuleDict({k: nn.LayerNorm(dim, eps=eps) for k in keys})
        self.proj = nn.ModuleDict({k: nn.Linear(dim, dim) for k in keys})

    def forward(
        self,
        hv: Tensor | None,
        ht: Tensor | None,
        mask: Tensor | None,
        cache: LayerKV | None,
        first_only: bool = False,
    ) -> tuple[Tensor | None, Tensor | None]:
        if first_only:
            return self._forward_first(hv, ht, mask)
        parts = []
        if hv is not None:
            parts.append(_expert(self.qkv, VISION)(hv))
        if ht is not None:
            parts.append(_expert(self.qkv, TEXT)(ht))
        qkv = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        batch, length, _ = qkv.shape
        # Unbinding the (q, k, v) axis in place and transposing each part gives the same strided views as a permute
        # to (3, B, H, L, hd), but in backward the three gradients are stacked straight into the (B, L, 3D) layout
        # of the fused projection's output: one copy per layer instead of two.
        q, k, v = (t.transpose(1, 2) for t in qkv.view(batch, length, 3, self.num_heads, self.head_dim).unbind(2))
        if cache is not None:
            if cache.key is not None:
                k = torch.cat([cache.key, k], dim=2)
                v = torch.cat([cache.value, v], dim=2)
            cache.key, cache.value = k, v
        out = attention(q, k, v, mask, self.head_dim**-0.5)
        out = out.transpose(1, 2).reshape(batch, length, -1)
        n_vision = hv.shape[1] if hv is not None else 0
        ov = out[:, :n_vision] if hv is not None else None
        ot = out[:, n_vision:] if ht is not None else None
        return self._output(ov, ot)

    def _output(self, ov: Tensor | None, ot: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """Each stream's sub-LN and output projection, by its own expert."""
        if ov is not None:
            ov = _expert(self.proj, VISION)(_expert(self.inner_norm, VISION)(ov))
        if ot is not None:
            ot = _expert(self.proj, TEXT)(_expert(self.inner_norm, TEXT)(ot))
        return ov, ot

    def _forward_first(
        self, hv: Tensor | None, ht: Tensor | None, mask: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Attention output of the first token of each stream only; keys and values still come from every token.

        The fused projection's weight rows are [q; k; v], so the queries use its first D rows on one token per
        stream and the keys/values its last 2D rows on all tokens: no query is computed that nobody reads.
        """
        dim = self.num_heads * self.head_dim
        queries, keyvals, rows = [], [], []
        for key, h in ((VISION, hv), (TEXT, ht)):
            if h is None:
                continue
            lin = _expert(self.qkv, key)
            bias = lin.bias
            rows.append(sum(t.shape[1] for t in keyvals))  # the stream's first position in the joined sequence
            queries.append(F.linear(h[:, :1], lin.weight[:dim], None if bias is None else bias[:dim]))
            keyvals.append(F.linear(h, lin.weight[dim:], None if bias is None else bias[dim:]))
        q = queries[0] if len(queries) == 1 else torch.cat(queries, dim=1)
        kv = keyvals[0] if len(keyvals) == 1 else torch.cat(keyvals, dim=1)
        batch, length, _ = kv.shape
        q = q.view(batch, len(rows), self.num_heads, self.head_dim).transpose(1, 2)
        k, v = (t.transpose(1, 2) for t in kv.view(batch, length, 2, self.num_heads, self.head_dim).unbind(2))
        if mask is not None and mask.shape[-2] > 1:
            mask = mask[:, :, rows]
        out = attention(q, k, v, mask, self.head_dim**-0.5)
        out = out.transpose(1, 2).reshape(batch, len(rows), -1)
        ov = out[:, :1] if hv is not None else None
        ot = out[:, -1:] if ht is not None else None
        return self._output(ov, ot)


@torch.no_grad()
def redraw_linear_weights(module: nn.Module, std: float) -> None:
    """Re-draw every Linear weight under ``module`` from N(0, std) cut at two standard deviations (biases kept)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)


class MultiwayBlock(nn.Module):
    """One pre-LN layer: shared attention with multiway projections, then per-modality FFN experts.

    In the top `vl_ffn_layers` layers (paper option) a third expert "C" takes every token of a fused
    image-text input.
    """

    def __init__(self, config: BEiT3Config, drop_path: float, vl_expert: bool) -> None:
        super().__init__()
        dim, eps = config.embed_dim, config.layernorm_eps
        attn_keys = expert_keys(config, config.shared_attention)
        # the vision-language expert takes fused image-text inputs, which a one-modality model never sees
        ffn_keys = expert_keys(config) + ((VL,) if vl_expert and len(config.modalities) == 2 else ())
        self.drop_path = drop_path
        self.norm1 = nn.ModuleDict({k: nn.LayerNorm(dim, eps=eps) for k in attn_keys})
        self.attn = MultiwayAttention(config)
        self.norm2 = nn.ModuleDict({k: nn.LayerNorm(dim, eps=eps) for k in ffn_keys})
        self.ffn = nn.ModuleDict({k: FeedForward(dim, config.ffn_dim, eps) for k in ffn_keys})

    def _ffn(self, key: str, x: Tensor, keep: Tensor | None) -> Tensor:
        y = self.ffn[key](self.norm2[key](x))
        return x + (y if keep is None else y * keep)

    def forward(
        self,
        xv: Tensor | None,
        xt: Tensor | None,
        mask: Tensor | None,
        cache: LayerKV | None = None,
        fusion: bool = False,
        first_only: bool = False,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Update both streams; with `first_only`, return only each stream's first token, shape (B, 1, D)."""
        ref = xv if xv is not None else xt
        keep = drop_path_mask(ref.shape[0], self.drop_path, self.training, ref)
        hv = _expert(self.norm1, VISION)(xv) if xv is not None else None
        ht = _expert(self.norm1, TEXT)(xt) if xt is not None else None
        av, at = self.attn(hv, ht, mask, cache, first_only)
        if first_only:
            xv = xv[:, :1] if xv is not None else None
            xt = xt[:, :1] if xt is not None else None
        if xv is not None:
            xv = xv + (av if keep is None else av * keep)
        if xt is not None:
            xt = xt + (at if keep is None else at * keep)
        keep = drop_path_mask(ref.shape[0], self.drop_path, self.training, ref)
        if fusion and VL in self.ffn:
            n_vision = xv.shape[1] if xv is not None else 0
            x = self._ffn(VL, torch.cat([t for t in (xv, xt) if t is not None], dim=1), keep)
            return (x[:, :n_vision] if xv is not None else None), (x[:, n_vision:] if xt is not None else None)
        if xv is not None:
            xv = self._ffn(VISION, xv, keep)
        if xt is not None:
            xt = self._ffn(TEXT, xt, keep)
        return xv, xt


# Operators whose outputs "selective" recomputation keeps: everything with a matrix product inside. The rest of a
# layer (LayerNorms, GELU, residual adds, the concatenation of the two streams) is recomputed in backward.
_KEEP_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEEP_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_matmuls)


@dataclass
class BEiT3Output:
    """What the backbone returns.

    Attributes:
        last_hidden_state: (B, T, D), vision tokens (CLS first) then text tokens.
        num_vision_tokens: how many of the T tokens are vision tokens (0 for text only).
        padding_mask: (B, T) bool with True at padded text positions, or None.
        hidden_states: when requested, L + 1 tensors (B, T, D): the embeddings, then each layer's output
            (before the final LayerNorm).
        cache: the key/value cache, when decoding incrementally.
    """

    last_hidden_state: Tensor
    num_vision_tokens: int
    padding_mask: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    cache: KVCache | None = None

    @property
    def vision_tokens(self) -> Tensor:
        return self.last_hidden_state[:, : self.num_vision_tokens]

    @property
    def text_tokens(self) -> Tensor:
        return self.last_hidden_state[:, self.num_vision_tokens :]

    @property
    def multiway_split_position(self) -> int:
        """The official value: -1 for vision only, 0 for text only, otherwise the number of vision tokens."""
        total = self.last_hidden_state.shape[1]
        return -1 if self.num_vision_tokens == total and total > 0 else self.num_vision_tokens

    def __getitem__(self, key: str) -> Any:
        """Read by the official dict keys (`encoder_out`, `multiway_split_position`, ...), for ported code."""
        official = {
            "encoder_out": self.last_hidden_state,
            "encoder_padding_mask": self.padding_mask,
            "multiway_split_position": self.multiway_split_position,
            "encoder_states": list(self.hidden_states or []),
        }
        if key not in official:
            raise KeyError(f"{key!r}; BEiT3Output provides {sorted(official)} by key, and more as attributes")
        return official[key]


# Official backbone argument names, accepted as aliases so code written against torchscale's BEiT3 keeps working.
_OFFICIAL_ALIASES = {
    "textual_tokens": "text_ids",
    "visual_tokens": "image",
    "text_padding_position": "padding_mask",
    "vision_masked_position": "image_mask",
    "incremental_state": "cache",
}


class BEiT3(nn.Module):
    """The BEiT-3 backbone.

    Args:
        config: the architecture (see `BEiT3Config`).
    """

    def __init__(self, config: BEiT3Config) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        # A one-modality model (config.modalities) holds neither the other modality's embeddings nor its experts.
        if config.has_text:
            self.text_embed = nn.Embedding(config.vocab_size, dim)
        if config.has_vision:
            self.vision_embed = VisionEmbedding(config)
        # fairseq layout: rows 0 and 1 unused, CLS at row 2, patch k at row 3 + k; text token j at row 2 + j.
        if config.has_vision:
            self.vision_pos_embed = nn.Parameter(torch.empty(config.num_patches + 3, dim))
        if config.has_text:
            self.text_pos_embed = nn.Parameter(torch.empty(config.max_source_positions, dim))
        depth, rate = config.depth, config.drop_path_rate
        rates = [rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]  # linspace(0, rate, L)
        first_vl = config.depth - config.vl_ffn_layers
        self.layers = nn.ModuleList(
            MultiwayBlock(config, drop_path=rates[i], vl_expert=i >= first_vl) for i in range(config.depth)
        )
        self.norm = (
            nn.ModuleDict({k: nn.LayerNorm(dim, eps=config.layernorm_eps) for k in expert_keys(config)})
            if config.normalize_output
            else None
        )
        self.grad_checkpointing = checkpoint_mode(config.grad_checkpointing)
        self.init_weights()

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation (spec §1.5): the wrapper's re-init wins over torchscale's Magneto gain."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        if self.config.has_vision:
            self.vision_embed.reset_parameters()
        if self.config.has_text:
            nn.init.normal_(self.text_embed.weight, mean=0.0, std=self.config.embed_dim**-0.5)
        for table in self._position_tables():
            nn.init.normal_(table)

    @torch.no_grad()
    def init_for_scratch(self, linear_std: float | None = None, pos_std: float | None = None) -> None:
        """Re-draw the backbone's random weights for training from scratch without pretraining.

        The official start (:meth:`init_weights`) cuts N(0, 0.02) at one standard deviation (an effective std of
        about 0.011, whatever the width) and draws the positional tables from N(0, 1). Both are made for a
        pretrained checkpoint to overwrite; a small model trained from random weights for a few hundred steps
        barely mixes its tokens from that start (its attention stays uniform and the position tables swamp the
        token embeddings). ``linear_std`` re-draws every Linear weight from N(0, linear_std) cut at two standard
        deviations (biases stay zero); ``pos_std`` re-draws both positional tables from N(0, pos_std). ``None``
        leaves that part official.
        """
        if linear_std is not None:
            redraw_linear_weights(self, linear_std)
        if pos_std is not None:
            for table in self._position_tables():
                nn.init.normal_(table, std=pos_std)

    def holds_key(self, key: str) -> bool:
        """False for a key (relative to this module) of a full-modality state dict that belongs to a modality this
        model does not hold (`BEiT3Config.modalities`): the other modality's embeddings, position table and
        experts, and the vision-language expert. Loading skips such keys."""
        if len(self.config.modalities) == 2:
            return True
        parts = key.split(".")
        owner = {"text_embed": "text", "text_pos_embed": "text", "vision_embed": "vision",
                 "vision_pos_embed": "vision"}.get(parts[0])
        if owner is None:
            experts = {TEXT: "text", VISION: "vision", VL: "both"}
            owner = next((experts[p] for p in parts[1:-1] if p in experts), None)
        return owner is None or owner in self.config.modalities

    def _position_tables(self) -> list[nn.Parameter]:
        return [getattr(self, n) for n in ("vision_pos_embed", "text_pos_embed") if hasattr(self, n)]

    def set_grad_checkpointing(self, enable: bool | str = True) -> None:
        """Recompute activations in backward: True/"full" (whole layers), "selective" or False/"none".

        "full" keeps only each layer's input (least memory, about one extra forward). "selective" keeps what is
        expensive to recompute (matrix products, attention) and recomputes the rest (norms, GELU, adds, copies):
        about half of the activation memory for a few percent more time. See `BEiT3Config.grad_checkpointing`.
        """
        self.grad_checkpointing = checkpoint_mode(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay by the official recipes (spec §7), relative to this module."""
        return {"vision_pos_embed", "vision_embed.cls_token"}

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # ------------------------------------------------------------------ embeddings
    def _vision_positions(self, grid: tuple[int, int]) -> Tensor:
        table = self.vision_pos_embed
        if grid != self.config.grid_size:
            table = resample_position_table(table, self.config.grid_size, grid)
        return table[2:]

    def embed_image(self, image: Tensor, image_mask: Tensor | None = None) -> Tensor:
        """Patch embedding, optional mask tokens, CLS and positions: (B, 3, H, W) -> (B, 1 + N, D)."""
        x, grid = self.vision_embed(image, image_mask)
        return x + self._vision_positions(grid).to(x.dtype)

    def embed_text(self, text_ids: Tensor, positions: Tensor | None = None, start: int = 0) -> Tensor:
        """Token embedding plus positions: (B, T) -> (B, T, D). `positions` are token indices (0 = first)."""
        if positions is None:
            rows = torch.arange(start + 2, start + 2 + text_ids.shape[1], device=text_ids.device)
        else:
            rows = positions + 2
        return self.text_embed(text_ids) + F.embedding(rows, self.text_pos_embed)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        image: Tensor | None = None,
        text_ids: Tensor | None = None,
        padding_mask: Tensor | None = None,
        *,
        attn_mask: Tensor | None = None,
        image_mask: Tensor | None = None,
        text_positions: Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        cls_only: bool = False,
        **official: Any,
    ) -> BEiT3Output:
        """Encode an image, a text, or both.

        Args:
            image: (B, 3, H, W) normalised pixels, or None.
            text_ids: (B, T) token ids, or None.
            padding_mask: (B, T), 1/True at padded text positions.
            attn_mask: (T, S) or (B, T, S) over the whole sequence (cached positions included): nonzero/True means
                blocked (the official convention), or a float additive bias.
            image_mask: (B, N) patches to replace by the mask token (masked image modelling).
            text_positions: (B|1, T) token indices of the text (default: continue after the cached text).
            cache: a `KVCache` to read and extend for incremental decoding.
            output_hidden_states: also return every layer's output.
            cls_only: compute only the first token of each stream (the image's CLS token, the text's first token)
                in the last layer, which is all that pooled heads (VQA, NLVR2, retrieval) read. The other tokens'
                last-layer queries, attention outputs and FFNs are skipped (about 1/12 of a 12-layer model's
                work, forward and backward); `last_hidden_state` is then (B, 1 or 2, D) and `num_vision_tokens`
                is 1 when an image was given. Not with `cache`.
            **official: the official names `textual_tokens`, `visual_tokens`, `text_padding_position`,
                `vision_masked_position`, `incremental_state` and `positions` (raw table rows).

        Returns:
            A `BEiT3Output` (also readable by the official keys, e.g. `out["encoder_out"]`).
        """
        if official:
            image, text_ids, padding_mask, image_mask, cache, text_positions = self._resolve_official(
                official, image, text_ids, padding_mask, image_mask, cache, text_positions
            )
        self._check_inputs(image, text_ids, padding_mask, image_mask, cache)
        if cls_only and cache is not None:
            raise ValueError("cls_only=True computes a partial last layer and cannot fill a KV cache; pass cache=None")

        xv = self.embed_image(image, image_mask) if image is not None else None
        n_vision = xv.shape[1] if xv is not None else 0
        text_start = cache.num_text_tokens if cache is not None else 0
        xt = self.embed_text(text_ids, text_positions, start=text_start) if text_ids is not None else None

        pad = padding_mask.bool() if padding_mask is not None else None
        if pad is not None:
            xt = xt * (~pad).unsqueeze(-1).to(xt.dtype)  # padded positions are zeroed, as officially
            # an all-False mask changes nothing; dropping it lets attention take its unmasked kernel (a
            # data-dependent test, skipped under torch.compile / torch.export, which keep the mask)
            if not torch.compiler.is_compiling() and not bool(pad.any()):
                pad = None
        key_pad = self._key_padding(pad, xv, xt, n_vision, cache)
        num_queries = n_vision + (xt.shape[1] if xt is not None else 0)
        ref = xv if xv is not None else xt
        mask = build_attention_mask(key_pad, attn_mask, num_queries, ref.dtype)
        fusion = xt is not None and (xv is not None or (cache is not None and cache.num_vision_tokens > 0))

        hidden: list[Tensor] = []
        if output_hidden_states:
            hidden.append(self._join(xv, xt))
        use_ckpt = self.grad_checkpointing != "none" and self.training and torch.is_grad_enabled() and cache is None
        ckpt_kwargs = {"use_reentrant": False}
        if self.grad_checkpointing == "selective":
            ckpt_kwargs["context_fn"] = _selective_contexts
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            layer_cache = cache.layers[index] if cache is not None else None
            first_only = cls_only and index == last
            if use_ckpt:
                xv, xt = checkpoint(layer, xv, xt, mask, None, fusion, first_only, **ckpt_kwargs)
            else:
                xv, xt = layer(xv, xt, mask, layer_cache, fusion, first_only)
            if output_hidden_states:
                hidden.append(self._join(xv, xt))
        if self.norm is not None:
            xv = self.norm[VISION](xv) if xv is not None else None
            xt = self.norm[TEXT](xt) if xt is not None else None

        if cache is not None:
            cache.num_vision_tokens += n_vision
            cache.num_text_tokens += xt.shape[1] if xt is not None else 0
        if cls_only:
            n_vision = 1 if xv is not None else 0
            pad = pad[:, :1] if pad is not None else None
        full_pad = None
        if pad is not None:
            full_pad = pad if xv is None else torch.cat([pad.new_zeros(pad.shape[0], n_vision), pad], dim=1)
        return BEiT3Output(
            last_hidden_state=self._join(xv, xt),
            num_vision_tokens=n_vision,
            padding_mask=full_pad,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            cache=cache,
        )

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _join(xv: Tensor | None, xt: Tensor | None) -> Tensor:
        if xv is None:
            return xt
        if xt is None:
            return xv
        return torch.cat([xv, xt], dim=1)

    @staticmethod
    def _key_padding(
        pad: Tensor | None, xv: Tensor | None, xt: Tensor | None, n_vision: int, cache: KVCache | None
    ) -> Tensor | None:
        """(B, S) key padding over cached + new positions, or None when nothing is padded."""
        cached = cache.key_padding_mask if cache is not None else None
        if pad is None and cached is None:
            return None
        ref = xv if xv is not None else xt
        batch = ref.shape[0]
        n_text = xt.shape[1] if xt is not None else 0
        new = torch.zeros(batch, n_vision + n_text, dtype=torch.bool, device=ref.device)
        if pad is not None:
            new[:, n_vision:] = pad
        if cache is not None:
            if cached is None:
                cached = torch.zeros(batch, cache.length, dtype=torch.bool, device=ref.device)
            full = torch.cat([cached, new], dim=1)
            cache.key_padding_mask = full
            return full
        return new

    def _resolve_official(self, official: dict[str, Any], image, text_ids, padding_mask, image_mask, cache, positions):
        values = dict(image=image, text_ids=text_ids, padding_mask=padding_mask, image_mask=image_mask, cache=cache)
        for name, value in official.items():
            if name == "positions":
                if value is not None:
                    positions = value - 2  # official positions are raw table rows
                continue
            if name == "attn_mask":
                raise TypeError("pass attn_mask by keyword as usual")
            target = _OFFICIAL_ALIASES.get(name)
            if target is None:
                raise TypeError(f"BEiT3.forward() got an unexpected keyword argument {name!r}")
            if value is None:
                continue
            if target == "cache" and isinstance(value, dict):
                raise TypeError(
                    "incremental_state must be an imglish KVCache (KVCache.empty(num_layers)), not the official dict"
                )
            if values[target] is not None:
                raise TypeError(f"{name!r} given together with its imglish name {target!r}")
            values[target] = value
        return (
            values["image"], values["text_ids"], values["padding_mask"], values["image_mask"], values["cache"],
            positions,
        )

    def _check_inputs(self, image, text_ids, padding_mask, image_mask, cache) -> None:
        cfg = self.config
        if image is None and text_ids is None:
            raise ValueError("BEiT3 needs an image, a text, or both; got neither")
        for given, name, held in ((image, "an image", cfg.has_vision), (text_ids, "text_ids", cfg.has_text)):
            if given is not None and not held:
                raise ValueError(
                    f"this model holds only the {cfg.modalities[0]} weights (BEiT3Config.modalities="
                    f"{cfg.modalities!r}) and cannot encode {name}; build it with both modalities"
                )
        batch = None
        if image is not None:
            if image.dim() != 4 or image.shape[1] != cfg.in_chans:
                raise ValueError(
                    f"image must be a (B, {cfg.in_chans}, H, W) tensor, got shape {tuple(image.shape)}"
                )
            size = tuple(image.shape[-2:])
            if cfg.dynamic_img_size:
                if size[0] % cfg.patch_size or size[1] % cfg.patch_size:
                    raise ValueError(
                        f"image size {size} must be a multiple of the patch size {cfg.patch_size}"
                    )
            elif size != cfg.img_size:
                raise ValueError(
                    f"image size {size} does not match the model's img_size {cfg.img_size}; resize the image, "
                    f"build the model with img_size={size} (position tables are interpolated when loading), or "
                    f"set dynamic_img_size=True"
                )
            batch = image.shape[0]
            if image_mask is not None:
                n = (size[0] // cfg.patch_size) * (size[1] // cfg.patch_size)
                if image_mask.shape != (batch, n):
                    raise ValueError(
                        f"image_mask must have shape (B, num_patches) = ({batch}, {n}), got {tuple(image_mask.shape)}"
                    )
        elif image_mask is not None:
            raise ValueError("image_mask was given without an image")
        if text_ids is not None:
            if text_ids.dim() != 2 or text_ids.is_floating_point():
                raise ValueError(f"text_ids must be a (B, T) integer tensor, got {text_ids.dtype} {tuple(text_ids.shape)}")
            if batch is not None and text_ids.shape[0] != batch:
                raise ValueError(
                    f"batch sizes differ: image has {batch} rows but text_ids has {text_ids.shape[0]}"
                )
            start = cache.num_text_tokens if cache is not None else 0
            if start + text_ids.shape[1] > cfg.max_text_len:
                raise ValueError(
                    f"text of {start + text_ids.shape[1]} tokens is longer than the position table allows "
                    f"({cfg.max_text_len} = max_source_positions {cfg.max_source_positions} - 2)"
                )
            # a value check (data-dependent: eager only, not under torch.compile / torch.export)
            if (text_ids.numel() and not torch.compiler.is_compiling()
                    and (int(text_ids.min()) < 0 or int(text_ids.max()) >= cfg.vocab_size)):
                raise ValueError(
                    f"text_ids must be in [0, {cfg.vocab_size}), got values in "
                    f"[{int(text_ids.min())}, {int(text_ids.max())}]"
                )
            if padding_mask is not None and tuple(padding_mask.shape) != tuple(text_ids.shape):
                raise ValueError(
                    f"padding_mask must have the shape of text_ids {tuple(text_ids.shape)}, "
                    f"got {tuple(padding_mask.shape)}"
                )
        elif padding_mask is not None:
            raise ValueError("padding_mask was given without text_ids")
        if cache is not None and len(cache.layers) != self.num_layers:
            raise ValueError(f"cache has {len(cache.layers)} layers, the model has {self.num_layers}")


class VisionEmbedding(nn.Module):
    """Conv patch embedding with a CLS token and a mask token (no positions: the backbone adds them)."""

    def __init__(self, config: BEiT3Config) -> None:
        super().__init__()
        dim = config.embed_dim
        self.patch_size = config.patch_size
        self.proj = nn.Conv2d(config.in_chans, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))

    def reset_parameters(self) -> None:
        self.proj.reset_parameters()
        nn.init.zeros_(self.cls_token)
        nn.init.zeros_(self.mask_token)

    def forward(self, image: Tensor, image_mask: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(image)
        grid = (x.shape[-2], x.shape[-1])
        # Under autocast the conv output is bf16/fp16 while the tokens are float32: promote, as the official
        # code does (its cat and mask mixing promote), so the residual stream stays in the parameters' dtype.
        x = x.flatten(2).transpose(1, 2).to(torch.promote_types(x.dtype, self.cls_token.dtype))
        if image_mask is not None:
            x = torch.where(image_mask.bool().unsqueeze(-1), self.mask_token.to(x.dtype), x)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1), grid
