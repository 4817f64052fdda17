"""`cls_only=True`: the last layer computes only each stream's first token, and nothing that is read changes."""

from __future__ import annotations

import pytest
import torch

from imglish.model import BEiT3, BEiT3ForRetrieval, BEiT3ForVisualQuestionAnswering, BEiT3ForVisualReasoning
from imglish.model.layers import KVCache
from tests.model.helpers import randomize, text_batch, tiny_config

LAYOUTS = {
    "multiway": {},
    "shared attention + VL expert": {"shared_attention": True, "vl_ffn_layers": 1},
}


def _inputs(kind: str):
    ids, pad = text_batch(batch=3, length=7)
    image = torch.randn(3, 3, 32, 32)
    return {"image": (image, None, None), "text": (None, ids, pad), "fused": (image, ids, pad)}[kind]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kind", ["image", "text", "fused"])
def test_first_tokens_and_their_gradients_equal_a_full_pass(layout, kind):
    model = randomize(BEiT3(tiny_config(**LAYOUTS[layout])))
    image, ids, pad = _inputs(kind)
    full = model(image, ids, pad)
    part = model(image, ids, pad, cls_only=True)
    firsts = [0] + ([full.num_vision_tokens] if image is not None and ids is not None else [])
    assert part.last_hidden_state.shape == (3, len(firsts), 32)
    assert part.num_vision_tokens == (1 if image is not None else 0)
    torch.testing.assert_close(part.last_hidden_state, full.last_hidden_state[:, firsts], rtol=1e-5, atol=1e-5)

    # the same loss on the first tokens gives the same gradients everywhere, in the last layer too
    weights = torch.randn(len(firsts), 32)
    grads = []
    for cls_only in (False, True):
        model.zero_grad(set_to_none=True)
        out = model(image, ids, pad, cls_only=cls_only).last_hidden_state
        out = out if cls_only else out[:, firsts]
        (out * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


def test_padding_mask_and_gradient_checkpointing_follow_the_shorter_output():
    model = randomize(BEiT3(tiny_config()))
    image, ids, pad = _inputs("fused")
    pad[:, 0] = 0
    out = model(image, ids, pad, cls_only=True)
    assert out.padding_mask.shape == (3, 2) and not out.padding_mask.any()
    model.train().set_grad_checkpointing(True)
    torch.manual_seed(0)
    ckpt = model(image, ids, pad, cls_only=True).last_hidden_state
    torch.testing.assert_close(ckpt, out.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_pooled_task_models_give_the_outputs_of_a_full_last_layer():
    config = tiny_config()
    image, ids, pad = _inputs("fused")
    vqa = randomize(BEiT3ForVisualQuestionAnswering(config, num_classes=5))
    x = vqa.beit3(image, ids, pad).last_hidden_state
    torch.testing.assert_close(vqa(image, ids, pad), vqa.head(vqa.pooler(x)), rtol=1e-5, atol=1e-5)

    nlvr = randomize(BEiT3ForVisualReasoning(config))
    full = nlvr.beit3(torch.cat([image, image.flip(0)]), torch.cat([ids, ids]), torch.cat([pad, pad]))
    x = full.last_hidden_state
    pair = torch.cat([x[:, 0], x[:, full.num_vision_tokens]], dim=-1)
    expected = nlvr.head(torch.cat([pair[:3], pair[3:]], dim=-1))
    torch.testing.assert_close(nlvr(image, image.flip(0), ids, pad), expected, rtol=1e-5, atol=1e-5)

    ret = randomize(BEiT3ForRetrieval(config))
    img_full = torch.nn.functional.normalize(ret.vision_head(ret.beit3(image).last_hidden_state[:, 0]), dim=-1)
    txt_full = ret.language_head(ret.beit3(None, ids, pad).last_hidden_state[:, 0])
    torch.testing.assert_close(ret.encode_image(image), img_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.encode_text(ids, pad), torch.nn.functional.normalize(txt_full, dim=-1),
                               rtol=1e-5, atol=1e-5)


def test_cls_only_refuses_a_cache():
    model = randomize(BEiT3(tiny_config()))
    ids, _ = text_batch()
    with pytest.raises(ValueError, match="cls_only"):
        model(None, ids, cache=KVCache.empty(model.num_layers), cls_only=True)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recomputation_modes_give_the_same_gradients_and_selective_recomputes_no_matmul(mode):
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    model = randomize(BEiT3(tiny_config())).train()
    image, ids, pad = _inputs("fused")
    grads, counts = {}, {}
    for setting in ("none", mode):
        model.set_grad_checkpointing(setting)
        model.zero_grad(set_to_none=True)
        loss = model(image, ids, pad).last_hidden_state.square().sum()
        with CountOps() as ops:
            loss.backward()
        grads[setting] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        counts[setting] = ops.names
    for name, grad in grads["none"].items():
        torch.testing.assert_close(grads[mode][name], grad, rtol=0, atol=0, msg=name)
    forward_ops = {"native_layer_norm.default", "gelu.default"}
    assert not forward_ops & set(counts["none"])  # plain backward runs no forward op
    assert forward_ops <= set(counts[mode])  # both modes rerun the norms and GELU in backward ...
    rerun_matmuls = counts[mode].count("addmm.default")
    assert rerun_matmuls == 0 if mode == "selective" else rerun_matmuls > 0  # ... only "full" the projections


def test_grad_checkpointing_setting_is_validated():
    with pytest.raises(ValueError, match="grad_checkpointing"):
        tiny_config(grad_checkpointing="sometimes")
    assert BEiT3(tiny_config(grad_checkpointing=True)).grad_checkpointing == "full"
