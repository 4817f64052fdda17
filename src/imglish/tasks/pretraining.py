"""Masked data modeling (BEiT-3's only pretraining task) over three streams: images, texts and image-text pairs.

* image stream: block-wise masked patches are replaced by the mask token; cross-entropy over the visual codebook
  (targets: the VQ-KD tokenizer's codes of the unmasked image) at the masked patches;
* text stream: 15% of the tokens masked; cross-entropy over the text vocabulary at the masked positions;
* pair stream: 50% of the text masked, the image whole (optionally masked too, which adds a MIM term).

Each term is a sum of per-token cross-entropies divided by a *denominator* chosen by the caller. The trainer passes
``global_count / world_size`` (the number of targets of that term over the whole global batch, all ranks and
micro-steps), so that after gradient accumulation and the averaging of DDP/FSDP the gradient equals that of the mean
over the global batch, whatever the number of processes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imglish.tasks.base import StepOutput

__all__ = [
    "CLS_TERMS",
    "STREAMS",
    "TERMS",
    "MDMOutput",
    "MaskedDataModeling",
    "PretrainingTask",
    "attach_visual_targets",
    "count_targets",
]

STREAMS = ("image", "text", "pair")
# (stream, kind): kind "mim" predicts visual codes, "mlm" predicts text ids.
TERMS = (("image", "mim"), ("text", "mlm"), ("pair", "mlm"), ("pair", "mim"))
#: the [CLS] head's terms (a model with ``cls_head_layers > 0``): the same targets, predicted through the pooled tokens
CLS_TERMS = tuple((stream, f"cls_{kind}") for stream, kind in TERMS)


#: one micro-batch's result; terms are ``"stream.kind"`` and counts are predicted tokens
MDMOutput = StepOutput


def count_targets(batch: Mapping[str, Mapping[str, torch.Tensor]], cls_head: bool = False) -> dict[str, int]:
    """Number of prediction targets of each term in one micro-batch (from its masks); with ``cls_head``, also of
    the [CLS] head's terms (the same targets)."""
    counts = {}
    for stream, kind in TERMS:
        part = batch.get(stream)
        key = "image_mask" if kind == "mim" else "text_mask"
        if part is not None and part.get(key) is not None:
            counts[f"{stream}.{kind}"] = n = int(part[key].sum())
            if cls_head:
                counts[f"{stream}.cls_{kind}"] = n
    return counts


@torch.no_grad()
def attach_visual_targets(batch: dict[str, dict[str, torch.Tensor]], visual_tokenizer: Any) -> None:
    """Fill ``visual_targets`` (B, N) of every stream that has ``tokenizer_image`` (B, 3, H, W) in [0, 1].

    Streams that already carry precomputed ``visual_targets`` are left as they are.
    """
    for part in batch.values():
        if part.get("visual_targets") is None and part.get("tokenizer_image") is not None:
            part["visual_targets"] = visual_tokenizer.get_codebook_indices(part["tokenizer_image"]).long()


class MaskedDataModeling(nn.Module):
    """Wraps a BEiT-3 pretraining model and computes the MDM loss of a three-stream micro-batch.

    The wrapper is what DDP/FSDP wrap, so that the three forwards of the inner model belong to one forward call.

    Args:
        model: a model with the imglish pretraining interface: ``model(image=, text_ids=, padding_mask=,
            image_mask=, text_mask=)`` returning ``mim_logits`` (M, K) and ``mlm_logits`` (M, V).
        weights: weight of each stream's loss, ``{"image": 1.0, "text": 1.0, "pair": 1.0}`` by default.
        cls_weight: weight of the [CLS] head's terms relative to their stream's (used when the model returns
            ``cls_mim_logits`` / ``cls_mlm_logits``).
    """

    def __init__(self, model: nn.Module, weights: Mapping[str, float] | None = None, cls_weight: float = 1.0) -> None:
        super().__init__()
        self.model = model
        w = {s: 1.0 for s in STREAMS}
        for k, v in (weights or {}).items():
            if k not in w:
                raise ValueError(f"unknown stream {k!r} in weights; expected one of {STREAMS}")
            w[k] = float(v)
        self.weights = w
        self.cls_weight = float(cls_weight)

    @staticmethod
    def _term(logits: torch.Tensor | None, targets: torch.Tensor, name: str) -> tuple[torch.Tensor, ...]:
        if logits is None:
            raise RuntimeError(f"the model returned no logits for {name}")
        if logits.shape[0] != targets.shape[0]:
            raise RuntimeError(
                f"{name}: the model returned {logits.shape[0]} rows of logits for {targets.shape[0]} masked tokens"
            )
        ce = F.cross_entropy(logits.float(), targets, reduction="sum")
        correct = (logits.detach().argmax(-1) == targets).sum()
        return ce, correct

    def forward(
        self,
        batch: Mapping[str, Mapping[str, torch.Tensor]],
        denominators: Mapping[str, float] | None = None,
        step: int = 0,
    ) -> MDMOutput:
        """MDM loss of one micro-batch.

        Args:
            batch: per stream a dict with, as present: ``image`` (B, 3, H, W) normalised, ``image_mask`` (B, N) bool,
                ``visual_targets`` (B, N) long, ``text_ids`` (B, T) long (already masked), ``padding_mask``
                (B, T) (1 = pad), ``text_mask`` (B, T) bool and ``text_targets`` (B, T) long (original ids).
            denominators: per term ``"stream.kind"``, what its cross-entropy sum is divided by; by default the
                term's own count (a per-micro-batch mean).
            step: the optimizer step (unused: the objective does not change over a run).

        Returns:
            :class:`MDMOutput`.
        """
        device = next(iter(self.parameters())).device
        total = torch.zeros((), device=device)
        out = MDMOutput(loss=total)
        for stream in STREAMS:
            part = batch.get(stream)
            if part is None:
                continue
            image_mask = part.get("image_mask")
            text_mask = part.get("text_mask")
            if image_mask is not None and not bool(image_mask.any()):
                image_mask = None
            res = self.model(
                image=part.get("image"),
                text_ids=part.get("text_ids"),
                padding_mask=part.get("padding_mask"),
                image_mask=image_mask,
                text_mask=text_mask,
            )
            terms = []
            if image_mask is not None:
                targets = part["visual_targets"][image_mask]
                terms.append(("mim", res.mim_logits, targets, 1.0))
                if getattr(res, "cls_mim_logits", None) is not None:
                    terms.append(("cls_mim", res.cls_mim_logits, targets, self.cls_weight))
            if text_mask is not None:
                targets = part["text_targets"][text_mask]
                terms.append(("mlm", res.mlm_logits, targets, 1.0))
                if getattr(res, "cls_mlm_logits", None) is not None:
                    terms.append(("cls_mlm", res.cls_mlm_logits, targets, self.cls_weight))
            for kind, logits, targets, weight in terms:
                name = f"{stream}.{kind}"
                ce, correct = self._term(logits, targets, name)
                n = targets.numel()
                denom = (
                    float(denominators[name]) if denominators and name in denominators else float(max(n, 1))
                )
                total = total + self.weights[stream] * weight * ce / max(denom, 1e-12)
                out.loss_sum[name] = ce.detach().double()
                out.count[name] = torch.tensor(n, dtype=torch.float64)
                out.correct[name] = correct.detach().double()
        out.loss = total
        return out


class PretrainingTask:
    """Masked data modeling as the trainer sees a task: three streams, four terms, visual targets made on the device.

    Args:
        weights: weight of each stream's loss (``objective.{image,text,pair}_weight``).
        visual_tokenizer: module with ``get_codebook_indices(images_in_0_1)``, or ``None`` when every target is
            precomputed.
        cls_weight: weight of the [CLS] head's terms (``objective.cls_head_weight``); 0 when the model has no
            [CLS] head, which leaves its four terms out.
    """

    name = "pretraining"

    def __init__(self, weights: Mapping[str, float] | None = None, visual_tokenizer: Any = None,
                 cls_weight: float = 0.0) -> None:
        self.weights = dict(weights or {})
        self.visual_tokenizer = visual_tokenizer
        self.cls_weight = float(cls_weight)
        self.terms = tuple(f"{s}.{k}" for s, k in TERMS + (CLS_TERMS if self.cls_weight else ()))

    def step_module(self, model: nn.Module) -> MaskedDataModeling:
        return MaskedDataModeling(model, self.weights, self.cls_weight)

    def term_weight(self, term: str) -> float:
        stream, kind = term.split(".")
        w = float(self.weights.get(stream, 1.0))
        return w * self.cls_weight if kind.startswith("cls_") else w

    def count_targets(self, batch: Mapping[str, Mapping[str, torch.Tensor]], step: int) -> dict[str, int]:
        return count_targets(batch, cls_head=bool(self.cls_weight))

    def prepare(self, batch: dict[str, dict[str, torch.Tensor]]) -> None:
        if self.visual_tokenizer is not None:
            attach_visual_targets(batch, self.visual_tokenizer)
