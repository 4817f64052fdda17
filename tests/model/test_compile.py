"""``torch.compile(fullgraph=True)`` traces every forward without a graph break: the task models, the retrieval
towers, an incremental captioning step with its key/value cache, and a bf16 autocast training step; the compiled
results equal eager ones. (The backbone's data-dependent checks, such as dropping an all-False padding mask and the
token-id range check, are skipped while compiling.) The ``eager`` backend keeps this quick: it checks the trace,
not inductor's kernels."""

from __future__ import annotations

import pytest
import torch

import imglish

IMG, VOCAB = 32, 64


def tiny(task: str, **kw):
    torch.manual_seed(0)
    return imglish.create_model(f"beit3_tiny_patch16_224_{task}", img_size=IMG, vocab_size=VOCAB, depth=2, **kw)


def inputs():
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, IMG, IMG, generator=g)
    ids = torch.randint(4, VOCAB - 1, (2, 7), generator=g)
    pad = torch.zeros(2, 7, dtype=torch.long)
    pad[1, 5:] = 1
    return image, ids, pad


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="eager")


@pytest.mark.parametrize("task", ["imageclassification", "vqav2", "nlvr2", "retrieval"])
def test_forward_compiles_without_graph_breaks(task):
    kw = {"num_classes": 5} if task in ("imageclassification", "vqav2") else {}
    model = tiny(task, **kw).eval()
    image, ids, pad = inputs()
    run = {
        "imageclassification": lambda: model(image=image),
        "vqav2": lambda: model(image=image, question=ids, padding_mask=pad),
        "nlvr2": lambda: model(image_a=image, image_b=image.flip(0), text_description=ids, padding_mask=pad),
        "retrieval": lambda: torch.cat([model.encode_image(image), model.encode_text(ids, pad)]),
    }[task]
    with torch.no_grad():
        torch.testing.assert_close(compiled(run)(), run(), atol=1e-5, rtol=1e-5)
        no_pad = torch.zeros_like(pad)  # an all-False mask: eager drops it, the compiled graph keeps it
        if task == "vqav2":
            torch.testing.assert_close(compiled(lambda: model(image=image, question=ids, padding_mask=no_pad))(),
                                       model(image=image, question=ids, padding_mask=no_pad), atol=1e-5, rtol=1e-5)


def test_incremental_captioning_step_compiles_with_its_cache():
    model = tiny("captioning").eval()
    image, _, _ = inputs()

    def step(words, cache, image):
        return model(image, words, torch.zeros_like(words), incremental_state=cache)

    fast = compiled(step)
    mask = VOCAB - 1
    results = []
    for fn in (fast, step):
        cache = model.new_cache()
        with torch.no_grad():
            first, cache = fn(torch.tensor([[0, mask], [0, mask]]), cache, image)
            cache.truncate(cache.length - 1)
            second, cache = fn(torch.tensor([[5, mask], [6, mask]]), cache, None)
        results.append((first, second, cache.length))
    (a1, a2, alen), (b1, b2, blen) = results
    assert alen == blen
    torch.testing.assert_close(a1, b1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a2, b2, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_training_step_compiles():
    model = tiny("vqav2", num_classes=5).train()
    image, ids, pad = inputs()

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(image=image, question=ids, padding_mask=pad).float().square().mean()

    torch.manual_seed(0)  # drop path and dropout draw the same numbers on both sides
    compiled(loss)().backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss().backward()
    slow = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert fast.keys() == slow.keys() and len(fast) > 10
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-2, rtol=1e-2, msg=name)
