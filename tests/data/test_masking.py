"""Masking statistics: exact counts, block shapes, protected tokens, replacement proportions, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imglish.data.masking import BlockMaskGenerator, caption_mask_count, mask_caption, mask_text


@pytest.mark.parametrize("grid,count", [((14, 14), 75), ((14, 14), 78), ((8, 8), 26), ((6, 10), 24), ((16, 16), 102)])
def test_block_masks_have_exactly_the_requested_count(grid, count):
    gen = BlockMaskGenerator(grid, num_masking_patches=count)
    rng = np.random.default_rng(0)
    for _ in range(50):
        m = gen.generate(rng)
        assert m.shape == grid and m.dtype == np.int32
        assert int(m.sum()) == count


def test_one_block_is_a_filled_rectangle_within_the_aspect_range():
    gen = BlockMaskGenerator((14, 14), num_masking_patches=60, min_num_patches=16, min_aspect=0.3)
    rng = np.random.default_rng(1)
    for _ in range(100):
        m = np.zeros((14, 14), dtype=np.int32)
        added = gen._add_block(m, 60, rng)
        ys, xs = np.nonzero(m)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert added == h * w == m.sum()  # a full rectangle
        assert 16 - 4 <= added <= 60  # area near [min, max] (rounding of h and w)
        assert 0.3 / 2 <= h / w <= 2 / 0.3


def test_block_masks_are_clustered_compared_with_random_masks():
    gen = BlockMaskGenerator(14, num_masking_patches=75)
    rng = np.random.default_rng(2)

    def adjacent_pairs(m):
        return int((m[1:, :] & m[:-1, :]).sum() + (m[:, 1:] & m[:, :-1]).sum())

    block = np.mean([adjacent_pairs(gen.generate(rng)) for _ in range(30)])
    rand = []
    for _ in range(30):
        m = np.zeros(196, dtype=np.int32)
        m[rng.choice(196, 75, replace=False)] = 1
        rand.append(adjacent_pairs(m.reshape(14, 14)))
    assert block > 1.5 * np.mean(rand)


def test_block_masks_are_reproducible_and_batched():
    gen = BlockMaskGenerator.from_ratio(14, 0.4)
    assert gen.num_masking_patches == 78
    a, b, c = gen(4, rng=7), gen(4, rng=7), gen(4, rng=8)
    assert a.shape == (4, 196) and a.dtype == torch.bool
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.sum(1).tolist() == [78] * 4
    with pytest.raises(ValueError, match="num_masking_patches"):
        BlockMaskGenerator(4, num_masking_patches=17)


def _batch(lengths, t=20, bos=0, eos=2, pad=1, vocab=50):
    g = torch.Generator().manual_seed(0)
    ids = torch.full((len(lengths), t), pad)
    padm = torch.ones(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(4, vocab - 1, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = bos, eos
        padm[i, :n] = 0
    return ids, padm


@pytest.mark.parametrize("prob", [0.15, 0.5])
def test_mask_text_exact_counts_and_protected_positions(prob):
    lengths = [3, 5, 12, 20, 17, 9]
    ids, padm = _batch(lengths)
    out, tgt = mask_text(ids, padm, prob, mask_id=49, generator=torch.Generator().manual_seed(1))
    for i, n in enumerate(lengths):
        maskable = n - 2
        assert int(tgt[i].sum()) == max(1, int(maskable * prob + 0.5))
    assert not tgt[:, 0].any()  # BOS
    assert not (tgt & padm.bool()).any()  # padding
    assert not (tgt & (ids == 2)).any()  # EOS
    assert (out[tgt] == 49).all() and torch.equal(out[~tgt], ids[~tgt])


def test_mask_text_80_10_10_proportions_and_reproducibility():
    ids, padm = _batch([20] * 400)
    kw = dict(mask_id=49, replace_80_10_10=True)
    out, tgt = mask_text(ids, padm, 0.5, generator=torch.Generator().manual_seed(3), **kw)
    out2, tgt2 = mask_text(ids, padm, 0.5, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(out, out2) and torch.equal(tgt, tgt2)
    n = int(tgt.sum())
    assert n == 400 * 9
    masked = (out[tgt] == 49).float().mean().item()
    same = (out[tgt] == ids[tgt]).float().mean().item()
    changed = out[tgt][(out[tgt] != 49) & (out[tgt] != ids[tgt])]
    assert abs(masked - 0.8) < 0.03 and abs(same - 0.1) < 0.03  # the 10% random ids can equal the original
    assert abs(changed.numel() / n - 0.1) < 0.03
    assert changed.min() >= 3 and changed.max() < 49


def test_caption_mask_count_formula():
    assert caption_mask_count(2, 0.6) == 1
    assert caption_mask_count(10, 0.6) == 6
    assert caption_mask_count(10, 0.7) == 7
    assert caption_mask_count(3, 0.7) == 2
    assert caption_mask_count(32, 0.99) == 31


def test_mask_caption_positions_and_replacement():
    lengths = [2, 4, 10, 16] * 200
    ids, padm = _batch(lengths, t=16, vocab=60)
    out, pos, tokens = mask_caption(ids, padm, 0.7, mask_id=59, generator=torch.Generator().manual_seed(4))
    for i, n in enumerate(lengths):
        assert int(pos[i].sum()) == caption_mask_count(n, 0.7)
    assert not pos[:, 0].any() and not (pos.bool() & padm.bool()).any()
    eos_pos = torch.tensor(lengths) - 1
    assert pos[torch.arange(len(lengths)), eos_pos].any()  # EOS can be masked
    sel = pos.bool()
    assert torch.equal(tokens[sel], ids[sel]) and (tokens[~sel] == 0).all()
    frac_mask = (out[sel] == 59).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.04 or frac_mask > 0.8  # random ids may also land on mask_id
    rand = out[sel][(out[sel] != 59) & (out[sel] != ids[sel])]
    assert rand.min() >= 3 and rand.max() <= 59
    with pytest.raises(ValueError, match="at least BOS and EOS"):
        mask_caption(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]), mask_id=59)
