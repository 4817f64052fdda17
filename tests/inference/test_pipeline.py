"""``imglish.pipeline``: every task's answers against a direct forward of the same model, input forms, batches and
bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import imglish
from imglish.inference import InputError, pipeline
from imglish.inference.templates import DEFAULT_TEMPLATES


def _direct(ckpt):
    model, proc = imglish.create_model_and_processor(None, ckpt)
    return model.eval(), proc


def _same(a, b, tol=1e-5):
    """Two answers (lists of {label/answer, score} dicts) with the same labels and scores within ``tol``."""
    assert [{k: v for k, v in x.items() if k != "score"} for x in a] == [
        {k: v for k, v in y.items() if k != "score"} for y in b]
    assert [x["score"] for x in a] == pytest.approx([y["score"] for y in b], abs=tol)
    return True


def _pixels(proc, path):
    return proc.preprocess_images([path])


@torch.no_grad()
def test_classify_matches_direct_forward(checkpoints, images):
    model, proc = _direct(checkpoints["classify"])
    pipe = pipeline("classify", checkpoints["classify"], device="cpu")
    # it reads no text, so it holds only the vision weights, and answers as the full model does
    assert pipe.model.config.modalities == ("vision",) and model.config.modalities == ("vision", "text")
    assert sum(p.numel() for p in pipe.model.parameters()) < sum(p.numel() for p in model.parameters())
    answers = pipe(images, top_k=2)
    assert len(answers) == len(images)
    classes = ["cat", "dog", "fish"]
    for path, ans in zip(images, answers):
        probs = model(image=_pixels(proc, path)).softmax(-1)[0]
        top = probs.topk(2)
        assert [a["label"] for a in ans] == [classes[int(k)] for k in top.indices]
        assert [a["score"] for a in ans] == pytest.approx(top.values.tolist(), abs=1e-5)
    one = pipe(images[0])
    assert len(one) == 3 and _same(one[:2], answers[0])  # top_k above the class count is capped


@torch.no_grad()
def test_vqa_matches_direct_forward(checkpoints, images):
    model, proc = _direct(checkpoints["vqa"])
    pipe = pipeline("vqa", checkpoints["vqa"], device="cpu")
    answers_vocab = ["red", "green", "blue", "two", "yes", "no"]
    questions = ["what colour is the ball", "how many cubes are there"]
    got = pipe(images[1], question=questions, top_k=3)
    for q, ans in zip(questions, got):
        batch = proc(images=[images[1]], text=[q])
        scores = model(image=batch["image"], question=batch["input_ids"], padding_mask=batch["padding_mask"])
        top = scores.sigmoid()[0].topk(3)
        assert [a["answer"] for a in ans] == [answers_vocab[int(k)] for k in top.indices]
        assert [a["score"] for a in ans] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert _same(pipe(images[1], question=questions[0], top_k=3), got[0])


@torch.no_grad()
def test_caption_matches_generate(checkpoints, images):
    from imglish.generation import GenerationConfig, generate

    model, proc = _direct(checkpoints["caption"])
    tok = proc.tokenizer
    pipe = pipeline("caption", checkpoints["caption"], device="cpu")
    got = pipe(images[:2], num_beams=2, max_length=8)
    cfg = GenerationConfig(max_len=8, num_beams=2, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id, mask_token_id=tok.mask_token_id)
    rows = generate(model, proc.preprocess_images(images[:2]), cfg).tolist()
    for row, ans in zip(rows, got):
        if tok.eos_token_id in row[1:]:
            row = row[: row.index(tok.eos_token_id, 1)]
        assert ans == [{"generated_text": tok.decode(row, skip_special_tokens=True).strip()}]
        assert ans[0]["generated_text"]  # random weights still emit some tokens before EOS


@torch.no_grad()
def test_nlvr2_matches_direct_forward(checkpoints, images):
    model, proc = _direct(checkpoints["nlvr2"])
    pipe = pipeline("nlvr2", checkpoints["nlvr2"], device="cpu")
    got = pipe(images[0], images[2], text="two red balls are left of a cube")
    batch = proc(images=[images[0]], text=["two red balls are left of a cube"])
    probs = model(image_a=batch["image"], image_b=proc.preprocess_images([images[2]]),
                  text_description=batch["input_ids"], padding_mask=batch["padding_mask"]).softmax(-1)[0]
    k = int(probs.argmax())
    assert got == {"label": ("False", "True")[k], "score": pytest.approx(float(probs[k]), abs=1e-5)}
    many = pipe([images[0], images[1]], [images[2], images[3]], text="a red ball")
    assert len(many) == 2 and all(set(a) == {"label", "score"} for a in many)


@torch.no_grad()
def test_zeroshot_is_the_template_mean_of_normalised_prompts(checkpoints, images):
    model, proc = _direct(checkpoints["retrieval"])
    pipe = pipeline("zeroshot", checkpoints["retrieval"], device="cpu")
    labels = ["cat", "dog", "fish"]
    got = pipe(images[3], labels=labels)
    assert [a["label"] for a in got] != [] and sorted(a["label"] for a in got) == sorted(labels)
    assert [a["score"] for a in got] == sorted((a["score"] for a in got), reverse=True)
    classes = []
    for label in labels:
        t = proc(text=[tpl.format(label) for tpl in DEFAULT_TEMPLATES])
        e = F.normalize(model.encode_text(t["input_ids"], t["padding_mask"]), dim=-1)
        classes.append(F.normalize(e.mean(0), dim=-1))
    img = model.encode_image(proc.preprocess_images([images[3]]))[0]
    probs = (model.logit_scale.exp().clamp(max=100) * torch.stack(classes) @ img).softmax(-1)
    want = {labels[k]: float(probs[k]) for k in range(3)}
    assert {a["label"]: a["score"] for a in got} == pytest.approx(want, abs=1e-5)
    assert got[0]["label"] == labels[int(probs.argmax())]
    # one template, comma-separated labels, top_k
    one = pipe(images[3], labels="cat, dog", templates=["a photo of a {}."], top_k=1)
    assert len(one) == 1 and one[0]["label"] in ("cat", "dog")


@torch.no_grad()
def test_rank_and_embed_are_cosines_of_the_encoders(checkpoints, images):
    model, proc = _direct(checkpoints["retrieval"])
    texts = ["a red ball", "a blue cube", "two green triangles"]
    got = pipeline("rank", checkpoints["retrieval"], device="cpu")(images, texts)
    img = model.encode_image(proc.preprocess_images(images))
    t = proc(text=texts)
    txt = model.encode_text(t["input_ids"], t["padding_mask"])
    scores = img @ txt.t()
    assert torch.tensor(got["scores"]) == pytest.approx(scores, abs=1e-5)
    assert got["image_to_text"] == scores.argsort(1, descending=True).tolist()
    assert got["text_to_image"] == scores.t().argsort(1, descending=True).tolist()
    emb = pipeline("embed", checkpoints["retrieval"], device="cpu")(images=images, texts=texts)
    assert emb["image_embeds"].shape == (4, model.config.embed_dim)
    assert torch.allclose(emb["image_embeds"], img, atol=1e-5) and torch.allclose(emb["text_embeds"], txt, atol=1e-5)


def test_every_input_form_gives_the_same_answer(checkpoints, images):
    pipe = pipeline("classify", checkpoints["classify"], device="cpu")
    pil = Image.open(images[1]).convert("RGB")
    arr = np.array(pil)
    forms = [str(images[1]), images[1], images[1].read_bytes(), pil, arr, torch.from_numpy(arr).permute(2, 0, 1),
             torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0, arr.astype(np.float32) / 255.0]
    answers = pipe(forms, top_k=3)
    for ans in answers[1:]:
        assert [a["label"] for a in ans] == [a["label"] for a in answers[0]]
        assert [a["score"] for a in ans] == pytest.approx([a["score"] for a in answers[0]], abs=1e-5)
    grey = pipe(np.asarray(pil.convert("L")))
    assert len(grey) == 3


def test_batches_equal_single_calls(checkpoints, images):
    small = pipeline("vqa", checkpoints["vqa"], device="cpu", batch_size=1)
    big = pipeline("vqa", checkpoints["vqa"], device="cpu", batch_size=8)
    qs = ["what colour is the ball", "how many", "is the cube red", "what is left of the square"]
    a, b = small(images, question=qs, top_k=2), big(images, question=qs, top_k=2)
    for x, y in zip(a, b):
        assert [r["answer"] for r in x] == [r["answer"] for r in y]
        assert [r["score"] for r in x] == pytest.approx([r["score"] for r in y], abs=1e-5)


def test_bf16_runs_and_agrees_roughly(checkpoints, images):
    fp32 = pipeline("classify", checkpoints["classify"], device="cpu")(images[0], top_k=3)
    bf16 = pipeline("classify", checkpoints["classify"], device="cpu", precision="bf16")(images[0], top_k=3)
    assert {a["label"]: a["score"] for a in bf16} == pytest.approx({a["label"]: a["score"] for a in fp32}, abs=0.05)


def test_bf16_holds_bf16_weights_and_embeds_like_fp32(checkpoints, images):
    fp32 = pipeline("embed", checkpoints["retrieval"], device="cpu")
    bf16 = pipeline("embed", checkpoints["retrieval"], device="cpu", precision="bf16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}  # cast once, no autocast per call
    a, b = fp32(images=images, texts=["a red ball", "two cats"]), bf16(images=images, texts=["a red ball", "two cats"])
    for key in ("image_embeds", "text_embeds"):
        assert b[key].dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(a[key], b[key])
        assert cos.min() > 0.999, (key, cos)
    caption = pipeline("caption", checkpoints["caption"], device="cpu", precision="bf16")(images[0], max_length=6)
    assert isinstance(caption[0]["generated_text"], str)  # generation runs on bf16 weights and a bf16 cache


# ============================================================================================= bad input
def test_checkpoint_of_another_task_is_named(checkpoints):
    with pytest.raises(ValueError, match=r"holds a 'vqav2' model .*`caption` needs a 'captioning' model"):
        pipeline("caption", checkpoints["vqa"])
    with pytest.raises(ValueError, match="'retrieval' model"):
        pipeline("zeroshot", checkpoints["classify"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipeline("vqa", "/no/such/model.safetensors")
    with pytest.raises(ValueError, match="unknown pipeline 'paint'"):
        pipeline("paint", checkpoints["vqa"])
    with pytest.raises(ValueError, match=r"`segment` needs a 'segmentation' model \(made by `imglish finetune ade20k`"):
        pipeline("segment", checkpoints["vqa"])


def test_bad_images_and_texts_raise_input_errors_naming_them(checkpoints, images, bad_files):
    pipe = pipeline("vqa", checkpoints["vqa"], device="cpu")
    for kind, path in bad_files.items():
        with pytest.raises(InputError, match=str(path.name)):
            pipe(path, question="what colour")
    with pytest.raises(InputError, match="is 40 tokens; the model takes at most 30"):
        pipe(images[0], question=" ".join(["red"] * 40))
    with pytest.raises(InputError, match="question '' is empty"):
        pipe(images[0], question="")
    with pytest.raises(InputError, match="question must be a string"):
        pipe(images[0], question=3)
    with pytest.raises(InputError, match="top_k must be at least 1"):
        pipe(images[0], question="what colour", top_k=0)
    with pytest.raises(InputError, match="an array must be"):
        pipe(np.zeros((2, 3, 4, 5), dtype=np.uint8), question="what")
    with pytest.raises(InputError, match=r"values in \[0, 1\]"):
        pipe(np.full((8, 8, 3), 7.0, dtype=np.float32), question="what")
    with pytest.raises(InputError, match="expected a path, bytes"):
        pipe(object(), question="what")
    with pytest.raises(InputError, match="2 images and 3 questions"):
        pipe(images[:2], question=["a", "b", "c"])


def test_pixel_limit_is_checked_before_decoding(checkpoints, tmp_path):
    big = tmp_path / "big.png"
    Image.new("1", (5000, 4000)).save(big)  # 20 megapixels in a few kilobytes
    pipe = pipeline("classify", checkpoints["classify"], device="cpu", max_pixels=1_000_000)
    with pytest.raises(InputError, match="is 5000x4000 = 20000000 pixels; at most 1000000"):
        pipe(big)
    buf = io.BytesIO()
    Image.new("1", (5000, 4000)).save(buf, format="PNG")
    with pytest.raises(InputError, match="at most 1000000"):
        pipe(buf.getvalue())


def test_skip_errors_answers_the_good_inputs(checkpoints, images, bad_files):
    pipe = pipeline("classify", checkpoints["classify"], device="cpu")
    examples = [{"image": images[0]}, {"image": bad_files["truncated"]}, {"image": images[1]}]
    out = pipe.run(examples, skip_errors=True, top_k=1)
    assert isinstance(out[1], InputError) and "truncated" in str(out[1])
    assert _same(out[0], pipe(images[0], top_k=1)) and _same(out[2], pipe(images[1], top_k=1))
    with pytest.raises(InputError):
        pipe.run(examples)


def test_labels_from_task_json_or_given(checkpoints, tmp_path, images):
    pipe = pipeline("classify", checkpoints["classify"], device="cpu")
    assert pipe.labels == ["cat", "dog", "fish"]
    f = tmp_path / "names.txt"
    f.write_text("tabby\nbeagle\ngoldfish\n")
    named = pipeline("classify", checkpoints["classify"], device="cpu", labels=f)
    assert named(images[0], top_k=1)[0]["label"] == {"cat": "tabby", "dog": "beagle", "fish": "goldfish"}[
        pipe(images[0], top_k=1)[0]["label"]]
    with pytest.raises(ValueError, match="2 class names were given but the model has 3 classes"):
        pipeline("classify", checkpoints["classify"], labels=["a", "b"])


def test_official_pth_needs_a_model_name_and_matches_the_imglish_file(checkpoints, infer_tokenizer, tmp_path,
                                                                       images):
    from imglish.model.convert import to_official

    name = "beit3_tiny_patch16_224_vqav2"
    torch.manual_seed(3)
    model = imglish.create_model(name, num_classes=3129).eval()
    pth = tmp_path / "official.pth"
    torch.save({"model": to_official(model)}, pth)
    with pytest.raises(ValueError, match="not an imglish checkpoint .* pass the registered model name"):
        pipeline("vqa", pth)
    with pytest.raises(ValueError, match="needs a text tokenizer"):
        pipeline("vqa", pth, model=name)
    with pytest.raises(ValueError, match="is a 'captioning' model|holds model 'beit3_tiny_patch16_224_captioning'"):
        pipeline("vqa", pth, model="beit3_tiny_patch16_224_captioning", tokenizer=infer_tokenizer)
    pipe = pipeline("vqa", pth, model=name, tokenizer=infer_tokenizer, device="cpu")
    got = pipe(images[0], question="what colour is the ball", top_k=2)
    batch = pipe.processor(images=[images[0]], text=["what colour is the ball"])
    with torch.no_grad():
        scores = model(image=batch["image"], question=batch["input_ids"], padding_mask=batch["padding_mask"])
    top = scores.sigmoid()[0].topk(2)
    assert [a["answer"] for a in got] == [str(int(k)) for k in top.indices]  # no vocabulary: label numbers
    assert [a["score"] for a in got] == pytest.approx(top.values.tolist(), abs=1e-5)
