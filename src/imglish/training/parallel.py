"""Distributed execution, applied from outside the single-device model (STYLE R12).

Order (torchtitan's, kept fixed): activation checkpointing, then ``torch.compile`` per block, then FSDP2
(``fully_shard`` on each block, then on the root) or DDP. Activation checkpointing goes through the model's own
``set_grad_checkpointing`` and compile through ``nn.Module.compile`` (in place), so neither changes parameter
names and checkpoints stay in the unwrapped layout. Everything here works on CPU with the gloo backend.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "DistributedTimeout",
    "all_gather_objects",
    "all_reduce_sum",
    "apply_ac",
    "apply_compile",
    "apply_ddp",
    "apply_fsdp",
    "barrier",
    "broadcast_object",
    "destroy_distributed",
    "init_distributed",
    "launched_rank",
    "resolve_device",
]


@dataclass
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``; ``local_rank`` on its host."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` gives this process's CUDA device when CUDA is available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("parallel.device is 'cuda' but CUDA is not available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"device must be auto, cpu or cuda; got {name!r}")
    return torch.device("cpu")


#: how long a collective waits for the other ranks unless told otherwise (``parallel.timeout_s``)
DEFAULT_TIMEOUT_S = 1800.0


class DistributedTimeout(TimeoutError):
    """A rank waited longer than its timeout for the others (the message says what it waited for)."""


def init_distributed(backend: str | None = None, device: torch.device | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).

    Without those variables (a plain ``python`` run) nothing is initialised and rank 0 of 1 is returned.

    Args:
        backend: ``gloo``, ``nccl``, ...; ``None`` picks nccl for CUDA devices and gloo otherwise.
        device: the device this process will compute on.
        timeout_s: how long a collective (and a :func:`barrier` without its own timeout) waits for the other
            ranks before failing: a rank that died or hangs stops the others after this long at most.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def launched_rank() -> int:
    """This process's rank as torchrun set it (``RANK``; 0 in a plain run), without needing a process group."""
    return int(os.environ.get("RANK", "0"))


def destroy_distributed() -> None:
    """Leave the process group if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "beit3", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError("expected a model with beit3.layers (an nn.ModuleList of transformer blocks)")
    return layers


def apply_ac(model: nn.Module, mode: bool | str = True) -> None:
    """Activation recomputation through the model's own gradient checkpointing: True/"full" recomputes every
    transformer block in backward, "selective" only its norms, GELU and adds (see `BEiT3.set_grad_checkpointing`)."""
    model.beit3.set_grad_checkpointing(mode)


def apply_compile(model: nn.Module, **compile_kwargs: Any) -> None:
    """``torch.compile`` each transformer block in place; identical blocks share one compiled graph."""
    for block in _layers(model):
        block.compile(**compile_kwargs)


def apply_fsdp(
    root: nn.Module,
    model: nn.Module,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> nn.Module:
    """FSDP2: ``fully_shard`` each block of ``model.beit3.layers``, then ``root`` (which contains ``model``).

    Args:
        root: the module whose forward is called by the trainer (for example the loss wrapper).
        model: the BEiT-3 model inside ``root`` whose blocks are sharded one by one.
        param_dtype: compute dtype of the unsharded parameters (``None``: keep fp32 and rely on autocast).
        reduce_dtype: dtype of the gradient reduce-scatter.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in _layers(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(root, mp_policy=mp)
    return root


def apply_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """Wrap in ``DistributedDataParallel`` (gradients all-reduced and averaged over ranks)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op without a process group); returns ``t``."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(what: str = "the other ranks", timeout_s: float | None = None) -> None:
    """Wait for every rank (a no-op without a process group), at most ``timeout_s`` seconds (default: the process
    group's timeout, ``parallel.timeout_s``).

    Args:
        what: what the ranks wait for, named in the error (``"rank 0 to train the text tokenizer"``).
        timeout_s: the longest wait.

    Raises:
        DistributedTimeout: the wait took longer, or another rank failed while this one waited; the message names
            ``what``, this rank and the time waited.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    start = time.monotonic()
    try:
        work = dist.barrier(async_op=True)
        if timeout_s:
            work.wait(datetime.timedelta(seconds=timeout_s))
        else:
            work.wait()
    except RuntimeError as err:
        waited = time.monotonic() - start
        detail = " ".join(str(err).split())
        limit = f"{timeout_s:g} s" if timeout_s else "parallel.timeout_s"
        raise DistributedTimeout(
            f"rank {dist.get_rank()} of {dist.get_world_size()} stopped waiting for {what} after {waited:.0f} s "
            f"(limit {limit}): {detail[:300]}"
        ) from None
