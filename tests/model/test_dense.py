"""Dense models: feature maps, the two necks' shapes and strides, the UperNet segmenter and the Mask R-CNN detector."""

from __future__ import annotations

import pytest
import torch

import imglish
from imglish.model.config import size_config
from imglish.model.dense import (
    BEiT3ForDetection,
    BEiT3ForSemanticSegmentation,
    MultiLevelNeck,
    SimpleFeaturePyramid,
    default_out_layers,
    vision_feature_maps,
)
from imglish.model.heads import BEiT3Model
from imglish.model.loading import save_model


def _config(patch: int = 16, **kw):
    return size_config("tiny", img_size=64, patch_size=patch, dynamic_img_size=True, normalize_output=False,
                       vocab_size=100, **kw)


def test_default_out_layers_follow_beit():
    assert default_out_layers(12) == (4, 6, 8, 12)
    assert default_out_layers(24) == (8, 12, 16, 24)
    assert default_out_layers(4) == (1, 2, 3, 4)


def test_feature_maps_are_the_patch_tokens_of_the_chosen_layers():
    torch.manual_seed(0)
    model = BEiT3Model(_config()).eval()
    image = torch.randn(2, 3, 48, 80)
    maps = vision_feature_maps(model.beit3, image, [2, 4])
    out = model.beit3(image, output_hidden_states=True)
    assert [m.shape for m in maps] == [torch.Size([2, 192, 3, 5])] * 2
    # token k of the grid (row-major) is map[:, :, k // 5, k % 5]
    tokens = out.hidden_states[2][:, 1:]
    assert torch.equal(maps[0][:, :, 1, 3], tokens[:, 1 * 5 + 3])
    assert torch.equal(maps[1].flatten(2).transpose(1, 2), out.hidden_states[4][:, 1:])
    with pytest.raises(ValueError, match="feature layers"):
        vision_feature_maps(model.beit3, image, [5])


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (32, 48)])
def test_multilevel_neck_strides(size):
    dim, h, w = 32, size[0] // 16, size[1] // 16
    neck = MultiLevelNeck(dim).eval()
    maps = [torch.randn(1, dim, h, w) for _ in range(4)]
    out = neck(maps)
    assert [tuple(o.shape[-2:]) for o in out] == [(h * 4, w * 4), (h * 2, w * 2), (h, w), (h // 2, w // 2)]
    assert all(o.shape[1] == dim for o in out)
    with pytest.raises(ValueError, match="4 feature maps"):
        neck(maps[:3])


@pytest.mark.parametrize("size", [(64, 64), (128, 96), (64, 192)])
def test_simple_feature_pyramid_strides(size):
    dim, h, w = 32, size[0] // 16, size[1] // 16
    sfp = SimpleFeaturePyramid(dim, out_channels=24)
    out = sfp(torch.randn(2, dim, h, w))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    strides = {k: size[0] / v.shape[-2] for k, v in out.items()}
    assert strides == {"0": 4.0, "1": 8.0, "2": 16.0, "3": 32.0, "pool": 64.0}
    assert all(v.shape[:2] == (2, 24) for v in out.values())
    assert out["3"].shape[-1] == w // 2


def test_segmentation_model_output_and_aux():
    torch.manual_seed(0)
    model = BEiT3ForSemanticSegmentation(_config(patch=8), num_classes=6, channels=32, aux_channels=16)
    image = torch.randn(2, 3, 64, 96)
    logits, aux = model(image, return_aux=True)
    assert logits.shape == aux.shape == (2, 6, 64, 96)
    model.eval()
    assert model(image).shape == (2, 6, 64, 96)
    assert model.layer_id("decode_head.classifier.weight") == model.num_layers + 1
    assert model.layer_id("beit3.layers.2.ffn.A.fc1.weight") == 3
    no_aux = BEiT3ForSemanticSegmentation(_config(patch=8), num_classes=6, channels=32, aux_channels=0)
    assert no_aux(image, return_aux=True)[1] is None


def test_segmentation_checkpoint_round_trip_and_backbone_init(tmp_path):
    torch.manual_seed(0)
    model = BEiT3ForSemanticSegmentation(_config(patch=8), num_classes=6, channels=32, aux_channels=16).eval()
    path = save_model(model, tmp_path / "seg.safetensors")
    again = imglish.create_model(None, pretrained=path).eval()
    assert isinstance(again, BEiT3ForSemanticSegmentation) and again.out_layers == model.out_layers
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(image), again(image))
    # a bare backbone checkpoint initialises the backbone; neck and heads stay new
    backbone = BEiT3Model(_config(patch=8))
    bpath = save_model(backbone, tmp_path / "backbone.safetensors")
    seg = imglish.create_model("beit3_tiny_patch16_512_segmentation", pretrained=bpath, img_size=64, patch_size=8,
                               vocab_size=100, num_classes=6, channels=32)
    assert torch.equal(seg.beit3.vision_embed.proj.weight, backbone.beit3.vision_embed.proj.weight)
    assert any(k.startswith("decode_head.") for k in seg.load_report.missing)


def _targets():
    masks = torch.zeros(2, 96, 128, dtype=torch.uint8)
    masks[0, 10:40, 20:60] = 1
    masks[1, 50:90, 70:120] = 1
    return [{"boxes": torch.tensor([[20.0, 10.0, 60.0, 40.0], [70.0, 50.0, 120.0, 90.0]]),
             "labels": torch.tensor([1, 2]), "masks": masks}]


def test_detection_model_trains_and_predicts_in_input_coordinates(tmp_path):
    torch.manual_seed(0)
    model = BEiT3ForDetection(_config(), num_classes=3, fpn_channels=32, box_head_dim=64, mask_head_dim=16,
                              min_size=128, max_size=128, anchor_sizes=(8, 16, 32, 64, 128))
    images = [torch.rand(3, 96, 128)]
    losses = model(images, _targets())
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    sum(losses.values()).backward()
    assert model.beit3.vision_embed.proj.weight.grad is not None
    assert model.neck.stages[0][0].weight.grad is not None
    with pytest.raises(ValueError, match="needs targets"):
        model(images)
    model.eval()
    with torch.no_grad():
        det = model([torch.rand(3, 96, 128), torch.rand(3, 60, 50)])
    assert det[0]["masks"].shape[-2:] == (96, 128) and det[1]["masks"].shape[-2:] == (60, 50)
    if len(det[1]["boxes"]):
        assert float(det[1]["boxes"][:, 2].max()) <= 50.0 + 1e-4
    path = save_model(model, tmp_path / "det.safetensors")
    again = imglish.create_model(None, pretrained=path).eval()
    with torch.no_grad():
        a, b = model([images[0]])[0], again([images[0]])[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_registry_names_for_dense_models():
    assert "beit3_base_patch16_512_segmentation" in imglish.list_models("*segmentation")
    assert "beit3_large_patch16_1024_detection" in imglish.list_models("*detection")
    info = imglish.get_model_info("beit3_base_patch16_512_segmentation")
    assert info.config().dynamic_img_size and not info.config().normalize_output
