"""Task losses against their formulas, and the contrastive loss across two processes (gloo)."""

from __future__ import annotations

import math
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from imglish.model.losses import (
    captioning_loss,
    clip_loss,
    label_smoothing_cross_entropy,
    soft_target_cross_entropy,
    vqa_loss,
)


def test_soft_target_and_label_smoothing_cross_entropy():
    logits, labels = torch.randn(5, 7), torch.tensor([0, 3, 6, 2, 2])
    one_hot = torch.nn.functional.one_hot(labels, 7).float()
    torch.testing.assert_close(soft_target_cross_entropy(logits, one_hot), torch.nn.functional.cross_entropy(logits, labels))
    # label smoothing 0.1 equals the soft target (0.9 on the label) + 0.1 uniform
    smooth = 0.9 * one_hot + 0.1 / 7
    torch.testing.assert_close(label_smoothing_cross_entropy(logits, labels, 0.1), soft_target_cross_entropy(logits, smooth))


def test_vqa_loss_is_bce_summed_over_answers():
    logits, targets = torch.randn(4, 9), torch.rand(4, 9)
    manual = -(targets * torch.log(torch.sigmoid(logits)) + (1 - targets) * torch.log(1 - torch.sigmoid(logits)))
    torch.testing.assert_close(vqa_loss(logits, targets), manual.sum(1).mean())


def test_captioning_loss_formula_and_drop_worst():
    logits, targets = torch.randn(10, 6), torch.randint(0, 6, (10,))
    logp = torch.log_softmax(logits, 1)
    q = torch.full((10, 6), 0.1 / 5)
    q[torch.arange(10), targets] = 0.9
    per_token = (q * (q.log() - logp)).sum(1)
    torch.testing.assert_close(captioning_loss(logits, targets, step=0), per_token.mean())
    torch.testing.assert_close(captioning_loss(logits, targets, step=12000), per_token.mean())  # not yet
    kept = per_token.sort().values[:8]
    torch.testing.assert_close(captioning_loss(logits, targets, step=12001), kept.mean())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, img: torch.Tensor, txt: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        half = img.shape[0] // world
        a = img[rank * half : (rank + 1) * half].clone().requires_grad_(True)
        b = txt[rank * half : (rank + 1) * half].clone().requires_grad_(True)
        loss, _, _ = clip_loss(a, b, torch.tensor(10.0))
        loss.backward()
        out[rank] = (loss.detach(), a.grad, b.grad)
    finally:
        dist.destroy_process_group()


def test_contrastive_loss_gathers_across_ranks():
    """Two ranks with half a batch each see all negatives: mean loss equals the one-process loss, and the gradients
    equal the one-process gradients scaled by the world size (each rank averages over its own rows)."""
    img = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    a, b = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    ref_loss, _, _ = clip_loss(a, b, torch.tensor(10.0))
    ref_loss.backward()
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), img, txt, out), nprocs=2, join=True)
    losses = [out[r][0] for r in range(2)]
    torch.testing.assert_close(sum(losses) / 2, ref_loss.detach(), atol=1e-5, rtol=1e-5)
    grad_img = torch.cat([out[r][1] for r in range(2)])
    grad_txt = torch.cat([out[r][2] for r in range(2)])
    # DDP averages gradients over ranks; the per-rank gradients summed over ranks, divided by 2, match one process
    torch.testing.assert_close(grad_img / 2, a.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_txt / 2, b.grad, atol=1e-5, rtol=1e-4)


def test_logit_scale_is_clamped():
    import imglish

    model = imglish.create_model("beit3_tiny_patch16_224_retrieval", img_size=32, patch_size=8, depth=1,
                                 vocab_size=20)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) would be 22026
    image, ids = torch.randn(2, 3, 32, 32), torch.randint(3, 20, (2, 5))
    loss, v, t = model(image=image, text_description=ids)
    expected, _, _ = clip_loss(v, t, torch.tensor(100.0))
    torch.testing.assert_close(loss, expected)
    assert math.isclose(model.max_logit_scale, math.log(100.0))
