"""One-modality models (BEiT3Config.modalities): the same outputs and gradients with a fraction of the weights."""

from __future__ import annotations

import pytest
import torch

import imglish
from imglish.model import load_checkpoint, save_model
from imglish.model.backbone import BEiT3
from tests.model.helpers import randomize, text_batch, tiny_config


def _pair(modality: str, **config):
    """A full tiny backbone with random weights, and the one-modality model loaded from its state dict."""
    full = randomize(BEiT3(tiny_config(**config)))
    one = BEiT3(tiny_config(modalities=(modality,), **config)).eval()
    report = load_checkpoint(one, full.state_dict())
    return full, one, report


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_vision_only_equals_the_full_model_on_images():
    full, one, report = _pair("vision")
    assert report.clean and not report.missing
    assert "text_embed.weight" in report.not_held and "text_pos_embed" in report.not_held
    assert any(".B." in k for k in report.not_held) and not any(".A." in k for k in report.not_held)
    assert not hasattr(one, "text_embed") and not hasattr(one, "text_pos_embed")
    assert _count(one) < 0.6 * _count(full)
    image = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :5] = True
    with torch.no_grad():
        assert torch.equal(full(image=image).last_hidden_state, one(image=image).last_hidden_state)
        assert torch.equal(full(image=image, image_mask=mask).last_hidden_state,
                           one(image=image, image_mask=mask).last_hidden_state)


def test_text_only_equals_the_full_model_on_padded_text():
    full, one, report = _pair("text")
    assert report.clean and "vision_pos_embed" in report.not_held
    assert any(k.startswith("vision_embed.") for k in report.not_held)
    assert not hasattr(one, "vision_embed")
    ids, pad = text_batch()
    with torch.no_grad():
        assert torch.equal(full(text_ids=ids, padding_mask=pad).last_hidden_state,
                           one(text_ids=ids, padding_mask=pad).last_hidden_state)


def test_the_vision_language_expert_is_not_held_by_a_one_modality_model():
    full, one, report = _pair("vision", vl_ffn_layers=1)
    assert any(".ffn.C." in k for k in report.not_held)
    assert "C" in full.layers[-1].ffn and "C" not in one.layers[-1].ffn
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # an image alone never goes through the vision-language expert
        assert torch.equal(full(image=image).last_hidden_state, one(image=image).last_hidden_state)


def test_gradients_of_the_held_weights_are_those_of_the_full_model():
    full, one, _ = _pair("vision")
    full.train()
    one.train()
    image = torch.randn(2, 3, 32, 32)
    for model in (full, one):
        model(image=image).last_hidden_state.square().mean().backward()
    grads = dict(full.named_parameters())
    checked = 0
    for name, p in one.named_parameters():
        if name == "vision_embed.mask_token":  # no patch was masked
            continue
        assert p.grad is not None, name
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-7), name
        checked += 1
    assert checked == len(list(one.parameters())) - 1


def test_the_other_modality_is_a_clear_error():
    _, vision, _ = _pair("vision")
    _, text, _ = _pair("text")
    ids, _ = text_batch()
    with pytest.raises(ValueError, match=r"holds only the vision weights .* cannot encode text_ids"):
        vision(text_ids=ids)
    with pytest.raises(ValueError, match=r"holds only the text weights .* cannot encode an image"):
        text(image=torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("bad", [(), ("audio",), ["vision", "sound"], 3])
def test_bad_modalities_are_rejected(bad):
    with pytest.raises(ValueError, match="modalities must be a non-empty subset"):
        tiny_config(modalities=bad)


def test_modalities_are_canonical_and_survive_a_save(tmp_path):
    assert tiny_config(modalities=["text", "vision"]).modalities == ("vision", "text")
    assert tiny_config(modalities="vision").modalities == ("vision",)
    full = imglish.create_model("beit3_tiny_patch16_224_imageclassification", img_size=32, num_classes=5)
    one = imglish.create_model("beit3_tiny_patch16_224_imageclassification", img_size=32, num_classes=5,
                               modalities=("vision",))
    assert load_checkpoint(one, randomize(full).state_dict()).clean
    small, big = save_model(one.eval(), tmp_path / "one.safetensors"), save_model(full, tmp_path / "full.safetensors")
    assert small.stat().st_size < 0.7 * big.stat().st_size
    again = imglish.create_model(None, pretrained=small).eval()
    assert again.config.modalities == ("vision",)
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(image), full(image)) and torch.equal(again(image), one(image))
    # our own one-modality file loaded into a full model leaves the text weights missing: an error when strict
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(imglish.create_model("beit3_tiny_patch16_224_imageclassification", img_size=32,
                                             num_classes=5), small)


def test_a_file_is_read_without_the_other_modality(tmp_path, monkeypatch):
    from safetensors import safe_open

    full = randomize(imglish.create_model("beit3_tiny_patch16_224_imageclassification", img_size=32, num_classes=5))
    path = save_model(full, tmp_path / "full.safetensors")
    read: list[str] = []
    original = safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.inner = original(*args, **kwargs)

        def __enter__(self):
            handle = self.inner.__enter__()
            get = handle.get_tensor

            class Handle:
                def __getattr__(self, name):
                    return getattr(handle, name)

                def get_tensor(self, name):
                    read.append(name)
                    return get(name)

            return Handle()

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    monkeypatch.setattr("safetensors.safe_open", Spy)
    one = imglish.create_model(None, pretrained=path, modalities=("vision",)).eval()
    assert one.load_report.clean and "beit3.text_embed.weight" in one.load_report.not_held
    assert read and not any("text_embed" in k or ".B." in k for k in read)
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(one(image), full(image))
