"""Official <-> imglish conversion, the loading policy and its report, and our own file format."""

from __future__ import annotations

import pytest
import torch

import imglish
from imglish.cli.main import main
from imglish.model import BEiT3ForImageClassification, BEiT3ForRetrieval, load_checkpoint, read_checkpoint
from imglish.model.convert import from_official, infer_official_config, infer_task, to_official
from imglish.model.layers import resample_position_table
from tests.conftest import parity_file
from tests.model.helpers import randomize, tiny_config


@pytest.fixture(scope="module")
def fixture_weights() -> dict:
    return torch.load(parity_file("official-tiny.pt"), weights_only=True)["weights"]


def test_round_trip_is_bitwise(fixture_weights):
    for name, official in fixture_weights.items():
        back = to_official(from_official(official))
        assert set(back) == set(official), name
        for key, value in official.items():
            assert torch.equal(back[key], value), (name, key)


def test_convert_cli_round_trip_and_rebuild(fixture_weights, tmp_path):
    official = fixture_weights["w2"]  # a VQAv2 model
    src = tmp_path / "vqa.pth"
    torch.save({"model": official, "epoch": 3}, src)
    ours, back = tmp_path / "vqa.safetensors", tmp_path / "vqa_back.pth"
    assert main(["convert", str(src), str(ours)]) == 0
    assert main(["convert", str(ours), str(back)]) == 0
    restored = torch.load(back, weights_only=True)["model"]
    assert set(restored) == set(official)
    assert all(torch.equal(restored[k], official[k]) for k in official)
    # The converted file rebuilds the model by itself (config and task are in its metadata)...
    model = imglish.create_model(None, pretrained=ours, num_heads=4).eval()
    assert model.task == "vqav2" and model.num_classes == 11
    # ...and computes what the model loaded from the official file computes.
    ref = imglish.model.BEiT3ForVisualQuestionAnswering(model.config, num_classes=11).eval()
    load_checkpoint(ref, src)
    image, question = torch.randn(2, 3, 32, 32), torch.randint(0, 300, (2, 5))
    torch.testing.assert_close(model(image, question), ref(image, question))


def test_infer_config_and_task(fixture_weights):
    cfg = infer_official_config(fixture_weights["w2"], num_heads=4)
    assert cfg["embed_dim"] == 64 and cfg["depth"] == 3 and cfg["ffn_dim"] == 160
    assert cfg["img_size"] == [32, 32] and cfg["patch_size"] == 8 and cfg["vocab_size"] == 300
    assert cfg["normalize_output"] is False and cfg["max_source_positions"] == 40
    assert infer_task(fixture_weights["w2"]) == ("vqav2", {"num_classes": 11})
    assert infer_task(fixture_weights["w5"])[0] == "captioning"
    assert infer_task(fixture_weights["w4"])[0] == "retrieval"


def test_our_format_round_trip(tmp_path):
    model = randomize(imglish.create_model("beit3_tiny_patch16_224_nlvr2", img_size=32, depth=2))
    path = imglish.save_model(model, tmp_path / "m.safetensors")
    again = imglish.create_model(None, pretrained=path).eval()
    assert again.load_report.clean
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    _, meta = read_checkpoint(path)
    assert meta["task"] == "nlvr2" and meta["config"]["depth"] == 2


def test_strict_loading_reports_another_architecture():
    small = BEiT3ForRetrieval(tiny_config())
    wider = BEiT3ForRetrieval(tiny_config(embed_dim=48))
    with pytest.raises(ValueError, match="another architecture") as err:
        load_checkpoint(wider, small.state_dict())
    assert "shape mismatch" in str(err.value) and "beit3.text_embed.weight" in str(err.value)
    deeper = BEiT3ForRetrieval(tiny_config(depth=3))
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        load_checkpoint(deeper, small.state_dict())
    report = load_checkpoint(deeper, small.state_dict(), strict=False)
    assert any(k.startswith("beit3.layers.2.") for k in report.missing)


def test_head_of_another_size_is_dropped_and_backbone_loaded():
    src = randomize(BEiT3ForImageClassification(tiny_config(normalize_output=False), num_classes=7))
    dst = BEiT3ForImageClassification(tiny_config(normalize_output=False), num_classes=3)
    fresh_head = dst.head.weight.clone()
    report = load_checkpoint(dst, to_official(src))
    assert report.dropped_heads == ["head.weight", "head.bias"]
    assert torch.equal(dst.head.weight, fresh_head)
    assert torch.equal(dst.beit3.text_embed.weight, src.beit3.text_embed.weight)
    assert "dropped" in str(report)


def test_pretrained_file_into_a_task_model_is_allowed():
    pre = randomize(imglish.create_model("beit3_tiny_patch16_224_pretraining", img_size=32, depth=2, vocab_size=50,
                                         num_visual_tokens=16))
    official = to_official(pre)
    assert "beit3.encoder.output_projection.weight" in official and "mim_head.weight" in official
    vqa = imglish.create_model("beit3_tiny_patch16_224_vqav2", img_size=32, depth=2, vocab_size=50, num_classes=5)
    report = load_checkpoint(vqa, official)  # strict: heads missing, final LN and pretraining heads unused
    assert {"mim_head.weight", "mlm_head.weight"} <= set(report.unexpected)
    assert any(k.startswith("pooler.") for k in report.missing)
    assert torch.equal(vqa.beit3.layers[1].attn.qkv["A"].weight, pre.beit3.layers[1].attn.qkv["A"].weight)


def test_position_table_resampling_square_and_not():
    table = torch.randn(3 + 4 * 4, 8)
    assert torch.equal(resample_position_table(table, (4, 4), (4, 4)), table)
    grown = resample_position_table(table, (4, 4), (6, 8))
    assert grown.shape == (3 + 48, 8) and torch.equal(grown[:3], table[:3])
    grid = table[3:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(6, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(grown[3:], ref.permute(0, 2, 3, 1).reshape(-1, 8))
    # A checkpoint at 32x32 loads into a model at 48x64 (non-square grid).
    src = BEiT3ForRetrieval(tiny_config())
    dst = BEiT3ForRetrieval(tiny_config(img_size=(48, 64)))
    report = load_checkpoint(dst, to_official(src))
    assert report.resized and dst.beit3.vision_pos_embed.shape[0] == 3 + 6 * 8
