"""Caption generation with the key/value cache: the official beam search (spec §2.4) and greedy decoding.

BEiT-3 generates by masked-language modelling: every step feeds `[last word, MASK]` and reads the logits at the
MASK slot; the MASK's cached key/value is then dropped, so the cache grows by one position per step.

`beam_search` reproduces the official `CaptioningHandler.eval_batch` token for token, quirks included: a
hypothesis is stored as the tokens generated so far with the slot of the word being chosen still holding MASK
(the decoder skips special tokens, so the caption text is unaffected), it is scored by
`sum_logprob / len(hyp) ** length_penalty` with BOS counted, and special or unused ids may be chosen. Pass
`suppress_ids` to forbid ids (an improvement the official code lacks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from imglish.model.heads import BEiT3ForCaptioning

__all__ = ["GenerationConfig", "beam_search", "greedy_search", "generate"]


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; the defaults are the official evaluation ones (XLM-R special ids, 3 beams, 0.6)."""

    max_len: int = 64
    num_beams: int = 3
    length_penalty: float = 0.6
    candidates_per_beam: int = 3
    bos_token_id: int = 0
    pad_token_id: int = 1
    eos_token_id: int = 2
    mask_token_id: int = 64001
    suppress_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_len < 2:
            raise ValueError(f"max_len must be at least 2 (BOS plus one token), got {self.max_len}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {self.num_beams}")


class _Hypotheses:
    """The n-best list of finished hypotheses of one example (the official `BeamHypotheses`, n = 1)."""

    def __init__(self, keep: int, max_len: int, length_penalty: float) -> None:
        self.keep = keep
        self.max_len = max_len - 1  # BOS not counted
        self.length_penalty = length_penalty
        self.hyps: list[tuple[float, Tensor]] = []
        self.worst_score = 1e9

    def add(self, hyp: Tensor, sum_logprobs: float) -> None:
        score = sum_logprobs / len(hyp) ** self.length_penalty
        if len(self.hyps) < self.keep or score > self.worst_score:
            self.hyps.append((score, hyp))
            if len(self.hyps) > self.keep:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.hyps))
                del self.hyps[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float) -> bool:
        if len(self.hyps) < self.keep:
            return False
        return self.worst_score >= best_sum_logprobs / self.max_len**self.length_penalty


def _step_logprobs(model: BEiT3ForCaptioning, image: Tensor | None, words: Tensor, cache, cfg: GenerationConfig) -> Tensor:
    logits, _ = model(image, words, torch.zeros_like(words), None, incremental_state=cache)
    scores = F.log_softmax(logits[:, -1].float(), dim=-1)
    if cfg.suppress_ids:
        scores[:, list(cfg.suppress_ids)] = float("-inf")
    return scores


@torch.no_grad()
def beam_search(model: BEiT3ForCaptioning, image: Tensor, config: GenerationConfig | None = None) -> Tensor:
    """The official incremental beam search.

    Args:
        model: a captioning model (in eval mode).
        image: (B, 3, H, W) normalised images.
        config: decoding settings.

    Returns:
        (B, max_len) token ids: the best hypothesis (BOS first), then EOS, then padding.
    """
    cfg = config or GenerationConfig()
    batch, beams, vocab = image.shape[0], cfg.num_beams, model.config.vocab_size
    device = image.device
    cur_len = 2
    bos = torch.full((batch * beams, 1), cfg.bos_token_id, dtype=torch.long, device=device)
    mask = torch.full((batch * beams, 1), cfg.mask_token_id, dtype=torch.long, device=device)
    words = torch.cat([bos, mask], dim=1)
    decoded = torch.cat([bos, mask.expand(-1, cfg.max_len - 1)], dim=1).clone()
    images = image.repeat_interleave(beams, dim=0)
    hyps = [_Hypotheses(1, cfg.max_len, cfg.length_penalty) for _ in range(batch)]
    beam_scores = torch.zeros(batch, beams, device=device)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    done = [False] * batch
    cache = model.new_cache()

    while cur_len <= cfg.max_len:
        scores = _step_logprobs(model, images if cur_len == 2 else None, words, cache, cfg)
        scores = (scores + beam_scores[:, None]).view(batch, beams * vocab)
        next_scores, next_ids = torch.topk(scores, cfg.candidates_per_beam * beams, dim=1, largest=True, sorted=True)
        next_batch: list[tuple[float, int, int]] = []
        for ex in range(batch):
            done[ex] = done[ex] or hyps[ex].is_done(next_scores[ex].max().item())
            if done[ex]:
                next_batch.extend([(0.0, cfg.pad_token_id, 0)] * beams)
                continue
            next_sent: list[tuple[float, int, int]] = []
            for idx, score in zip(next_ids[ex].tolist(), next_scores[ex].tolist()):
                beam_id, word_id = divmod(idx, vocab)
                row = ex * beams + beam_id
                if (word_id == cfg.eos_token_id and cur_len + 1 <= cfg.max_len) or cur_len + 1 == cfg.max_len:
                    hyps[ex].add(decoded[row, :cur_len].clone(), score)
                else:
                    next_sent.append((score, word_id, row))
                if len(next_sent) == beams:
                    break
            if not next_sent:
                next_sent = [(0.0, cfg.pad_token_id, 0)] * beams
            next_batch.extend(next_sent)
        beam_scores = torch.tensor([s for s, _, _ in next_batch], device=device, dtype=beam_scores.dtype)
        beam_words = torch.tensor([w for _, w, _ in next_batch], device=device, dtype=torch.long)
        beam_idx = torch.tensor([r for _, _, r in next_batch], device=device, dtype=torch.long)
        decoded = decoded[beam_idx]
        cache.reorder(beam_idx)
        cache.truncate(cache.length - 1)  # drop the MASK's key/value
        words = torch.cat([beam_words[:, None], mask], dim=1)
        decoded[:, cur_len - 1] = beam_words
        cur_len += 1
        if all(done):
            break

    out = torch.full((batch, cfg.max_len), cfg.pad_token_id, dtype=torch.long, device=device)
    for ex, h in enumerate(hyps):
        if not h.hyps:
            continue
        _, best = max(h.hyps, key=lambda item: item[0])
        out[ex, : len(best)] = best
        out[ex, len(best)] = cfg.eos_token_id
    return out


@torch.no_grad()
def greedy_search(model: BEiT3ForCaptioning, image: Tensor, config: GenerationConfig | None = None) -> Tensor:
    """Greedy decoding: the most likely token at each step until EOS or `max_len`.

    Returns:
        (B, max_len) token ids: BOS, the generated tokens, EOS, then padding.
    """
    cfg = config or GenerationConfig()
    batch, device = image.shape[0], image.device
    out = torch.full((batch, cfg.max_len), cfg.pad_token_id, dtype=torch.long, device=device)
    out[:, 0] = cfg.bos_token_id
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    mask = torch.full((batch, 1), cfg.mask_token_id, dtype=torch.long, device=device)
    words = torch.cat([out[:, :1], mask], dim=1)
    cache = model.new_cache()
    for pos in range(1, cfg.max_len):
        scores = _step_logprobs(model, image if pos == 1 else None, words, cache, cfg)
        if pos == cfg.max_len - 1:
            next_word = torch.full_like(finished, cfg.eos_token_id, dtype=torch.long)
        else:
            next_word = scores.argmax(dim=-1)
        next_word = torch.where(finished, torch.full_like(next_word, cfg.pad_token_id), next_word)
        out[:, pos] = next_word
        finished |= next_word == cfg.eos_token_id
        if bool(finished.all()):
            break
        cache.truncate(cache.length - 1)
        words = torch.cat([next_word[:, None], mask], dim=1)
    return out


def generate(model: BEiT3ForCaptioning, image: Tensor, config: GenerationConfig | None = None) -> Tensor:
    """Beam search when `config.num_beams > 1`, greedy decoding otherwise."""
    cfg = config or GenerationConfig()
    return beam_search(model, image, cfg) if cfg.num_beams > 1 else greedy_search(model, image, cfg)
