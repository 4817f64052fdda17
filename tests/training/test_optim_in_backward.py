"""AdamW fused into backward (``OptimizerInBackward``, ``optim.in_backward``) against plain AdamW + ``step()``:
the same weights, no gradient left after backward, the same checkpoint format in both directions, hooks that
can be removed, and the trainer option with its validation."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from standin import (
    CHAR_MASK,
    CHAR_VOCAB,
    STANDIN_OVERRIDES,
    ColourTokenizer,
    StandInPretraining,
    char_encode,
    make_sources,
)

from imglish.training.checkpoint import CheckpointManager
from imglish.training.config import build_config
from imglish.training.optim import OptimizerInBackward, build_optimizer, build_scheduler
from imglish.training.parallel import DistInfo
from imglish.training.pretrain import pretrain
from imglish.training.trainer import Trainer

LR, WD, LAYER_DECAY = 1e-2, 0.05, 0.5


def _model() -> StandInPretraining:
    torch.manual_seed(0)
    return StandInPretraining(CHAR_VOCAB, 8, 32, 8, depth=2)


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        {
            "image": torch.rand(4, 3, 32, 32, generator=g),
            "text_ids": torch.randint(0, CHAR_VOCAB, (4, 10), generator=g),
            "image_mask": torch.rand(4, 16, generator=g) < 0.5,
            "text_mask": torch.rand(4, 10, generator=g) < 0.5,
            "mim_target": torch.randint(0, 8, (64,), generator=g),
            "mlm_target": torch.randint(0, CHAR_VOCAB, (40,), generator=g),
        }
        for _ in range(n)
    ]


def _loss(model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(
        image=b["image"], text_ids=b["text_ids"], image_mask=b["image_mask"], text_mask=b["text_mask"]
    )
    mim = nn.functional.cross_entropy(out.mim_logits, b["mim_target"][: out.mim_logits.shape[0]])
    mlm = nn.functional.cross_entropy(out.mlm_logits, b["mlm_target"][: out.mlm_logits.shape[0]])
    return mim + mlm


def _build(model: nn.Module, in_backward: bool, fused: bool = True):
    opt = build_optimizer(model, LR, WD, layer_decay=LAYER_DECAY, fused=fused, in_backward=in_backward)
    return opt, build_scheduler(opt, max_steps=8, warmup_steps=2, peak_lr=LR, min_lr=1e-4)


def _train(model, opt, sched, batches, check_grads_freed: bool = False) -> list[float]:
    """The plain loop (backward, step, zero_grad, scheduler step), whichever optimizer it is given."""
    losses = []
    for b in batches:
        loss = _loss(model, b)
        loss.backward()
        if check_grads_freed:
            assert all(p.grad is None for p in model.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
    return losses


def _same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


# ----------------------------------------------------------------------------- the optimizer
@pytest.mark.parametrize("fused", [True, False])
def test_updates_in_backward_equal_plain_adamw(fused):
    """Five steps through warmup and cosine, decayed and non-decayed groups, four lr scales from layer decay.

    Bitwise equal: each inner AdamW runs the same per-element arithmetic on the same tensors as the plain AdamW
    over the whole group (the fused kernel and the single-tensor path both work tensor by tensor)."""
    plain, fast = _model(), _model()
    opt_a, sched_a = _build(plain, in_backward=False, fused=fused)
    opt_b, sched_b = _build(fast, in_backward=True, fused=fused)
    assert isinstance(opt_b, OptimizerInBackward) and isinstance(opt_b, torch.optim.Optimizer)
    assert len({g["lr_scale"] for g in opt_b.param_groups}) == 4
    assert {g["weight_decay"] for g in opt_b.param_groups} == {0.0, WD}
    start = [p.detach().clone() for p in fast.parameters()]
    batches = _batches(5)
    la = _train(plain, opt_a, sched_a, batches)
    lb = _train(fast, opt_b, sched_b, batches, check_grads_freed=True)
    assert la == lb
    assert all(not torch.equal(p, s) for p, s in zip(fast.parameters(), start, strict=True))  # all moved
    assert _same_params(plain, fast)
    # the schedule drives the wrapper's groups exactly as it drives AdamW's
    assert [g["lr"] for g in opt_a.param_groups] == [g["lr"] for g in opt_b.param_groups]
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys() == set(range(sum(1 for _ in fast.parameters())))
    for i, st in sa["state"].items():
        assert st.keys() == sb["state"][i].keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(st[k], sb["state"][i][k]) for k in st)


@pytest.mark.parametrize("first, then", [(True, False), (False, True)])
def test_checkpoint_moves_between_plain_and_in_backward(first, then, tmp_path):
    """Three steps with one optimizer, a checkpoint on disk, two more with the other: the same weights as five
    uninterrupted plain steps."""
    batches = _batches(5)
    ref = _model()
    _train(ref, *_build(ref, in_backward=False), batches)

    model = _model()
    opt, sched = _build(model, in_backward=first)
    _train(model, opt, sched, batches[:3])
    path = tmp_path / "ckpt.pt"
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, path
    )
    state = torch.load(path, weights_only=True)
    resumed = _model()
    resumed.load_state_dict(state["model"])
    opt2, sched2 = _build(resumed, in_backward=then)
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    _train(resumed, opt2, sched2, batches[3:], check_grads_freed=then)
    assert _same_params(ref, resumed)


def test_remove_hooks_gives_back_ordinary_gradients():
    model = _model()
    opt, _ = _build(model, in_backward=True)
    b = _batches(1)[0]
    _loss(model, b).backward()
    assert all(p.grad is None for p in model.parameters())
    assert opt.hooks_active
    opt.remove_hooks()
    assert not opt.hooks_active
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, b).backward()
    first = [p.grad.clone() for p in model.parameters()]
    _loss(model, b).backward()  # gradients accumulate again, and backward no longer updates anything
    assert all(torch.allclose(p.grad, 2 * g) for p, g in zip(model.parameters(), first, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    opt.step()  # still a no-op
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert len(opt.state_dict()["state"]) == len(before)  # the state of the first step is kept


def test_frozen_parameters_are_skipped_and_duplicates_rejected():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    net[0].weight.requires_grad_(False)
    opt = OptimizerInBackward(net.parameters(), lr=0.1)
    assert [tuple(p.shape) for p in opt.param_groups[0]["params"]] == [(4,), (2, 4), (2,)]
    frozen = net[0].weight.detach().clone()
    net(torch.randn(5, 3)).sum().backward()
    assert torch.equal(net[0].weight, frozen) and len(opt.state) == 3
    opt.remove_hooks()

    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="listed twice"):
        OptimizerInBackward([{"params": [other.weight]}, {"params": [other.bias, other.weight]}])
    with pytest.raises(ValueError, match="listed twice"):
        OptimizerInBackward([other.weight, other.weight])
    with pytest.raises(TypeError, match="single tensor"):
        OptimizerInBackward(other.weight)
    # nothing was left registered by the failed constructions
    other(torch.randn(1, 2)).sum().backward()
    assert other.weight.grad is not None


# ----------------------------------------------------------------------------- the trainer option
BASE = dict(
    STANDIN_OVERRIDES,
    **{
        "schedule.warmup_steps": 1,
        "checkpoint.save_every": 0,
        "optim.clip_grad": "0",
        "optim.layer_decay": 0.5,
    },
)


def _run(out: Path, steps: int, loss_hook=None, on_step=None, **overrides):
    ov = dict(BASE, out=str(out), **{"schedule.max_steps": steps})
    ov.update({k.replace("__", "."): v for k, v in overrides.items()})
    cfg = build_config("tiny", overrides=ov)
    torch.manual_seed(0)
    summary = pretrain(
        cfg,
        model=StandInPretraining(CHAR_VOCAB, 8, 32, 8),
        visual_tokenizer=ColourTokenizer(8),
        text_encode=char_encode,
        sources=make_sources(48, 32, seed=1),
        vocab_size=CHAR_VOCAB,
        mask_id=CHAR_MASK,
        loss_hook=loss_hook,
        on_step=on_step,
    )
    state = CheckpointManager.load(CheckpointManager(out / "checkpoints").latest())
    return summary, state


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """The reference: the normal trainer path, no clipping, 4 steps."""
    return _run(tmp_path_factory.mktemp("plain") / "run", 4)


def test_trainer_in_backward_matches_the_normal_path(plain_run, tmp_path):
    summary, state = _run(tmp_path / "inb", 4, optim__in_backward="true")
    ref_summary, ref_state = plain_run
    assert state["model"].keys() == ref_state["model"].keys()
    assert all(torch.equal(state["model"][k], ref_state["model"][k]) for k in state["model"])
    assert [r["loss"] for r in summary.history] == [r["loss"] for r in ref_summary.history]
    assert all(math.isnan(r["grad_norm"]) for r in summary.history)  # no global norm in this mode
    assert all(math.isfinite(r["grad_norm"]) for r in ref_summary.history)
    assert state["optimizer"]["param_groups"] == ref_state["optimizer"]["param_groups"]


class _Stop(Exception):
    pass


def test_trainer_resumes_an_in_backward_checkpoint_without_it(plain_run, tmp_path):
    """Steps 1-2 with the option (checkpoint at 2, the run then stops during step 3), steps 3-4 without it."""

    def stop_at_3(trainer, row):
        if row["step"] == 3:
            raise _Stop

    out = tmp_path / "mixed"
    with pytest.raises(_Stop):
        _run(out, 4, on_step=stop_at_3, optim__in_backward="true", checkpoint__save_every="2")
    assert [s for s, _ in CheckpointManager(out / "checkpoints").list()] == [2]
    _, state = _run(out, 4, checkpoint__resume="true")
    ref = plain_run[1]["model"]
    assert all(torch.equal(state["model"][k], ref[k]) for k in ref)


def test_trainer_in_backward_skips_a_non_finite_loss_before_backward(tmp_path):
    """A NaN loss at step 1: no backward runs, so the weights are untouched; the same as the normal path."""

    def hook(step, loss):
        return loss * float("nan") if step == 1 else loss

    a, sa = _run(tmp_path / "plain", 3, loss_hook=hook)
    b, sb = _run(tmp_path / "inb", 3, loss_hook=hook, optim__in_backward="true")
    assert a.skipped_steps == b.skipped_steps == 1
    assert [r["skipped"] for r in b.history] == [0.0, 1.0, 0.0]
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"optim.clip_grad": "3.0"}, r"optim.in_backward=true needs optim.clip_grad none or 0, got 3.0"),
        ({"optim.accum_steps": "2"}, r"optim.in_backward=true needs optim.accum_steps=1, got 2"),
        ({"parallel.strategy": "ddp"}, r"needs a single process .*parallel.strategy='ddp'"),
        ({"parallel.strategy": "fsdp"}, r"needs a single process .*parallel.strategy='fsdp'"),
    ],
)
def test_config_rejects_in_backward_with_clipping_accumulation_or_ddp(overrides, message):
    ov = dict(BASE, **{"optim.in_backward": "true"}, **overrides)
    with pytest.raises(ValueError, match=message):
        build_config("tiny", overrides=ov)
    build_config("tiny", overrides=dict(ov, **{"optim.in_backward": "false"}))  # fine without the option


def test_trainer_rejects_in_backward_on_several_processes():
    cfg = build_config("tiny", overrides=dict(BASE, **{"optim.in_backward": "true"}))
    with pytest.raises(ValueError, match="needs a single process, but this run has 2"):
        Trainer(cfg, StandInPretraining(CHAR_VOCAB, 8, 32, 8), dataset=None, dist_info=DistInfo(world_size=2))
