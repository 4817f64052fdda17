"""AdamW with the official parameter groups, and the warmup-then-cosine schedule (spec §7).

No weight decay for 1-D tensors (norms, biases, tokens), for names ending in ``.bias`` and for the exact names
returned by ``model.no_weight_decay()``. Layer-wise lr decay multiplies the lr of layer ``i`` (from
``model.layer_id(name)``, 0 for embeddings, ``L + 1`` for the rest) by ``layer_decay ** (L + 1 - i)``.
The schedule rises linearly from 0 over the warmup and then follows a cosine down to ``min_lr``; it is set per
optimizer step and multiplied by each group's ``lr_scale``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

__all__ = ["build_optimizer", "build_scheduler", "lr_factor", "param_groups"]


def _num_layers(model: nn.Module) -> int | None:
    beit3 = getattr(model, "beit3", None)
    layers = getattr(beit3, "layers", None)
    return len(layers) if layers is not None else None


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into AdamW groups.

    Args:
        model: the (unwrapped) model; ``no_weight_decay()`` and ``layer_id(name)`` are used when it has them.
        weight_decay: decay of the decayed groups.
        layer_decay: lr decay per layer from the top; 1.0 gives a single scale.

    Returns:
        A list of groups with ``params``, ``weight_decay``, ``lr_scale`` and ``names`` (for inspection).
    """
    if layer_decay <= 0 or layer_decay > 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    num_layers = _num_layers(model)
    use_ld = layer_decay != 1.0
    if use_ld and (num_layers is None or not hasattr(model, "layer_id")):
        raise ValueError("layer_decay != 1 needs a model with beit3.layers and layer_id(name)")
    groups: dict[tuple[str, int], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip
        layer = model.layer_id(name) if use_ld else 0
        scale = layer_decay ** (num_layers + 1 - layer) if use_ld else 1.0
        key = ("no_decay" if no_decay else "decay", layer)
        g = groups.setdefault(
            key,
            {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale},
        )
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    layer_decay: float = 1.0,
    fused: bool = True,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; each group's lr is ``lr * lr_scale``.

    ``fused=True`` uses the fused kernel when this torch build supports it for the parameters' device (on CPU it
    is several times faster than the default ``foreach`` path); otherwise the default is used.
    """
    groups = param_groups(model, weight_decay, layer_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
        g["initial_lr"] = g["lr"]
    kwargs: dict[str, Any] = {"lr": lr, "betas": tuple(betas), "eps": eps}
    if fused and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # fused kernel unavailable for this device/dtype
            pass
    return torch.optim.AdamW(groups, **kwargs)


def lr_factor(step: int, max_steps: int, warmup_steps: int, peak_lr: float, min_lr: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based).

    Linear from 0 over ``warmup_steps``, then a cosine from 1 down to ``min_lr / peak_lr`` at ``max_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    floor = min(min_lr / peak_lr, 1.0)
    span = max(max_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Factor:
    """Picklable lr lambda (so a scheduler can be deep-copied and its state saved)."""

    def __init__(self, max_steps: int, warmup_steps: int, peak_lr: float, min_lr: float) -> None:
        self.args = (max_steps, warmup_steps, peak_lr, min_lr)

    def __call__(self, step: int) -> float:
        return lr_factor(step, *self.args)


def build_scheduler(
    optimizer: torch.optim.Optimizer, max_steps: int, warmup_steps: int, peak_lr: float, min_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_factor`; call ``step()`` once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Factor(max_steps, warmup_steps, peak_lr, min_lr))
