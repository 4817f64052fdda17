"""`create_model_and_processor`: raw images and strings in, model outputs out; the processor travels with the file."""

from __future__ import annotations

import torch
from PIL import Image

import imglish
from imglish.tokenizers.text import train_sentencepiece


def _tokenizer(tmp_path):
    corpus = tmp_path / "corpus.txt"
    words = ["red", "blue", "green", "circle", "square", "triangle", "left", "right", "of", "a", "the", "is", "what"]
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (8,), generator=gen)) for _ in range(300)]
    corpus.write_text("\n".join(lines))
    return imglish.TextTokenizer(train_sentencepiece([corpus], vocab_size=30, output=tmp_path / "spm.model", seed=0))


def test_strings_and_images_to_answers_and_back_from_disk(tmp_path):
    tok = _tokenizer(tmp_path)
    model, proc = imglish.create_model_and_processor(
        "beit3_tiny_patch16_224_vqav2", tokenizer=tok, img_size=32, patch_size=8, depth=2,
        vocab_size=tok.vocab_size, num_classes=5, max_length=12,
    )
    model.eval()
    images = [Image.new("RGB", (50, 40), (255, 0, 0)), Image.new("RGB", (20, 30), (0, 0, 255))]
    batch = proc(images=images, text=["what is left of the circle", "a red square"])
    assert batch["image"].shape == (2, 3, 32, 32)
    assert batch["input_ids"].shape == (2, 12) and batch["padding_mask"].shape == (2, 12)
    # the VQA transform normalises with mean/std 0.5: a pure red pixel maps to (1, -1, -1)
    torch.testing.assert_close(batch["image"][0, :, 5, 5], torch.tensor([1.0, -1.0, -1.0]), atol=1e-2, rtol=0)
    logits = model(image=batch["image"], question=batch["input_ids"], padding_mask=batch["padding_mask"])
    assert logits.shape == (2, 5)

    path = imglish.save_model(model, tmp_path / "run" / "model.safetensors", processor=proc)
    again, proc2 = imglish.create_model_and_processor(None, pretrained=path)
    again.eval()
    batch2 = proc2(images=images, text=["what is left of the circle", "a red square"])
    assert torch.equal(batch2["input_ids"], batch["input_ids"])
    torch.testing.assert_close(again(batch2["image"], batch2["input_ids"], batch2["padding_mask"]), logits)


def test_classification_processor_uses_imagenet_statistics():
    model, proc = imglish.create_model_and_processor("beit3_tiny_patch16_224_imageclassification", img_size=32,
                                                    patch_size=8, depth=1)
    assert proc.tokenizer is None
    assert tuple(proc.transform_config.mean) == (0.485, 0.456, 0.406)
    x = proc(images=Image.new("RGB", (64, 48), (128, 128, 128)))["image"]
    assert model.eval()(x).shape == (1, 1000)
