"""The one training loop of every task: micro-batches, accumulation, clipping, bf16 autocast, non-finite skips,
checkpoints, logs, periodic evaluation.

:class:`Trainer` is built from a validated :class:`TrainConfig`, an (unwrapped, single-device) model, a
:class:`StepBatches` dataset and a *task*: an object with ``terms``, ``step_module(model)`` (the module whose
``forward(batch, denominators, step)`` returns an :class:`imglish.tasks.StepOutput`), ``count_targets(batch, step)``,
``prepare(batch)`` and ``term_weight(term)`` (:class:`imglish.tasks.Task` for fine-tuning,
:class:`imglish.tasks.pretraining.PretrainingTask` for masked data modeling, the default). The trainer never imports
a task module. It applies the parallelism itself (``training.parallel``), so neither the model nor the task knows
about it.

One optimizer step:

1. read this rank's ``accum_steps`` micro-batches of the step;
2. count the targets of each loss term (tokens or examples) over the *global* batch (an all-reduce of a few
   integers) and divide every term's loss sum by ``global_count / world_size``: the accumulated, rank-averaged
   gradient is then exactly that of the mean over the global batch, for any number of processes;
3. forward and backward each micro-batch (DDP synchronises only on the last one), under bf16 autocast if asked;
4. if the loss or the gradient norm is not finite on any rank, drop the gradients, count the step as skipped and
   move on (the weights are untouched); after ``optim.max_bad_steps`` such steps in a row stop with
   :class:`NonFiniteLossError`, leaving the last checkpoint (which holds good weights) in place;
5. otherwise clip, step AdamW and the schedule.

With ``optim.in_backward`` (one process, no clipping, no accumulation) AdamW updates each parameter inside backward
and frees its gradient (:class:`imglish.training.optim.OptimizerInBackward`): a non-finite loss is caught before
backward, which is then not run (the step is skipped as above), but the gradient-norm check of step 4 does not
exist in this mode (``grad_norm`` is logged as NaN), so non-finite gradients with a finite loss are not caught.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imglish.tasks.pretraining import PretrainingTask
from imglish.training import parallel
from imglish.training.checkpoint import CheckpointManager, get_rng_state, set_rng_state
from imglish.training.config import TrainConfig, config_to_dict
from imglish.training.optim import build_optimizer, build_scheduler
from imglish.training.streams import StepBatches, make_step_loader, move_to_device, pop_skipped

__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "to_device"]


class NonFiniteLossError(RuntimeError):
    """Raised when too many optimizer steps in a row had a NaN or infinite loss or gradient."""


@dataclass
class TrainResult:
    """What a finished :meth:`Trainer.train` reports.

    Attributes:
        step: optimizer steps done (including skipped ones).
        skipped_steps: steps skipped for a non-finite loss or gradient.
        history: one dict per logged step: ``step``, ``lr``, ``loss``, ``loss/<term>``, ``acc/<term>``, ...
        samples_per_s: mean training throughput of this run (all ranks, all streams).
        elapsed_s: wall time of the loop.
        stopped_early: the loop ended before ``schedule.max_steps`` because of ``schedule.time_limit_s``.
    """

    step: int
    skipped_steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    samples_per_s: float = 0.0
    elapsed_s: float = 0.0
    stopped_early: bool = False


def to_device(
    batch: dict[str, dict[str, torch.Tensor]], device: torch.device
) -> dict[str, dict[str, torch.Tensor]]:
    """Move every tensor of a ``{stream: {key: value}}`` batch to ``device``; values may also be lists or dicts of
    tensors (the per-image targets of detection)."""
    return {s: {k: move_to_device(v, device) for k, v in part.items()} for s, part in batch.items()}


class Trainer:
    """Runs the training loop of a task for one process (rank) of a run.

    Args:
        cfg: the validated configuration.
        model: the unwrapped model (``no_weight_decay``, ``layer_id``, ``beit3.layers``).
        dataset: the micro-batches of this rank.
        visual_tokenizer: pretraining only, when ``task`` is not given: module with
            ``get_codebook_indices(images_in_0_1) -> (B, N)``, or ``None``.
        dist_info: this process's place in the run.
        device: where to compute.
        loss_hook: optional ``(step, loss) -> loss`` applied before backward (used by tests to inject NaNs).
        task: the task (see the module docstring); default: masked data modeling with ``cfg.objective``'s weights.
        evaluator: optional ``(trainer) -> {metric: value}`` run on every rank every ``task.eval_every`` steps;
            its values are logged as ``eval/<metric>`` rows of ``history.jsonl`` and TensorBoard.
        desc: the progress bar's label (default: the task's name).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        dataset: StepBatches,
        visual_tokenizer: Any = None,
        dist_info: parallel.DistInfo | None = None,
        device: torch.device | None = None,
        loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        task: Any = None,
        evaluator: Callable[[Trainer], dict[str, float]] | None = None,
        desc: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.dist = dist_info or parallel.DistInfo()
        self.device = device or torch.device("cpu")
        self.out = Path(cfg.out)
        self.dataset = dataset
        self.loss_hook = loss_hook
        self.model = model.to(self.device)
        self.visual_tokenizer = visual_tokenizer
        if visual_tokenizer is not None:
            self.visual_tokenizer = visual_tokenizer.to(self.device).eval()
            for p in self.visual_tokenizer.parameters():
                p.requires_grad_(False)
        if task is None:
            o = cfg.objective
            task = PretrainingTask(
                {"image": o.image_weight, "text": o.text_weight, "pair": o.pair_weight}, self.visual_tokenizer,
                cls_weight=o.cls_head_weight if o.cls_head_layers else 0.0,
            )
        self.task = task
        self.terms: list[str] = list(task.terms)
        self.evaluator = evaluator
        self.desc = desc or getattr(task, "name", "train")
        self.loss_module = task.step_module(self.model)
        self.strategy = cfg.parallel.strategy
        if self.strategy == "auto":
            self.strategy = "ddp" if self.dist.distributed else "none"
        if self.strategy in ("ddp", "fsdp") and not self.dist.distributed:
            self.strategy = "none"  # one process: nothing to distribute
        self.in_backward = cfg.optim.in_backward
        if self.in_backward and self.dist.distributed:
            raise ValueError(
                f"optim.in_backward=true needs a single process, but this run has {self.dist.world_size}: DDP and "
                "FSDP reduce the gradients across processes after the per-parameter update would already have run"
            )
        # Fixed order: activation checkpointing, compile, then FSDP or DDP.
        if cfg.parallel.activation_checkpointing not in (False, "none"):
            parallel.apply_ac(self.model, cfg.parallel.activation_checkpointing)
        if cfg.parallel.compile:
            parallel.apply_compile(self.model, backend=cfg.parallel.compile_backend)
        self.step_module: nn.Module = self.loss_module
        if self.strategy == "fsdp":
            parallel.apply_fsdp(self.loss_module, self.model)
        elif self.strategy == "ddp":
            self.step_module = parallel.apply_ddp(
                self.loss_module, self.device, find_unused_parameters=getattr(task, "find_unused_parameters", False)
            )
        self.optimizer = build_optimizer(
            self.model,
            cfg.optim.lr,
            cfg.optim.weight_decay,
            cfg.optim.betas,
            cfg.optim.eps,
            cfg.optim.layer_decay,
            fused=cfg.optim.fused and self.strategy != "fsdp",
            in_backward=self.in_backward,
            head_lr_weight=cfg.task.head_lr_weight if cfg.task.name != "pretraining" else 1.0,
        )
        self.scheduler = build_scheduler(
            self.optimizer,
            cfg.schedule.max_steps,
            cfg.schedule.warmup_steps,
            cfg.optim.lr,
            cfg.schedule.min_lr,
        )
        self.ckpt = CheckpointManager(self.out / "checkpoints", cfg.checkpoint.keep_last)
        self.step = 0
        self.skipped_steps = 0
        self.bad_in_a_row = 0
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ state
    def _model_state(self) -> dict[str, torch.Tensor]:
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(
                self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def _optim_state(self) -> dict[str, Any]:
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(
                self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return self.optimizer.state_dict()

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (collective under FSDP: call on every rank)."""
        return {
            "model": self._model_state(),
            "optimizer": self._optim_state(),
            "scheduler": self.scheduler.state_dict(),
            "rng": parallel.all_gather_objects(get_rng_state()),
            "data": {
                "step": self.step,
                "accum_steps": self.dataset.accum_steps,
                "world_size": self.dist.world_size,
            },
            "counters": {"skipped_steps": self.skipped_steps, "bad_in_a_row": self.bad_in_a_row},
            "config": config_to_dict(self.cfg),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the model and optimizer first, the RNG states last)."""
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
            set_model_state_dict(self.model, state["model"], options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        else:
            self.model.load_state_dict(state["model"], strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["data"]["step"])
        self.skipped_steps = int(state["counters"]["skipped_steps"])
        self.bad_in_a_row = int(state["counters"]["bad_in_a_row"])
        rngs = state["rng"]
        set_rng_state(rngs[self.dist.rank] if self.dist.rank < len(rngs) else rngs[0])

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank takes part)."""
        state = self.state_dict()
        path = None
        if self.dist.is_main:
            path = self.ckpt.save(state, self.step)
        parallel.barrier(f"rank 0 to write the checkpoint of step {self.step}")
        return path

    def maybe_resume(self) -> bool:
        """Load the newest checkpoint in ``OUT/checkpoints`` if there is one; returns whether it did."""
        path = parallel.broadcast_object(str(self.ckpt.latest()) if self.ckpt.latest() else None)
        if path is None:
            return False
        self.load_state_dict(CheckpointManager.load(path))
        if self.dist.is_main:
            print(f"resumed from {path} (step {self.step})", flush=True)
        hist = self.out / "history.jsonl"
        if self.dist.is_main and hist.exists():  # keep the log consistent with the resumed step
            rows = [json.loads(line) for line in hist.read_text().splitlines() if line.strip()]
            self.history = [r for r in rows if r["step"] <= self.step]
            _write_jsonl(hist, self.history)
        return True

    # ------------------------------------------------------------------ loop
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.parallel.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _denominators(self, micro_batches: list[dict[str, dict[str, torch.Tensor]]]) -> dict[str, float]:
        counts = torch.zeros(len(self.terms), dtype=torch.float64)
        for mb in micro_batches:
            for name, n in self.task.count_targets(mb, self.step).items():
                counts[self.terms.index(name)] += n
        parallel.all_reduce_sum(counts)
        ws = self.dist.world_size
        return {name: counts[i].item() / ws for i, name in enumerate(self.terms) if counts[i] > 0}

    def train_step(self, micro_batches: list[dict[str, dict[str, torch.Tensor]]]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; returns the step's global statistics."""
        micro_batches = [to_device(mb, self.device) for mb in micro_batches]
        for mb in micro_batches:
            self.task.prepare(mb)
        denominators = self._denominators(micro_batches)
        terms = self.terms
        stats = torch.zeros(3 * len(terms) + 1, dtype=torch.float64)  # sums, counts, correct, non-finite
        self.loss_module.train()
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext()
            if self.strategy == "ddp" and not last:
                sync = self.step_module.no_sync()
            elif self.strategy == "fsdp":
                self.loss_module.set_requires_gradient_sync(last)
            with sync:
                with self._autocast():
                    out = self.step_module(mb, denominators, self.step)
                loss = out.loss
                if self.loss_hook is not None:
                    loss = self.loss_hook(self.step, loss)
                bad = not torch.isfinite(loss.detach())
                if bad:
                    stats[-1] += 1
                if not (bad and self.in_backward):  # in_backward: backward itself would update the weights
                    loss.backward()
            for j, name in enumerate(terms):
                if name in out.count:
                    stats[j] += out.loss_sum[name].cpu()
                    stats[len(terms) + j] += out.count[name]
                    if name in out.correct:
                        stats[2 * len(terms) + j] += out.correct[name].cpu()
        if self.in_backward:  # the gradients were used and freed in backward: no global norm exists
            grad_norm = math.nan
        else:
            grad_norm = self._grad_norm()
            if not math.isfinite(grad_norm):
                stats[-1] += 1
        parallel.all_reduce_sum(stats)
        finite = stats[-1].item() == 0
        lr = self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0].get("lr_scale", 1.0)
        if finite:
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:
            self.skipped_steps += 1
            self.bad_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        n = len(terms)
        row: dict[str, float] = {
            "step": self.step,
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped": float(not finite),
        }
        total = 0.0
        for j, name in enumerate(terms):
            c = stats[n + j].item()
            if c > 0:
                row[f"loss/{name}"] = stats[j].item() / c
                row[f"acc/{name}"] = stats[2 * n + j].item() / c
                total += self.task.term_weight(name) * row[f"loss/{name}"]
        row["loss"] = total
        return row

    def _periodic_eval(self, writer: Any, hist_path: Path, bar: Any) -> dict[str, float]:
        """Run the evaluator (every rank) without touching the training RNG streams; log on rank 0."""
        with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
            metrics = self.evaluator(self)
        self.loss_module.train()
        if self.dist.is_main:
            numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            row = {"step": self.step, **{f"eval/{k}": v for k, v in numeric.items()}}
            self.history.append(row)
            with open(hist_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if writer is not None:
                for k, v in row.items():
                    if k != "step":
                        writer.add_scalar(k, v, self.step)
            msg = "step {}: {}".format(self.step, ", ".join(f"{k} {v:.2f}" for k, v in numeric.items()))
            if bar is not None:
                bar.write(msg)
        return metrics

    def _grad_norm(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.optim.clip_grad
        max_norm = clip if clip else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def train(self, on_step: Callable[[Trainer, dict[str, float]], None] | None = None) -> TrainResult:
        """Run from the current step to ``schedule.max_steps``.

        Args:
            on_step: optional callback after every step (tests use it to stop a run half way).

        Raises:
            NonFiniteLossError: after ``optim.max_bad_steps`` non-finite steps in a row.
        """
        cfg = self.cfg
        max_steps = cfg.schedule.max_steps
        writer = None
        if self.dist.is_main and cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step + 1)
        bar = None
        if self.dist.is_main and cfg.logging.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=max_steps, initial=self.step, desc=self.desc, unit="step", dynamic_ncols=True)
        loader = make_step_loader(self.dataset, self.step, max_steps, cfg.data.num_workers)
        # Starting a DataLoader draws a base seed from torch's global RNG; samples are seeded by their slot anyway, so
        # keep that draw away from the stream the model's own randomness (drop path) reads, which a resume restores.
        with torch.random.fork_rng(devices=[]):
            it = iter(loader)
        samples_per_step = sum(self.dataset.batch_sizes.values())
        start_step, t0 = self.step, time.perf_counter()
        stopped_early = False
        t_last = t0
        hist_path = self.out / "history.jsonl"
        try:
            while self.step < max_steps:
                micro = [next(it) for _ in range(self.dataset.accum_steps)]
                for mb in micro:  # records skipped in a DataLoader worker are counted here, once
                    skipped = pop_skipped(mb)
                    if skipped and hasattr(self.dataset.skip_counter, "absorb"):
                        self.dataset.skip_counter.absorb(skipped)
                row = self.train_step(micro)
                now = time.perf_counter()
                row["samples_per_s"] = samples_per_step / max(now - t_last, 1e-9)
                t_last = now
                if row["skipped"]:
                    msg = (
                        f"step {self.step}: non-finite loss or gradient, step skipped "
                        f"({self.bad_in_a_row} in a row, {self.skipped_steps} in total)"
                    )
                    if bar is not None:
                        bar.write(msg)
                    if self.bad_in_a_row >= cfg.optim.max_bad_steps:
                        raise NonFiniteLossError(
                            f"{self.bad_in_a_row} optimizer steps in a row had a NaN or infinite loss or gradient "
                            f"(limit optim.max_bad_steps={cfg.optim.max_bad_steps}); stopping at step {self.step}. "
                            f"The last good checkpoint is kept in {self.ckpt.directory}."
                        )
                if self.dist.is_main:
                    log_now = (
                        self.step % cfg.logging.log_every == 0 or self.step == max_steps or self.step == 1
                    )
                    if log_now:
                        self.history.append(row)
                        with open(hist_path, "a") as f:
                            f.write(json.dumps(row) + "\n")
                        if writer is not None:
                            for k, v in row.items():
                                if k != "step":
                                    writer.add_scalar(k if "/" in k else f"train/{k}", v, self.step)
                    if bar is not None:
                        post = {
                            n.replace(".", "_"): f"{row[f'loss/{n}']:.3f}" for n in self.terms if f"loss/{n}" in row
                        }
                        post["samples/s"] = f"{row['samples_per_s']:.0f}"
                        if self.skipped_steps:
                            post["skipped"] = self.skipped_steps
                        bar.set_postfix(post, refresh=False)
                        bar.update(1)
                if on_step is not None:
                    on_step(self, row)
                eval_every = cfg.task.eval_every if self.evaluator is not None else 0
                if eval_every and self.step % eval_every == 0 and self.step < max_steps:
                    self._periodic_eval(writer, hist_path, bar)
                every = cfg.checkpoint.save_every
                limit = cfg.schedule.time_limit_s
                # every rank takes rank 0's decision, so that all stop at the same step
                out_of_time = (
                    bool(
                        parallel.broadcast_object(
                            limit > 0 and time.perf_counter() - t0 >= limit and self.step < max_steps
                        )
                    )
                    if limit > 0
                    else False
                )
                if self.bad_in_a_row == 0 and (
                    self.step == max_steps or (every and self.step % every == 0) or out_of_time
                ):
                    self.save_checkpoint()
                if out_of_time:
                    stopped_early = True
                    msg = (
                        f"schedule.time_limit_s={limit:g} reached: stopping at step {self.step} of {max_steps} "
                        f"(a checkpoint was written; --resume continues)"
                    )
                    if bar is not None:
                        bar.write(msg)
                    elif self.dist.is_main:
                        print(msg)
                    break
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        elapsed = time.perf_counter() - t0
        done = self.step - start_step
        return TrainResult(
            step=self.step,
            skipped_steps=self.skipped_steps,
            history=list(self.history),
            samples_per_s=done * samples_per_step / elapsed if elapsed > 0 else 0.0,
            elapsed_s=elapsed,
            stopped_early=stopped_early,
        )


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
