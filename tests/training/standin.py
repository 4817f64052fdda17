"""Small stand-ins used by the training tests: a model with the pretraining interface, a visual tokenizer
whose codes are a deterministic function of each patch's mean colour, a character-level text encoder, and
synthetic in-memory sources whose texts and images carry learnable structure."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn


@dataclass
class _Out:
    mim_logits: torch.Tensor | None
    mlm_logits: torch.Tensor | None


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class _Backbone(nn.Module):
    def __init__(self, dim: int, depth: int, vocab: int, img: int, patch: int) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        n = (img // patch) ** 2
        self.pos = nn.Parameter(torch.randn(1, n + 64, dim) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.text_embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(_Block(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.grad_ckpt = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_ckpt = enable


class StandInPretraining(nn.Module):
    """Same call signature and outputs as ``beit3_*_pretraining`` of the contract."""

    def __init__(
        self,
        vocab_size: int,
        num_visual_tokens: int,
        img_size: int = 32,
        patch_size: int = 8,
        dim: int = 32,
        depth: int = 2,
    ) -> None:
        super().__init__()
        self.beit3 = _Backbone(dim, depth, vocab_size, img_size, patch_size)
        self.mim_head = nn.Linear(dim, num_visual_tokens)
        self.mlm_head = nn.Linear(dim, vocab_size)

    def no_weight_decay(self) -> set[str]:
        return {"beit3.pos"}

    def layer_id(self, name: str) -> int:
        if name.startswith("beit3.layers."):
            return int(name.split(".")[2]) + 1
        if "embed" in name or name in ("beit3.pos", "beit3.mask_token") or name.startswith("beit3.patch"):
            return 0
        return len(self.beit3.layers) + 1

    def forward(self, image=None, text_ids=None, padding_mask=None, image_mask=None, text_mask=None) -> _Out:
        b = self.beit3
        parts, pads = [], []
        n_img = 0
        if image is not None:
            x = b.patch(image).flatten(2).transpose(1, 2)
            if image_mask is not None:
                x = torch.where(image_mask[..., None], b.mask_token.to(x.dtype).expand_as(x), x)
            n_img = x.shape[1]
            parts.append(x)
            pads.append(torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device))
        if text_ids is not None:
            parts.append(b.text_embed(text_ids))
            pads.append(
                padding_mask.bool()
                if padding_mask is not None
                else torch.zeros_like(text_ids, dtype=torch.bool)
            )
        x = torch.cat(parts, 1)
        x = x + b.pos[:, : x.shape[1]]
        pad = torch.cat(pads, 1)
        for layer in b.layers:
            if b.grad_ckpt and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, pad, use_reentrant=False)
            else:
                x = layer(x, pad)
        x = b.norm(x)
        mim = self.mim_head(x[:, :n_img][image_mask]) if image_mask is not None else None
        mlm = self.mlm_head(x[:, n_img:][text_mask]) if text_mask is not None else None
        return _Out(mim, mlm)


class ColourTokenizer(nn.Module):
    """Visual codes from the quantised mean colour of each patch (2 levels per channel -> 8 codes)."""

    def __init__(self, patch_size: int = 8) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.n_code = 8
        self.register_buffer("dummy", torch.zeros(1))

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        m = nn.functional.avg_pool2d(images, self.patch_size)  # (B, 3, h, w)
        bits = (m > 0.5).long()
        code = bits[:, 0] * 4 + bits[:, 1] * 2 + bits[:, 2]
        return code.flatten(1)


CHARS = "abcdefghijklmnopqrstuvwxyz "


def char_encode(text: str) -> list[int]:
    """BOS 0, pad 1, EOS 2, unk 3; characters from 4; mask = 4 + len(CHARS)."""
    return [0] + [4 + CHARS.index(c) if c in CHARS else 3 for c in text] + [2]


CHAR_VOCAB = 4 + len(CHARS) + 1
CHAR_MASK = CHAR_VOCAB - 1


# Config overrides shared by every stand-in run (tiny images, small batches, quiet logging); tests add their own.
STANDIN_OVERRIDES = {
    "model.img_size": 32,
    "model.patch_size": 8,
    "data.image_batch": 8,
    "data.text_batch": 8,
    "data.pair_batch": 8,
    "data.max_text_len": 24,
    "data.heldout_batches": 0,
    "schedule.warmup_steps": 2,
    "optim.lr": 3e-3,
    "parallel.threads": 1,
    "logging.log_every": 1,
    "logging.progress": False,
    "logging.tensorboard": False,
}

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def make_sources(n: int = 64, size: int = 32, seed: int = 0):
    """Image list, text list and (image, caption) pairs: one coloured square on a dark background."""
    from imglish.training.streams import StreamSources

    rng = np.random.default_rng(seed)
    images, texts, pairs = [], [], []
    names = list(COLOURS)
    for i in range(n):
        c = names[int(rng.integers(len(names)))]
        img = Image.new("RGB", (size, size), (10, 10, 10))
        d = ImageDraw.Draw(img)
        x0, y0 = int(rng.integers(0, size // 2)), int(rng.integers(0, size // 2))
        d.rectangle([x0, y0, x0 + size // 2, y0 + size // 2], fill=COLOURS[c])
        images.append(img)
        caption = f"a {c} square"
        pairs.append((img, caption))
        texts.append(f"the {c} square is {c}")
    return StreamSources(images=images, texts=texts, pairs=pairs)
