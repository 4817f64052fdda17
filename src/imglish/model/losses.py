"""Task losses as the official recipes define them (spec §2.2).

- classification: soft-target cross-entropy (with mixup/cutmix), label-smoothing cross-entropy, or plain CE;
- VQAv2: BCE-with-logits on soft scores, multiplied by the number of answers;
- NLVR2: cross-entropy;
- retrieval: the symmetric contrastive loss over all ranks (`imglish.model.heads.clip_loss`);
- captioning: label-smoothed KL divergence at the masked positions, dropping the worst tokens late in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from imglish.model.heads import clip_loss

__all__ = [
    "captioning_loss",
    "clip_loss",
    "label_smoothing_cross_entropy",
    "soft_target_cross_entropy",
    "vqa_loss",
]


def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against a (B, C) target distribution (mixup/cutmix labels), averaged over the batch."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and soft targets {tuple(targets.shape)} must have one shape")
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def label_smoothing_cross_entropy(logits: Tensor, labels: Tensor, smoothing: float = 0.1) -> Tensor:
    """(1 - smoothing) * NLL of the label + smoothing * mean NLL over all classes, averaged over the batch."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    logprobs = F.log_softmax(logits, dim=-1)
    nll = -logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return ((1.0 - smoothing) * nll + smoothing * -logprobs.mean(dim=-1)).mean()


def vqa_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """BCE-with-logits against soft answer scores, summed over answers and averaged over questions."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and VQA targets {tuple(targets.shape)} must have one shape")
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]


def captioning_loss(
    logits: Tensor,
    targets: Tensor,
    step: int = 0,
    smoothing: float = 0.1,
    drop_worst_ratio: float = 0.2,
    drop_worst_after: int = 12000,
) -> Tensor:
    """The official captioning loss at the masked positions.

    Per token: KL(q || softmax(logits)) where q puts `1 - smoothing` on the target and spreads `smoothing` evenly
    over the other V - 1 ids. Once `step > drop_worst_after`, only the `int(n * (1 - drop_worst_ratio))` smallest
    token losses are kept. The result is their mean.

    Args:
        logits: (M, V) logits at the masked positions.
        targets: (M,) original token ids there.
        step: the global optimisation step.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (M, V) and targets (M,), got {tuple(logits.shape)} and {tuple(targets.shape)}")
    vocab = logits.shape[1]
    q = torch.full_like(logits, smoothing / (vocab - 1), dtype=torch.float32)
    q.scatter_(1, targets.view(-1, 1), 1.0 - smoothing)
    per_token = F.kl_div(F.log_softmax(logits.float(), dim=1), q, reduction="none").sum(1)
    if drop_worst_ratio > 0 and step > drop_worst_after:
        keep = int(per_token.shape[0] * (1 - drop_worst_ratio))
        per_token, _ = torch.topk(per_token, k=keep, largest=False)
    return per_token.mean()
