"""Masking for masked data modeling: BEiT block-wise image masks, text MLM masks, captioning masks.

* :class:`BlockMaskGenerator` follows BEiT's block-wise masking (spec §9.2): rectangular blocks of random area and
  aspect ratio are added until the target is reached, then single patches are masked or unmasked at random until
  **exactly** ``num_masking_patches`` are set.
* :func:`mask_text` selects an exact share of the maskable tokens of each row (BEiT-3: 15% for monomodal text, 50% for
  the text of image-text pairs), never BOS/EOS (by default) or padding, optionally with BERT's 80/10/10 replacement.
* :func:`mask_caption` reproduces the official captioning masking (spec §4.3).

Every function takes its random source explicitly (``numpy.random.Generator`` or ``torch.Generator``), so results are
reproducible from a seed and free of global state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["BlockMaskGenerator", "caption_mask_count", "mask_caption", "mask_text"]


class BlockMaskGenerator:
    """BEiT block-wise masking over a ``(height, width)`` grid of patches.

    Args:
        input_size: the patch grid, ``(H, W)`` or an int for a square grid (14 for 224/16).
        num_masking_patches: exact number of patches masked per call (BEiT v2 default 75 of 196; 40% is about 78).
        min_num_patches: smallest block area tried (16).
        max_num_patches: largest block area; ``None`` means ``num_masking_patches``.
        min_aspect: smallest aspect ratio h/w of a block (0.3); the largest is ``max_aspect`` or ``1 / min_aspect``.
        max_aspect: largest aspect ratio, ``None`` for ``1 / min_aspect``.
        exact: if True (BEiT v2 behaviour), fix the count up to exactly ``num_masking_patches`` after the block loop.

    Raises:
        ValueError: if a size is not positive or the target does not fit the grid.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 14,
        num_masking_patches: int = 75,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        exact: bool = True,
    ) -> None:
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = (int(v) for v in input_size)
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.num_patches = self.height * self.width
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(
                f"num_masking_patches must be in [0, {self.num_patches}] for a {self.height}x{self.width} grid, "
                f"got {num_masking_patches}"
            )
        if min_num_patches <= 0:
            raise ValueError(f"min_num_patches must be positive, got {min_num_patches}")
        if not min_aspect > 0:
            raise ValueError(f"min_aspect must be positive, got {min_aspect}")
        self.num_masking_patches = int(num_masking_patches)
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = int(num_masking_patches if max_num_patches is None else max_num_patches)
        max_aspect = max_aspect if max_aspect is not None else 1.0 / min_aspect
        self.min_aspect, self.max_aspect = float(min_aspect), float(max_aspect)
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.exact = bool(exact)

    @classmethod
    def from_ratio(cls, input_size: int | tuple[int, int], mask_ratio: float = 0.4, **kwargs) -> BlockMaskGenerator:
        """Build a generator masking ``round(mask_ratio * H * W)`` patches (BEiT-3: 40%)."""
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
        return cls((h, w), num_masking_patches=int(round(mask_ratio * h * w)), **kwargs)

    def __repr__(self) -> str:
        return (
            f"BlockMaskGenerator(input_size=({self.height}, {self.width}), num_masking_patches="
            f"{self.num_masking_patches}, min_num_patches={self.min_num_patches}, max_num_patches="
            f"{self.max_num_patches}, aspect=({self.min_aspect:.3f}, {self.max_aspect:.3f}), exact={self.exact})"
        )

    def _add_block(self, mask: np.ndarray, max_mask_patches: int, rng: np.random.Generator) -> int:
        """Try (up to 10 times) to add one block of at most ``max_mask_patches`` new patches; return the count added."""
        added = 0
        for _ in range(10):
            lo, hi = self.min_num_patches, max_mask_patches
            target_area = lo + (hi - lo) * rng.random()  # uniform between the two bounds, as random.uniform
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    block[...] = 1
                    added = new
            if added > 0:
                break
        return added

    def generate(self, rng: np.random.Generator) -> np.ndarray:
        """One mask.

        Args:
            rng: a ``numpy.random.Generator`` (e.g. ``np.random.default_rng(seed)``).

        Returns:
            ``(H, W)`` int32 array of 0/1; exactly ``num_masking_patches`` ones when ``exact``.
        """
        mask = np.zeros((self.height, self.width), dtype=np.int32)
        count = 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget, rng)
            if added == 0:
                break
            count += added
        if self.exact:
            count = int(mask.sum())
            if count > self.num_masking_patches:
                ys, xs = np.nonzero(mask)
                pick = rng.choice(len(ys), count - self.num_masking_patches, replace=False)
                mask[ys[pick], xs[pick]] = 0
            elif count < self.num_masking_patches:
                ys, xs = np.nonzero(mask == 0)
                pick = rng.choice(len(ys), self.num_masking_patches - count, replace=False)
                mask[ys[pick], xs[pick]] = 1
        return mask

    def __call__(self, batch_size: int | None = None, *, rng: np.random.Generator | int | None = None) -> torch.Tensor:
        """Masks as a bool tensor flattened row-major, ready for the model's ``image_mask``.

        Args:
            batch_size: ``None`` for one mask of shape ``(N,)``, else ``(batch_size, N)`` with N = H * W.
            rng: a numpy Generator, an int seed, or None (fresh OS entropy; not reproducible).

        Returns:
            bool tensor ``(N,)`` or ``(B, N)``.
        """
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        n = 1 if batch_size is None else int(batch_size)
        out = np.stack([self.generate(gen).reshape(-1) for _ in range(n)])
        t = torch.from_numpy(out.astype(bool))
        return t[0] if batch_size is None else t


def _exact_select(candidates: torch.Tensor, prob: float, generator: torch.Generator | None,
                  min_one: bool = True) -> torch.Tensor:
    """Choose exactly ``round(prob * n_i)`` (at least 1 when ``min_one`` and n_i > 0) of the True cells of each row."""
    n = candidates.sum(dim=1)
    k = torch.floor(n.to(torch.float64) * prob + 0.5).to(torch.long)
    if min_one:
        k = torch.maximum(k, (n > 0).to(torch.long))
    k = torch.minimum(k, n)
    scores = torch.rand(candidates.shape, generator=generator, dtype=torch.float64)
    scores = scores.masked_fill(~candidates, 2.0)  # non-candidates sort last
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return (ranks < k[:, None]) & candidates


def mask_text(
    ids: torch.Tensor,
    padding_mask: torch.Tensor | None,
    prob: float,
    *,
    mask_id: int,
    protected_ids: Sequence[int] = (0, 2),
    replace_80_10_10: bool = False,
    random_low: int = 3,
    random_high: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-language-model masking with an exact count per row.

    In each row, the maskable tokens are those that are not padding and whose id is not in ``protected_ids`` (BOS 0
    and EOS 2 by default). Exactly ``round(prob * n)`` of them are chosen (at least one if the row has any), uniformly
    without replacement. Chosen tokens become ``mask_id``, or, with ``replace_80_10_10``, ``mask_id`` with probability
    0.8, a random id in ``[random_low, random_high)`` with probability 0.1, and stay unchanged otherwise.

    Args:
        ids: ``(B, T)`` long token ids.
        padding_mask: ``(B, T)`` with 1/True at padding, or None for no padding.
        prob: share of maskable tokens to mask, in ``(0, 1]`` (BEiT-3: 0.15 monomodal text, 0.5 text in pairs).
        mask_id: id of ``<mask>`` (the tokenizer's last id).
        protected_ids: ids never chosen (BOS, EOS...).
        replace_80_10_10: use BERT's 80/10/10 replacement instead of always ``mask_id``.
        random_low: smallest random replacement id (3 skips bos/pad/eos).
        random_high: exclusive upper bound of random ids; default ``mask_id``.
        generator: torch random generator for reproducibility.

    Returns:
        ``(masked_ids, targets_mask)``: the new ``(B, T)`` ids, and a ``(B, T)`` bool tensor, True at the positions to
        predict (their original ids are ``ids[targets_mask]``).

    Raises:
        ValueError: on bad shapes or a ``prob`` outside ``(0, 1]``.
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be (B, T), got shape {tuple(ids.shape)}")
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"prob must be in (0, 1], got {prob}")
    if padding_mask is None:
        pad = torch.zeros_like(ids, dtype=torch.bool)
    else:
        if padding_mask.shape != ids.shape:
            raise ValueError(f"padding_mask shape {tuple(padding_mask.shape)} differs from ids {tuple(ids.shape)}")
        pad = padding_mask.to(torch.bool)
    candidates = ~pad
    for pid in protected_ids:
        candidates &= ids != int(pid)
    chosen = _exact_select(candidates, prob, generator)
    out = ids.clone()
    if not replace_80_10_10:
        out[chosen] = mask_id
        return out, chosen
    high = mask_id if random_high is None else int(random_high)
    if high <= random_low:
        raise ValueError(f"random id range [{random_low}, {high}) is empty")
    u = torch.rand(ids.shape, generator=generator)
    rand_ids = torch.randint(random_low, high, ids.shape, generator=generator, dtype=ids.dtype)
    to_mask = chosen & (u < 0.8)
    to_rand = chosen & (u >= 0.8) & (u < 0.9)
    out[to_mask] = mask_id
    out[to_rand] = rand_ids[to_rand]
    return out, chosen


def caption_mask_count(num_tokens: int, prob: float) -> int:
    """Official captioning mask count: ``max(1, min(int(num_tokens * prob + 0.5), num_tokens - 1))`` (spec §4.3)."""
    return max(1, min(int(num_tokens * prob + 0.5), num_tokens - 1))


def mask_caption(
    ids: torch.Tensor,
    padding_mask: torch.Tensor,
    prob: float = 0.6,
    *,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Captioning masking of the official code (spec §4.3), applied row by row.

    For a row with ``num_tokens`` real tokens (BOS ... EOS), ``caption_mask_count(num_tokens, prob)`` positions are
    drawn without repeats from ``1 .. num_tokens - 1`` (never BOS, possibly EOS, never padding). Each becomes
    ``mask_id`` with probability 0.8, stays with probability 0.1, and becomes ``randint(3, mask_id)`` (inclusive of
    both ends, as Python's ``random.randint``) with probability 0.1.

    Args:
        ids: ``(B, T)`` long ids, each row ``[BOS, ..., EOS, pad...]``.
        padding_mask: ``(B, T)``, 1 at padding.
        prob: ``--captioning_mask_prob`` (0.6 by default, 0.7 in the recipes).
        mask_id: id of ``<mask>``.
        generator: torch random generator.

    Returns:
        ``(masked_ids, language_masked_pos, masked_tokens)``: ``(B, T)`` long ids after replacement, ``(B, T)`` long
        0/1 positions, and ``(B, T)`` the original ids at the masked positions (0 elsewhere).

    Raises:
        ValueError: if a row has fewer than 2 real tokens.
    """
    if ids.dim() != 2 or padding_mask.shape != ids.shape:
        raise ValueError(f"ids and padding_mask must both be (B, T), got {tuple(ids.shape)}, {tuple(padding_mask.shape)}")
    out = ids.clone()
    pos = torch.zeros_like(ids, dtype=torch.long)
    lengths = (padding_mask == 0).sum(dim=1).tolist()
    for row, num_tokens in enumerate(lengths):
        if num_tokens < 2:
            raise ValueError(f"row {row} has {num_tokens} real tokens; captioning masking needs at least BOS and EOS")
        k = caption_mask_count(num_tokens, prob)
        chosen = torch.randperm(num_tokens - 1, generator=generator)[:k] + 1
        u = torch.rand(k, generator=generator)
        rand_ids = torch.randint(3, mask_id + 1, (k,), generator=generator, dtype=ids.dtype)
        new = ids[row, chosen].clone()
        new[u < 0.8] = mask_id
        sel = u >= 0.9
        new[sel] = rand_ids[sel]
        out[row, chosen] = new
        pos[row, chosen] = 1
    masked_tokens = torch.where(pos.bool(), ids, torch.zeros_like(ids))
    return out, pos, masked_tokens
