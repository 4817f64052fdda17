"""The registry: names, errors, overrides, and a forward/backward of every tiny model."""

from __future__ import annotations

import pytest
import torch

import imglish
from imglish.model.heads import PretrainingOutput


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="did you mean .*beit3_base_patch16_480_vqav2"):
        imglish.create_model("beit3_base_patch16_480_vqa")


def test_none_overrides_are_ignored_and_unknown_ones_rejected():
    with torch.device("meta"):  # shapes only: no need to fill a 64010-row embedding
        model = imglish.create_model("beit3_tiny_patch16_224_retrieval", img_size=None, drop_path_rate=None)
    assert model.config.img_size == (224, 224)
    with pytest.raises(ValueError, match="bad argument"):
        imglish.create_model("beit3_tiny_patch16_224_retrieval", num_classes=3)
    with pytest.raises(ValueError, match="img_size"):
        imglish.create_model("beit3_tiny_patch16_224_retrieval", img_size=100)


def test_list_models_filters():
    names = imglish.list_models("*tiny*")
    assert names and all("tiny" in n for n in names)
    assert "beit3_giant_patch14_224_pretraining" in imglish.list_models("beit3_giant*")


def _inputs(task: str):
    image = torch.randn(2, 3, 32, 32)
    ids = torch.randint(3, 100, (2, 6))
    pad = torch.tensor([[0] * 6, [0] * 4 + [1] * 2])
    if task == "imageclassification":
        return dict(image=image)
    if task == "vqav2":
        return dict(image=image, question=ids, padding_mask=pad)
    if task == "nlvr2":
        return dict(image_a=image, image_b=image.flip(-1), text_description=ids, padding_mask=pad)
    if task == "retrieval":
        return dict(image=image, text_description=ids, padding_mask=pad)
    if task == "captioning":
        return dict(image=image, text_ids=ids, padding_mask=pad, language_masked_pos=(ids % 2 == 0).long())
    if task == "segmentation":
        return dict(image=image)
    if task == "detection":
        box = torch.tensor([[4.0, 4.0, 20.0, 24.0]])
        return dict(images=list(image.clamp(0, 1)), targets=[{"boxes": box, "labels": torch.tensor([1]),
                                                                "masks": torch.ones(1, 32, 32, dtype=torch.uint8)}] * 2)
    if task == "pretraining":
        return dict(image=image, text_ids=ids, padding_mask=pad, image_mask=torch.rand(2, 16) < 0.4,
                    text_mask=(ids % 3 == 0) & (pad == 0))
    return dict(image=image, text_ids=ids, padding_mask=pad)


def _loss(task: str, out) -> torch.Tensor:
    if task == "retrieval":
        return out[0]
    if task == "captioning":
        return out[0].square().mean()
    if isinstance(out, PretrainingOutput):
        return out.mim_logits.square().mean() + out.mlm_logits.square().mean()
    if task == "backbone":
        return out.last_hidden_state.square().mean()
    if task == "detection":
        return sum(out.values())
    return out.square().mean()


@pytest.mark.parametrize("name", [n for n in imglish.list_models("*tiny*") if "_384" not in n and "_480" not in n])
def test_tiny_models_forward_and_backward(name):
    model = imglish.create_model(name, img_size=32, patch_size=8, vocab_size=100, depth=2)
    task = model.task
    out = model(**_inputs(task))
    loss = _loss(task, out)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)


def test_feature_api():
    model = imglish.create_model("beit3_tiny_patch16_224_retrieval", img_size=32, patch_size=8, vocab_size=100).eval()
    image, ids = torch.randn(2, 3, 32, 32), torch.randint(3, 100, (2, 6))
    img = model.encode_image(image)
    txt = model.encode_text(ids)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    vision_cls, language_cls = model(image=image, text_description=ids, only_infer=True)
    torch.testing.assert_close(img, vision_cls)
    torch.testing.assert_close(txt, language_cls)
    feats = model.extract_features(images=image, texts=ids, mode="fused", output_hidden_states=True)
    assert feats.vision_tokens.shape == (2, 17, 192) and feats.text_tokens.shape == (2, 6, 192)
    assert len(feats.hidden_states) == model.num_layers + 1
    with pytest.raises(ValueError, match="needs both"):
        model.extract_features(images=image, mode="fused")


def test_training_hooks():
    with torch.device("meta"):
        model = imglish.create_model("beit3_tiny_patch16_224_retrieval")
    nwd = model.no_weight_decay()
    assert {"beit3.vision_pos_embed", "beit3.vision_embed.cls_token", "logit_scale"} <= nwd
    assert model.layer_id("beit3.text_embed.weight") == 0
    assert model.layer_id("beit3.layers.2.ffn.A.fc1.weight") == 3
    assert model.layer_id("vision_head.weight") == model.num_layers + 1
    names = {n for n, _ in model.named_parameters()}
    assert nwd <= names
