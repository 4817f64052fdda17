"""VQ-KD training: the loss falls, checkpoints resume exactly, tokens are precomputed; teachers; the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from imglish.cli.main import main
from imglish.tokenizers.teachers import HOGTeacher, PixelTeacher, build_teacher
from imglish.tokenizers.vqkd import load_vqkd
from imglish.tokenizers.vqkd_train import (
    VisualTokenizerTrainConfig,
    codebook_usage,
    load_visual_tokens,
    precompute_visual_tokens,
    train_visual_tokenizer,
)
from tests.tokenizers.tok_synthetic import write_images

SMALL = dict(img_size=32, embed_dim=32, depth=1, num_heads=2, n_code=32, code_dim=8)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    write_images(folder, 48, size=32, seed=0)
    (folder / "broken.png").write_bytes(b"not an image")  # skipped, never fatal
    return folder


def _cfg(images: Path, out: Path, **kw) -> VisualTokenizerTrainConfig:
    base = dict(images=str(images), out=str(out), model_overrides=dict(SMALL), teacher="pixels+hog", steps=40,
                batch_size=16, lr=3e-3, warmup_steps=5, save_every=10, progress=False, device="cpu",
                restart_every=10)
    base.update(kw)
    return VisualTokenizerTrainConfig(**base)


def test_training_lowers_the_reconstruction_loss(images, tmp_path):
    result = train_visual_tokenizer(_cfg(images, tmp_path / "run"))
    losses = [h["rec_loss"] for h in result.history]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped_images"] >= 1
    assert 0 < result.usage <= 1 and metrics["codes_used"] == result.codes_used
    model, report = load_vqkd(result.tokenizer_path)
    assert report.ok
    usage, counts = codebook_usage(model, images)
    assert usage == pytest.approx(result.usage) and counts.sum() == 48 * 16


def test_resume_continues_bitwise(images, tmp_path):
    full = train_visual_tokenizer(_cfg(images, tmp_path / "full", steps=20))
    part = train_visual_tokenizer(_cfg(images, tmp_path / "part", steps=20, stop_at=7))  # "killed" at step 7
    assert part.step == 7
    ckpt = torch.load(part.checkpoint_path, weights_only=True)
    assert ckpt["step"] == 7
    resumed = train_visual_tokenizer(_cfg(images, tmp_path / "part", steps=20))
    assert resumed.step == 20 and len(resumed.history) == 20
    a = load_vqkd(full.tokenizer_path)[0].state_dict()
    b = load_vqkd(resumed.tokenizer_path)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]


def test_precompute_matches_the_tokenizer(images, tmp_path):
    result = train_visual_tokenizer(_cfg(images, tmp_path / "run", steps=3, restart_every=0))
    out = precompute_visual_tokens(result.tokenizer_path, images, tmp_path / "tokens.safetensors", batch_size=7,
                                   progress=False, device="cpu")
    tokens = load_visual_tokens(out)
    assert len(tokens) == 49 and tokens["broken.png"].eq(-1).all()
    model = load_vqkd(result.tokenizer_path)[0]
    from imglish.tokenizers.image import load_image
    from imglish.tokenizers.vqkd_train import _eval_transform

    rel = "a/img_00001.png"
    x = _eval_transform(32)(load_image(images / rel))[None]
    assert torch.equal(tokens[rel].long(), model.get_codebook_indices(x)[0])


def test_cli_train_visual_and_precompute(images, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["tokenizer", "train-visual", "--images", str(images), "--out", str(out), "--steps", "4",
            "--batch-size", "8", "--img-size", "32", "--n-code", "16", "--set", "embed_dim=32", "--set", "depth=1",
            "--set", "num_heads=2", "--teacher", "pixels", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    assert "codebook usage" in capsys.readouterr().out
    assert (out / "vqkd.safetensors").is_file() and (out / "checkpoint.pt").is_file()
    assert main(args + ["--steps", "6"]) == 0  # resumes from step 4
    assert main(args[:-5] + ["--steps", "8", "--no-progress"]) == 2  # another teacher: a clear error
    assert "made with teacher 'pixels'" in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 6
    tok = tmp_path / "t.safetensors"
    assert main(["tokenizer", "precompute", "--tokenizer", str(out / "vqkd.safetensors"), "--images", str(images),
                 "--output", str(tok), "--no-progress", "--device", "cpu"]) == 0
    assert len(load_visual_tokens(tok)) == 49
    assert main(["tokenizer", "train-visual", "--images", str(tmp_path / "none"), "--out", str(out)]) == 2


def test_builtin_teachers_shapes_and_meaning():
    x = torch.zeros(2, 3, 16, 16)
    x[:, 0, :, :8] = 1.0  # red left half: a vertical edge in the middle
    pix = PixelTeacher(8, cells=4)(x)
    assert pix.shape == (2, 4, 48)
    assert pix[0, 0, :16].eq(1).all() and pix[0, 1, :16].eq(-1).all()  # red channel of left/right patches
    hog = HOGTeacher(8, cells=2)(x)
    assert hog.shape == (2, 4, 3 * 4 * 9)
    flat = torch.zeros(1, 3, 16, 16)
    assert HOGTeacher(8)(flat).abs().sum() == 0  # no gradients, no histogram
    # the edge is vertical: gradient along x, orientation bin 0
    red = hog[0, 0].reshape(3, 2, 2, 9)[0]
    assert red[..., 0].sum() > 0 and red[..., 1:].sum() == 0
    both = build_teacher("pixels+hog", 8)
    assert both(x).shape == (2, 4, 48 + 108) and both.name == "pixels+hog"
    with pytest.raises(ValueError, match="unknown teacher"):
        build_teacher("sift", 8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_teacher("clip:/no/such/folder", 8)


def test_clip_teacher_from_a_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8, projection_dim=24)
    torch.manual_seed(0)
    transformers.CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path / "clip")
    teacher = build_teacher(f"clip:{tmp_path / 'clip'}", patch_size=8)
    assert teacher.out_dim == 24
    feats = teacher(torch.rand(2, 3, 32, 32))
    assert feats.shape == (2, 16, 24)
    assert teacher(torch.rand(1, 3, 64, 64)).shape == (1, 64, 24)  # resized onto the tokenizer grid


def _save_tiny(tmp_path: Path, name: str, mean: float = 0.5) -> Path:
    from imglish.model.loading import save_model
    from imglish.registry import create_model
    from imglish.tokenizers.processor import Processor
    from imglish.tokenizers.transforms import TransformConfig

    torch.manual_seed(0)
    model = create_model(name, img_size=32, patch_size=8, **({"num_classes": 3} if "classification" in name else {}))
    proc = Processor(None, TransformConfig.for_task("retrieval", 32, mean=(mean,) * 3, std=(0.25,) * 3))
    return save_model(model, tmp_path / name / "model.safetensors", processor=proc)


def test_beit3_teacher_reads_the_vision_tower_of_a_retrieval_model(tmp_path, images):
    from imglish.registry import create_model

    path = _save_tiny(tmp_path, "beit3_tiny_patch16_224_retrieval", mean=0.4)
    teacher = build_teacher(f"beit3:{path}", patch_size=8)
    model = create_model(None, path).eval()
    assert teacher.name == "beit3" and teacher.out_dim == model.config.embed_dim
    x = torch.rand(2, 3, 32, 32)
    feats = teacher(x)
    assert feats.shape == (2, 16, model.config.embed_dim)
    with torch.no_grad():  # the Processor's mean/std, the last layer's patch tokens, the vision head
        want = model.vision_head(model.beit3((x - 0.4) / 0.25).last_hidden_state[:, 1:])
    torch.testing.assert_close(feats, want)
    assert teacher(torch.rand(1, 3, 64, 64)).shape == (1, 64, model.config.embed_dim)  # onto the tokenizer grid
    assert not any(p.requires_grad for p in teacher.parameters())
    # a VQ-KD trains against it; its decoder follows the teacher's width
    out = tmp_path / "vqkd"
    train_visual_tokenizer(_cfg(images, out, teacher=f"beit3:{path}", steps=6, save_every=3))
    tok, _ = load_vqkd(out / "vqkd.safetensors")
    assert tok.config.decoder_out_dim == model.config.embed_dim
    assert json.loads((out / "metrics.json").read_text())["teacher"] == f"beit3:{path}"


def test_beit3_teacher_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="beit3 teacher .* does not exist"):
        build_teacher(f"beit3:{tmp_path / 'none.safetensors'}", 8)
    other = _save_tiny(tmp_path, "beit3_tiny_patch16_224_imageclassification")
    with pytest.raises(ValueError, match="must be an imglish model of the retrieval task.*'imageclassification'"):
        build_teacher(f"beit3:{other}", 8)
