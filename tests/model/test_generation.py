"""Caption generation: beam search and greedy decoding with the KV cache."""

from __future__ import annotations

import torch

from imglish.generation import GenerationConfig, beam_search, greedy_search
from imglish.model.heads import BEiT3ForCaptioning, captioning_attention_mask
from tests.model.helpers import randomize, tiny_config


def _model() -> BEiT3ForCaptioning:
    return randomize(BEiT3ForCaptioning(tiny_config(vocab_size=40)), seed=3)


def _full_pass_next(model, image, prefix, mask_id):
    """Logits of the next token from a full (non-incremental) pass over [image; prefix MASK]."""
    ids = torch.cat([prefix, torch.full((prefix.shape[0], 1), mask_id)], dim=1)
    logits, _ = model(image, ids, None, None)
    return logits[:, -1]


def test_greedy_equals_argmax_of_full_passes():
    model, image = _model(), torch.randn(2, 3, 32, 32)
    cfg = GenerationConfig(max_len=6, num_beams=1, mask_token_id=39, suppress_ids=(0, 1, 39))
    out = greedy_search(model, image, cfg)
    assert out.shape == (2, 6) and torch.all(out[:, 0] == 0)
    for row in range(2):
        prefix = out[row : row + 1, :1]
        for pos in range(1, 6):
            if prefix[0, -1] == cfg.eos_token_id:
                break
            logits = _full_pass_next(model, image[row : row + 1], prefix, 39)
            logits[:, list(cfg.suppress_ids)] = float("-inf")
            expected = logits.argmax(-1) if pos < 5 else torch.tensor([cfg.eos_token_id])
            assert out[row, pos] == expected[0]
            prefix = torch.cat([prefix, out[row : row + 1, pos : pos + 1]], dim=1)


def test_beam_search_output_layout_and_suppression():
    model, image = _model(), torch.randn(3, 3, 32, 32)
    cfg = GenerationConfig(max_len=8, num_beams=3, mask_token_id=39, suppress_ids=(0, 1, 39))
    out = beam_search(model, image, cfg)
    assert out.shape == (3, 8) and torch.all(out[:, 0] == 0)
    for row in out.tolist():
        eos = row.index(2)
        assert all(t == 1 for t in row[eos + 1 :])  # then padding
        assert 1 not in row[1:eos] and 0 not in row[1:eos]


def test_captioning_mask_layout():
    mask = captioning_attention_mask(3, 4)
    assert mask.shape == (7, 7)
    assert torch.all(mask[:3, :3] == 0) and torch.all(mask[:3, 3:] == 1)  # image sees image, no text
    assert torch.all(mask[3:, :3] == 0)  # text sees the image
    assert torch.equal(mask[3:, 3:], 1 - torch.tril(torch.ones(4, 4, dtype=torch.long)))
