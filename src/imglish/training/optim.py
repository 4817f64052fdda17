"""AdamW with the official parameter groups, and the warmup-then-cosine schedule (spec §7).

No weight decay for 1-D tensors (norms, biases, tokens), for names ending in ``.bias`` and for the exact names
returned by ``model.no_weight_decay()``. Layer-wise lr decay multiplies the lr of layer ``i`` (from
``model.layer_id(name)``, 0 for embeddings, ``L + 1`` for the rest) by ``layer_decay ** (L + 1 - i)``.
The schedule rises linearly from 0 over the warmup and then follows a cosine down to ``min_lr``; it is set per
optimizer step and multiplied by each group's ``lr_scale``.

:class:`OptimizerInBackward` is the same AdamW with each parameter's update run inside the backward pass, as soon as
that parameter's gradient is complete, after which the gradient is freed: the full set of gradients never exists at
once, which lowers the peak memory of a training step by about the size of the weights (4 bytes per fp32
parameter). It suits recipes without gradient clipping or accumulation (spec §7: the fine-tuning recipes).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["OptimizerInBackward", "build_optimizer", "build_scheduler", "lr_factor", "param_groups"]


def _num_layers(model: nn.Module) -> int | None:
    beit3 = getattr(model, "beit3", None)
    layers = getattr(beit3, "layers", None)
    return len(layers) if layers is not None else None


def param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float = 1.0, head_lr_weight: float = 1.0
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into AdamW groups.

    Args:
        model: the (unwrapped) model; ``no_weight_decay()`` and ``layer_id(name)`` are used when it has them.
        weight_decay: decay of the decayed groups.
        layer_decay: lr decay per layer from the top; 1.0 gives a single scale.
        head_lr_weight: lr factor of the parameters whose name starts with ``head`` (the official
            ``--task_head_lr_weight``: 20 for VQA, whose ``pooler`` is not boosted; spec §7).

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
        boosted = head_lr_weight != 1.0 and name.startswith("head")
        if boosted:
            scale *= head_lr_weight
        key = ("no_decay" if no_decay else "decay", layer, boosted)
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
    in_backward: bool = False,
    head_lr_weight: float = 1.0,
) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`; each group's lr is ``lr * lr_scale``.

    ``fused=True`` uses the fused kernel when this torch build supports it for the parameters' device (on CPU it
    is several times faster than the default ``foreach`` path); otherwise the default is used.

    Args:
        model: the (unwrapped) model.
        lr: peak learning rate (before ``lr_scale``).
        weight_decay: decay of the decayed groups.
        betas: Adam betas.
        eps: Adam epsilon.
        layer_decay: layer-wise lr decay (see :func:`param_groups`).
        fused: try the fused AdamW kernel first.
        head_lr_weight: lr factor of ``head*`` parameters (see :func:`param_groups`).
        in_backward: return an :class:`OptimizerInBackward` (updates inside ``backward()``, gradients freed one
            parameter at a time, ``step()`` a no-op) instead of a ``torch.optim.AdamW``; both hold the same groups
            and write the same ``state_dict`` format.

    Returns:
        A ``torch.optim.AdamW``, or an :class:`OptimizerInBackward` when ``in_backward`` is true.
    """
    groups = param_groups(model, weight_decay, layer_decay, head_lr_weight)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
        g["initial_lr"] = g["lr"]
    kwargs: dict[str, Any] = {"lr": lr, "betas": tuple(betas), "eps": eps}
    cls: Callable[..., torch.optim.Optimizer] = OptimizerInBackward if in_backward else torch.optim.AdamW
    if fused and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        try:
            return cls(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # fused kernel unavailable for this device/dtype
            pass
    return cls(groups, **kwargs)


_ADAMW_ARGS = frozenset(inspect.signature(torch.optim.AdamW).parameters) - {"params"}


class OptimizerInBackward(torch.optim.Optimizer):
    """AdamW whose update of each parameter runs inside ``backward()``, as soon as that parameter's gradient is
    complete; the gradient is then freed (``p.grad = None``).

    Each trainable parameter gets its own ``torch.optim.AdamW`` and a post-accumulate-grad hook
    (``Tensor.register_post_accumulate_grad_hook``). The hook copies the current hyperparameters of the
    parameter's group (``lr``, ``betas``, ``eps``, ``weight_decay``, ...) from this object's ``param_groups`` into
    that inner optimizer and steps it. The result equals ``torch.optim.AdamW`` over the same groups followed by
    ``step()`` after backward, with one gradient tensor alive at a time instead of all of them.

    This object is a real ``torch.optim.Optimizer``: its ``param_groups`` are the groups (a ``LambdaLR`` or
    :func:`build_scheduler` changes their ``lr`` as usual, and the next backward uses it), and its ``state`` holds
    the AdamW state of every parameter (the inner optimizers share it). :meth:`state_dict` and
    :meth:`load_state_dict` therefore read and write exactly the format of a plain ``torch.optim.AdamW`` over the
    same groups (``state[i]`` with ``step``, ``exp_avg``, ``exp_avg_sq``, ``i`` the parameter's index in group
    order), so a checkpoint moves freely between the two.

    Limits, by construction: no global operation on all gradients is possible (no gradient clipping by global
    norm, no check that all gradients are finite, no gradient accumulation over several backward passes: each
    backward is one optimizer step), and a data-parallel wrapper that reduces gradients after they are
    accumulated (DDP, FSDP) would see them updated before its reduction. Parameters that receive no gradient in
    a backward are not updated (as with plain AdamW and ``zero_grad(set_to_none=True)``).

    Args:
        params: parameters or parameter groups (dicts with ``params`` and any per-group hyperparameters, such as
            the output of :func:`param_groups`); parameters that do not require grad are skipped.
        lr: default learning rate.
        betas: default Adam betas.
        eps: default Adam epsilon.
        weight_decay: default decoupled weight decay.
        fused: passed to each inner ``torch.optim.AdamW`` (``True`` raises there when the kernel is unavailable for
            a parameter's device or dtype; :func:`build_optimizer` then falls back to the default).

    Raises:
        ValueError: if a parameter is listed more than once.
        TypeError: if ``params`` holds something other than tensors or group dicts.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        fused: bool | None = None,
    ) -> None:
        groups = _clean_groups(params)
        super().__init__(groups, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self._inner: dict[torch.Tensor, tuple[int, torch.optim.AdamW]] = {}
        for gi, group in enumerate(self.param_groups):
            hyper = {"fused": fused, **{k: v for k, v in group.items() if k in _ADAMW_ARGS}}
            for p in group["params"]:
                inner = torch.optim.AdamW([p], **hyper)
                inner.state = self.state  # one state for all: this object's state_dict sees every parameter
                self._inner[p] = (gi, inner)
            if group["params"]:  # the remaining AdamW defaults (amsgrad, maximize, foreach, fused, ...)
                for k, v in self._inner[group["params"][0]][1].param_groups[0].items():
                    group.setdefault(k, v)
                    self.defaults.setdefault(k, v)
        self._handles = [p.register_post_accumulate_grad_hook(self._update) for p in self._inner]

    def _update(self, p: torch.Tensor) -> None:
        """The hook: step ``p``'s AdamW with its group's current hyperparameters, then free ``p.grad``."""
        gi, inner = self._inner[p]
        group = self.param_groups[gi]  # looked up each time: load_state_dict replaces the group dicts
        inner_group = inner.param_groups[0]
        for k in _ADAMW_ARGS:
            if k in group:
                inner_group[k] = group[k]
        inner.state = self.state  # and the state dict
        inner.step()
        p.grad = None

    @property
    def hooks_active(self) -> bool:
        """Whether the backward hooks are still registered (see :meth:`remove_hooks`)."""
        return bool(self._handles)

    def remove_hooks(self) -> None:
        """Remove the backward hooks: from now on gradients accumulate in ``.grad`` as usual and no update runs.

        The state and groups stay, so :meth:`state_dict` still works (for example to continue with a plain
        ``torch.optim.AdamW``).
        """
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Do nothing: every update already happened during ``backward()``.

        Kept so that a training loop written for a plain optimizer (``backward``, ``step``, ``zero_grad``,
        scheduler ``step``) runs unchanged. A ``closure`` is evaluated with grad enabled (its backward runs the
        updates) and its value returned.
        """
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


def _clean_groups(params: Iterable[torch.Tensor] | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups as dicts without frozen parameters; raise on a parameter listed twice."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or of group dicts, got a single tensor")
    items = list(params)
    if not items:
        raise ValueError("params is empty: OptimizerInBackward needs at least one parameter")
    raw = [dict(g) for g in items] if isinstance(items[0], dict) else [{"params": items}]
    seen: dict[int, int] = {}
    groups = []
    for gi, g in enumerate(raw):
        if not isinstance(g, dict) or "params" not in g:
            raise TypeError(
                f"params: group {gi} must be a dict with a 'params' entry, got {type(g).__name__}"
            )
        plist = [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])
        kept = []
        for p in plist:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params: group {gi} holds a {type(p).__name__}, expected tensors")
            if id(p) in seen:
                raise ValueError(
                    f"params: a parameter of shape {tuple(p.shape)} is listed twice (group {seen[id(p)]} and "
                    f"group {gi}); each parameter may appear only once, or it would be updated twice"
                )
            seen[id(p)] = gi
            if p.requires_grad:
                kept.append(p)
        g["params"] = kept
        groups.append(g)
    return groups


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
