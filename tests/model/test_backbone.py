"""Behaviour of the backbone: routing, padding, masks, caches, options and input validation."""

from __future__ import annotations

import pytest
import torch

from imglish.model import BEiT3
from imglish.model.heads import BEiT3ForCaptioning, captioning_attention_mask
from tests.model.helpers import randomize, text_batch, tiny_config


def _model(**overrides) -> BEiT3:
    return randomize(BEiT3(tiny_config(**overrides)))


def _zero_expert(model: BEiT3, expert: str) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{expert}." in name:
                p.zero_()


def test_vision_only_output_ignores_the_language_expert():
    model, image = _model(), torch.randn(2, 3, 32, 32)
    before = model(image).last_hidden_state
    _zero_expert(model, "B")
    assert torch.equal(before, model(image).last_hidden_state)
    _zero_expert(model, "A")
    assert not torch.allclose(before, model(image).last_hidden_state)


def test_text_only_output_ignores_the_vision_expert():
    model = _model()
    ids, pad = text_batch()
    before = model(None, ids, pad).last_hidden_state
    _zero_expert(model, "A")
    assert torch.equal(before, model(None, ids, pad).last_hidden_state)


def test_fused_sequence_puts_vision_first_and_text_bos_at_the_split():
    model, image = _model(), torch.randn(3, 3, 32, 32)
    ids, pad = text_batch()
    out = model(image, ids, pad)
    assert out.num_vision_tokens == 1 + 16
    assert out["multiway_split_position"] == 17
    assert out.last_hidden_state.shape == (3, 17 + ids.shape[1], 32)
    assert model(image)["multiway_split_position"] == -1
    assert model(None, ids, pad)["multiway_split_position"] == 0
    # The text half of a fused pass differs from a text-only pass (text attends to the image).
    assert not torch.allclose(out.text_tokens, model(None, ids, pad).last_hidden_state, atol=1e-3)


def test_appending_padding_changes_nothing_for_real_tokens():
    model, image = _model(), torch.randn(3, 3, 32, 32)
    ids, pad = text_batch(length=7)
    more_ids = torch.cat([ids, torch.ones(3, 4, dtype=torch.long)], dim=1)
    more_pad = torch.cat([pad, torch.ones(3, 4, dtype=torch.long)], dim=1)
    for img in (None, image):
        short = model(img, ids, pad)
        long = model(img, more_ids, more_pad)
        keep = torch.cat([torch.ones(3, short.num_vision_tokens, dtype=torch.bool), pad == 0], dim=1)
        torch.testing.assert_close(long.last_hidden_state[:, : keep.shape[1]][keep], short.last_hidden_state[keep],
                                   atol=1e-5, rtol=1e-5)


def test_image_rows_under_the_captioning_mask_equal_a_vision_only_pass():
    model, image = _model(), torch.randn(2, 3, 32, 32)
    ids, pad = text_batch(batch=2)
    mask = captioning_attention_mask(17, ids.shape[1])
    fused = model(image, ids, pad, attn_mask=mask)
    torch.testing.assert_close(fused.vision_tokens, model(image).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_boolean_integer_and_additive_masks_agree():
    model, image = _model(), torch.randn(2, 3, 32, 32)
    ids, pad = text_batch(batch=2)
    blocked = captioning_attention_mask(17, ids.shape[1])
    additive = blocked.float() * -1e8
    a = model(image, ids, pad, attn_mask=blocked).last_hidden_state
    b = model(image, ids, pad, attn_mask=blocked.bool()).last_hidden_state
    c = model(image, ids, pad, attn_mask=additive).last_hidden_state
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_masked_patches_use_the_mask_token():
    model, image = _model(), torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 3] = True
    other = image.clone()
    other[:, :, 0:8, 24:32] = torch.randn(2, 3, 8, 8)  # patch 3 (row 0, column 3) differs
    a = model(image, image_mask=mask).last_hidden_state
    b = model(other, image_mask=mask).last_hidden_state
    torch.testing.assert_close(a, b)  # the masked patch's pixels are never seen
    assert not torch.allclose(a, model(image).last_hidden_state)


def test_hidden_states_and_gradient_checkpointing():
    model = _model(drop_path_rate=0.0)
    ids, pad = text_batch()
    image = torch.randn(3, 3, 32, 32)
    out = model(image, ids, pad, output_hidden_states=True)
    assert len(out.hidden_states) == model.num_layers + 1
    model.train()

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        model(image, ids, pad).last_hidden_state.square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for g1, g2 in zip(grads(False), grads(True)):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_drop_path_is_random_in_training_and_off_in_eval():
    model = _model(drop_path_rate=0.5)
    image = torch.randn(8, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(image).last_hidden_state, model(image).last_hidden_state)
    model.train()
    assert not torch.allclose(model(image).last_hidden_state, model(image).last_hidden_state)


def test_bf16_autocast_stays_close_to_fp32():
    model = _model()
    ids, pad = text_batch()
    image = torch.randn(3, 3, 32, 32)
    ref = model(image, ids, pad).last_hidden_state
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(image, ids, pad).last_hidden_state
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.05, float(rel)
    # As in the official code, the residual streams stay in the parameters' dtype (float32) under autocast: only
    # the matrix products run in bf16. (A bf16 residual stream doubles the error against fp32.)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(image).last_hidden_state.dtype == torch.float32  # vision only: no cat to promote it


def test_dynamic_image_size_resamples_positions():
    fixed = _model()
    with pytest.raises(ValueError, match="does not match the model's img_size"):
        fixed(torch.randn(1, 3, 48, 32))
    dynamic = BEiT3(tiny_config(dynamic_img_size=True))
    dynamic.load_state_dict(fixed.state_dict())
    dynamic.eval()
    image = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(dynamic(image).last_hidden_state, fixed(image).last_hidden_state)
    assert dynamic(torch.randn(2, 3, 48, 32)).last_hidden_state.shape == (2, 1 + 6 * 4, 32)


def test_kv_cache_with_padded_prompts_matches_full_passes():
    """Incremental decoding of a padded batch equals a full causal pass over each unpadded example."""
    model = randomize(BEiT3ForCaptioning(tiny_config()))
    image = torch.randn(3, 3, 32, 32)
    prompt, pad = text_batch(batch=3, length=6)
    new_tokens = torch.randint(4, 50, (3, 3))
    cache = model.new_cache()
    logits, cache = model(image, prompt, pad, None, incremental_state=cache)
    step_logits = []
    for j in range(new_tokens.shape[1]):
        out, cache = model(None, new_tokens[:, j : j + 1], None, None, incremental_state=cache)
        step_logits.append(out[:, -1])
    for row in range(3):
        n = int((pad[row] == 0).sum())
        full_ids = torch.cat([prompt[row, :n], new_tokens[row]])[None]
        full, _ = model(image[row : row + 1], full_ids, None, None)
        torch.testing.assert_close(logits[row, :n], full[0, :n], atol=1e-4, rtol=1e-4)
        for j in range(new_tokens.shape[1]):
            # note: the padded example's new tokens sit at later positions in the cache than in the unpadded pass,
            # so compare against a pass whose positions match: rebuild with the same position indices.
            pos = torch.cat([torch.arange(n), torch.arange(prompt.shape[1], prompt.shape[1] + j + 1)])[None]
            ids_j = torch.cat([prompt[row, :n], new_tokens[row, : j + 1]])[None]
            mask = captioning_attention_mask(17, ids_j.shape[1])
            ref = model.mlm_head(model.beit3(image[row : row + 1], ids_j, attn_mask=mask, text_positions=pos).text_tokens)
            torch.testing.assert_close(step_logits[j][row], ref[0, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image=torch.randn(2, 3, 40, 40)), "does not match the model's img_size"),
        (dict(image=torch.randn(2, 1, 32, 32)), r"\(B, 3, H, W\)"),
        (dict(text_ids=torch.zeros(1, 30, dtype=torch.long)), "longer than the position table"),
        (dict(image=torch.randn(2, 3, 32, 32), text_ids=torch.zeros(3, 5, dtype=torch.long)), "batch sizes differ"),
        (dict(text_ids=torch.full((1, 4), 99)), r"must be in \[0, 50\)"),
        (dict(text_ids=torch.zeros(2, 4, dtype=torch.long), padding_mask=torch.zeros(2, 5)), "padding_mask must have"),
        (dict(), "got neither"),
    ],
)
def test_bad_input_is_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _model()(**kwargs)


def test_official_argument_names_are_accepted():
    model = _model()
    ids, pad = text_batch()
    image = torch.randn(3, 3, 32, 32)
    ours = model(image, ids, pad).last_hidden_state
    official = model(visual_tokens=image, textual_tokens=ids, text_padding_position=pad)["encoder_out"]
    torch.testing.assert_close(ours, official)
    with pytest.raises(TypeError, match="unexpected keyword"):
        model(image, bogus=1)


def test_paper_layout_options():
    shared = BEiT3(tiny_config(shared_attention=True, vl_ffn_layers=1))
    released = BEiT3(tiny_config())
    n_shared = sum(p.numel() for p in shared.parameters())
    n_released = sum(p.numel() for p in released.parameters())
    dim, ffn = 32, 64
    attn_one_expert = 4 * dim * dim + 4 * dim + 2 * dim + 2 * dim  # qkv+proj weights/biases, sub-LN, pre-LN
    vl_expert = dim * ffn + ffn + 2 * ffn + ffn * dim + dim + 2 * dim  # fc1, ffn LN, fc2, its pre-LN
    assert n_released - n_shared == 2 * attn_one_expert - vl_expert
    randomize(shared)
    image, (ids, pad) = torch.randn(2, 3, 32, 32), text_batch(batch=2)
    fused = shared(image, ids, pad).last_hidden_state
    alone = shared(image).last_hidden_state
    with torch.no_grad():
        for p in shared.layers[-1].ffn["C"].parameters():
            p.add_(1.0)
    assert not torch.allclose(fused, shared(image, ids, pad).last_hidden_state)  # fusion uses the VL expert
    torch.testing.assert_close(alone, shared(image).last_hidden_state)  # vision-only does not


def test_giant_matches_the_paper_breakdown():
    import imglish

    with torch.device("meta"):
        giant = imglish.create_model("beit3_giant_patch14_224")
    layers = giant.beit3.layers
    count = lambda mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
    v_ffn = count(layer.ffn["A"] for layer in layers)
    vl_ffn = count(layer.ffn["C"] for layer in layers if "C" in layer.ffn)
    attn = count(layer.attn for layer in layers)
    total = sum(p.numel() for p in giant.parameters())
    # Paper: V-FFN 692M, L-FFN 692M, VL-FFN 52M (top 3 layers), shared attention 317M, 1.9B in all
    # (the paper rounds and may leave out the small LayerNorms: allow 1M).
    for count_, paper in ((v_ffn, 692e6), (vl_ffn, 52e6), (attn, 317e6)):
        assert abs(count_ - paper) < 1e6, (count_, paper)
    assert 1.8e9 < total < 2.0e9
