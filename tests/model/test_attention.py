"""The explicit bf16 CPU training attention against scaled_dot_product_attention."""

import pytest
import torch
import torch.nn.functional as F

from imglish.model.backbone import attention


def _inputs(seed: int, length: int = 23):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, length, 16, generator=g) for _ in range(3))
    pad = torch.zeros(2, length, dtype=torch.bool)
    pad[1, -5:] = True
    return q, k, v, ~pad[:, None, None, :]


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_bf16_training_attention_matches_fp32_sdpa(mask_kind):
    q, k, v, allowed = _inputs(0)
    mask = {"none": None, "bool": allowed,
            "float": torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))}[mask_kind]
    scale = 16**-0.5
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    qb, kb, vb = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    out = attention(qb, kb, vb, mask, scale)  # grad enabled, bf16, CPU: the explicit path
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert (out.float() - ref).abs().max() < 0.05
    assert torch.isfinite(out.float()).all()
    # gradients agree with those of the fp32 kernel
    out.float().square().sum().backward()
    q32, k32, v32 = (t.clone().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask, scale=scale).square().sum().backward()
    for low, high in ((qb, q32), (kb, k32), (vb, v32)):
        rel = (low.grad.float() - high.grad).norm() / high.grad.norm()
        assert rel < 0.03


def test_padded_keys_get_no_weight_in_the_explicit_path():
    q, k, v, allowed = _inputs(1)
    qb, kb, vb = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    vb2 = vb.detach().clone()
    vb2[1, :, -5:] = 1e4  # padded values changed: the padded row's output must not move
    a = attention(qb, kb, vb, allowed, 0.25)
    b = attention(qb, kb, vb2.requires_grad_(), allowed, 0.25)
    assert torch.equal(a[1], b[1])


def test_fp32_and_inference_use_sdpa_exactly():
    q, k, v, allowed = _inputs(2)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.25)
    assert torch.equal(attention(q, k, v, allowed, 0.25), ref)
    with torch.no_grad():
        qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
        got = attention(qb, kb, vb, allowed, 0.25)
        assert torch.equal(got, F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed, scale=0.25))
