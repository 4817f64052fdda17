"""The optional [CLS] head of ``BEiT3ForPretraining`` (BEiT v2's patch aggregation over the three streams): what it
reads, that it trains the pooled tokens, that padding is respected, and that task models drop it on load."""

from __future__ import annotations

import pytest
import torch

import imglish
from imglish.tasks.pretraining import PretrainingTask

NAME = "beit3_tiny_patch16_224_pretraining"


def _model(cls_head_layers: int = 1, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return imglish.create_model(NAME, img_size=32, patch_size=16, vocab_size=60, num_visual_tokens=20,
                                cls_head_layers=cls_head_layers, **kw)


def _batch(b: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    img = torch.randn(b, 3, 32, 32, generator=g)
    im = torch.zeros(b, 4, dtype=torch.bool)
    im[:, 1:3] = True
    ids = torch.randint(4, 59, (b, 8), generator=g)
    pad = torch.zeros(b, 8, dtype=torch.long)
    pad[0, 6:] = 1
    tm = torch.zeros(b, 8, dtype=torch.bool)
    tm[:, 2:4] = True
    return {
        "image": {"image": img, "image_mask": im, "visual_targets": torch.randint(0, 20, (b, 4), generator=g)},
        "text": {"text_ids": ids, "padding_mask": pad, "text_mask": tm, "text_targets": ids},
        "pair": {"image": img, "text_ids": ids, "padding_mask": pad, "text_mask": tm, "text_targets": ids},
    }


def _grad_at_pooled_tokens(model: torch.nn.Module, cls_weight: float) -> dict[str, float]:
    """|d loss / d last-layer output| at the vision CLS and the text BOS of the pair stream's fused pass."""
    grabbed = []

    def hook(module, args, output):
        for t in output:
            if t is not None:
                t.retain_grad()
        grabbed.append(output)

    handle = model.beit3.layers[-1].register_forward_hook(hook)
    task = PretrainingTask(cls_weight=cls_weight)
    batch = _batch()
    task.step_module(model)({"pair": batch["pair"]}).loss.backward()
    handle.remove()
    xv, xt = grabbed[0]
    return {"vision_cls": float(xv.grad[:, 0].abs().sum()), "text_bos": float(xt.grad[:, 0].abs().sum()),
            "patches": float(xv.grad[:, 1:].abs().sum())}


@pytest.mark.parametrize("source", [-1, 0])
def test_the_cls_head_trains_the_pooled_tokens_that_plain_mdm_leaves_untrained(source):
    plain = _grad_at_pooled_tokens(_model(0), 0.0)
    assert plain["vision_cls"] == 0.0 and plain["text_bos"] == 0.0  # nothing reads them in BEiT-3's MDM
    assert plain["patches"] == 0.0  # the pair stream masks no patch: its last-layer patches are unread too
    model = _model(1, cls_head_from=source)
    assert model.cls_head_from == (2 if source == -1 else 0)  # -1: half of the tiny model's 4 layers
    with_head = _grad_at_pooled_tokens(model, 1.0)
    assert with_head["vision_cls"] > 0.0 and with_head["text_bos"] > 0.0
    assert with_head["patches"] == 0.0  # the head reads the other tokens from a lower layer


def test_cls_head_terms_shapes_and_weights():
    model = _model(2)
    task = PretrainingTask({"pair": 0.5}, cls_weight=0.25)
    assert task.terms[4:] == ("image.cls_mim", "text.cls_mlm", "pair.cls_mlm", "pair.cls_mim")
    assert task.term_weight("pair.cls_mlm") == pytest.approx(0.125) and task.term_weight("image.cls_mim") == 0.25
    batch = _batch()
    counts = task.count_targets(batch, 0)
    assert counts["image.cls_mim"] == counts["image.mim"] == 6 and counts["pair.cls_mlm"] == counts["pair.mlm"]
    res = model(**{"image": batch["image"]["image"], "image_mask": batch["image"]["image_mask"]})
    assert res.cls_mim_logits.shape == res.mim_logits.shape == (6, 20) and res.cls_mlm_logits is None
    out = task.step_module(model)(batch)
    assert set(out.loss_sum) == set(task.terms) - {"pair.mim", "pair.cls_mim"}  # the pair's image is whole
    manual = sum(task.term_weight(n) * out.loss_sum[n] / out.count[n] for n in out.loss_sum)
    assert float(out.loss.detach()) == pytest.approx(float(manual), rel=1e-5)
    assert PretrainingTask().terms == ("image.mim", "text.mlm", "pair.mlm", "pair.mim")  # off by default


def test_cls_head_respects_padding():
    """A padded text gives the [CLS] head the same predictions as the same text unpadded."""
    model = _model(1).eval()
    ids = torch.randint(4, 59, (1, 5))
    tm = torch.tensor([[False, True, False, True, False]])
    img = torch.randn(1, 3, 32, 32)
    short = model(image=img, text_ids=ids, text_mask=tm)
    padded_ids = torch.cat([ids, torch.full((1, 3), 1)], dim=1)
    pad = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    long = model(image=img, text_ids=padded_ids, padding_mask=pad,
                 text_mask=torch.cat([tm, torch.zeros(1, 3, dtype=torch.bool)], dim=1))
    torch.testing.assert_close(long.cls_mlm_logits, short.cls_mlm_logits, atol=1e-5, rtol=1e-5)


def test_cls_head_survives_a_save_and_task_models_drop_it(tmp_path):
    model = _model(1, cls_head_from=1)
    path = tmp_path / "m.safetensors"
    imglish.save_model(model, path)
    again = imglish.create_model(None, pretrained=path)
    assert again.cls_head_layers == 1 and again.cls_head_from == 1
    torch.testing.assert_close(again.cls_head[0].ffn["A"].fc1.weight, model.cls_head[0].ffn["A"].fc1.weight)
    vqa = imglish.create_model("beit3_tiny_patch16_224_vqav2", pretrained=path, img_size=32, patch_size=16,
                               vocab_size=60, num_classes=5)
    assert any(k.startswith("cls_head.") for k in vqa.load_report.unexpected)
    assert not vqa.load_report.missing or all(k.startswith(("pooler", "head")) for k in vqa.load_report.missing)


@pytest.mark.parametrize("kw, match", [
    ({"cls_head_layers": 1, "cls_head_from": 4}, "cls_head_from must name a layer below the last one"),
    ({"cls_head_layers": -1}, "cls_head_layers must be >= 0"),
    ({"cls_head_layers": 1, "cls_head_pairs": "both"}, "cls_head_pairs must be one of fused, unimodal"),
])
def test_bad_cls_head_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        imglish.create_model(NAME, img_size=32, patch_size=16, vocab_size=60, num_visual_tokens=20, **kw)


def test_unimodal_pairs_feed_the_cls_head_the_towers_first_tokens(tmp_path):
    """``cls_head_pairs="unimodal"``: a pair's [CLS] head reads the vision CLS of an image-only forward and the text
    BOS of a text-only one (what retrieval pools), so the masked words it predicts depend on the image only through
    that CLS; ``"fused"`` reads the pair forward's own first tokens. Saved with the model."""
    b = _batch()["pair"]
    uni = _model(1, cls_head_from=0, cls_head_pairs="unimodal").eval()
    fused = _model(1, cls_head_from=0).eval()
    fused.load_state_dict(uni.state_dict())
    args = (b["image"], b["text_ids"], b["padding_mask"])
    with torch.no_grad():
        out_u = uni(*args, text_mask=b["text_mask"])
        out_f = fused(*args, text_mask=b["text_mask"])
        pair = uni.beit3(*args, output_hidden_states=True)
        firsts = (uni.beit3(b["image"]).last_hidden_state[:, :1],
                  uni.beit3(None, b["text_ids"], b["padding_mask"]).last_hidden_state[:, :1])
        _, xt = uni._cls_decode(pair, firsts)
    torch.testing.assert_close(out_u.cls_mlm_logits, uni.mlm_head(xt[b["text_mask"]]))
    torch.testing.assert_close(out_u.mlm_logits, out_f.mlm_logits)  # the main path is the same
    assert not torch.allclose(out_u.cls_mlm_logits, out_f.cls_mlm_logits, atol=1e-4)
    # the text-only stream has nothing to swap: both modes agree there
    with torch.no_grad():
        t_u = uni(None, b["text_ids"], b["padding_mask"], text_mask=b["text_mask"]).cls_mlm_logits
        t_f = fused(None, b["text_ids"], b["padding_mask"], text_mask=b["text_mask"]).cls_mlm_logits
    torch.testing.assert_close(t_u, t_f)
    path = tmp_path / "m.safetensors"
    imglish.save_model(uni, path)
    assert imglish.create_model(None, pretrained=path).cls_head_pairs == "unimodal"
