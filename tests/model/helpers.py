"""Tiny models for tests: small enough to run many forward passes on a CPU in seconds."""

from __future__ import annotations

import torch

from imglish.model.config import BEiT3Config

TINY = dict(embed_dim=32, num_heads=4, depth=2, ffn_dim=64, img_size=32, patch_size=8, vocab_size=50,
            max_source_positions=24)


def tiny_config(**overrides) -> BEiT3Config:
    return BEiT3Config(**{**TINY, **overrides})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter distinct random values (LayerNorms included), so no test passes by symmetry."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def text_batch(batch: int = 3, length: int = 7, vocab: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids with BOS/EOS and right padding of different lengths; padding_mask has 1 at pads."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, length), generator=gen)
    pad = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        n = max(2, length - 2 * row)
        ids[row, 0], ids[row, n - 1] = 0, 2
        ids[row, n:] = 1
        pad[row, n:] = 1
    return ids, pad
