"""The k-means visual tokenizer: k-means itself, the conv CLIP teacher learns to match images to captions, the
tokenizer's codes follow what the teacher sees, files round-trip, and precompute and the loaders take it."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from imglish.tokenizers.kmeans import (
    ConvCLIP,
    ConvCLIPConfig,
    KMeansTokenizer,
    KMeansTokenizerConfig,
    KMeansTrainConfig,
    fit_kmeans,
    load_conv_clip,
    load_kmeans_tokenizer,
    load_visual_tokenizer,
    train_kmeans_tokenizer,
)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "bar")
WORDS = ["<pad>", "a", "the", "on", "black", *COLOURS, *SHAPES]
VOCAB = {w: i for i, w in enumerate(WORDS)}


def _scene(colour: str, shape: str, seed: int) -> Image.Image:
    """A 32x32 scene: a coloured square (top-left quarter) or a horizontal bar somewhere on black, plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(32, 32, 3, generator=g) * 40).to(torch.uint8)
    c = torch.tensor(COLOURS[colour], dtype=torch.uint8)
    if shape == "square":
        r, k = torch.randint(0, 16, (2,), generator=g).tolist()
        x[r:r + 16, k:k + 16] = c
    else:
        r = int(torch.randint(0, 28, (1,), generator=g))
        x[r:r + 4, :] = c
    return Image.fromarray(x.numpy())


def _pairs(n: int, seed: int) -> list[dict]:
    out = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 2]
        out.append({"image": _scene(colour, shape, seed * 1000 + i), "text": f"a {colour} {shape} on the black",
                    "image_index": i})
    return out


def _encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [[VOCAB[w] for w in t.split()] for t in texts]
    n = max(map(len, ids))
    out = torch.zeros(len(ids), n, dtype=torch.long)
    pad = torch.ones(len(ids), n, dtype=torch.bool)
    for i, row in enumerate(ids):
        out[i, : len(row)] = torch.tensor(row)
        pad[i, : len(row)] = False
    return out, pad


def _config(out, **kw) -> KMeansTrainConfig:
    base = {"out": str(out), "img_size": 32, "patch_size": 8, "width": 32, "n_code": 8, "steps": 40,
            "batch_size": 16, "lr": 3e-3, "kmeans_images": 64, "progress": False}
    base.update(kw)
    return KMeansTrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("kmeans")
    torch.set_num_threads(1)
    return train_kmeans_tokenizer(_pairs(96, seed=1), _encode, len(WORDS), _config(out)), out


def test_fit_kmeans_finds_separated_clusters_and_is_seeded():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    z = torch.cat([c + 0.1 * torch.randn(50, 2, generator=gen) for c in centres])
    found = fit_kmeans(z, 3, seed=4)
    assert torch.cdist(centres, found).min(1).values.max() < 0.5
    assert torch.equal(found, fit_kmeans(z, 3, seed=4))
    with pytest.raises(ValueError, match="needs at least k points"):
        fit_kmeans(z[:2], 3)
    with pytest.raises(ValueError, match=r"must be \(M, D\)"):
        fit_kmeans(z.flatten(), 3)


def test_conv_clip_learns_to_match_held_out_images_to_their_captions(trained):
    result, _ = trained
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    clip = load_conv_clip(result.teacher_path)
    held = _pairs(8, seed=7)  # one of each colour and shape, new noise and positions
    from imglish.tokenizers.vqkd_train import _eval_transform

    tf = _eval_transform(32)
    with torch.no_grad():
        img = clip.encode_image(torch.stack([tf(p["image"]) for p in held]))
        txt = clip.encode_text(*_encode([p["text"] for p in held]))
    right = (img @ txt.T).argmax(1).eq(torch.arange(8)).sum().item()
    assert right >= 6, right  # chance: 1 of 8


def test_codes_tell_the_colours_apart_and_the_file_round_trips(trained):
    result, _ = trained
    assert result.steps == 40 and result.skipped == 0 and result.codes_used >= 4
    tok = load_visual_tokenizer(result.tokenizer_path)
    assert isinstance(tok, KMeansTokenizer) and tok.n_code == 8 and tok.config.num_tokens == 16
    from imglish.tokenizers.vqkd_train import _eval_transform

    tf = _eval_transform(32)
    red = tok.get_codebook_indices(torch.stack([tf(_scene("red", "square", s)) for s in range(4)]))
    blue = tok.get_codebook_indices(torch.stack([tf(_scene("blue", "square", s)) for s in range(4)]))
    assert red.shape == (4, 16) and red.dtype == torch.long
    # the most common code of a red square's patches is never that of a blue one's: not the background's code
    assert set(red.flatten().tolist()) != set(blue.flatten().tolist())
    again = load_kmeans_tokenizer(result.tokenizer_path)
    assert torch.equal(again.get_codebook_indices(torch.stack([tf(_scene("red", "bar", 3))])),
                       tok.get_codebook_indices(torch.stack([tf(_scene("red", "bar", 3))])))
    tok.train()  # a tokenizer stays frozen: BatchNorm keeps its statistics
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())


def test_seeded_training_is_reproducible(tmp_path):
    pairs = _pairs(32, seed=2)
    a = train_kmeans_tokenizer(pairs, _encode, len(WORDS), _config(tmp_path / "a", steps=3, batch_size=8))
    b = train_kmeans_tokenizer(pairs, _encode, len(WORDS), _config(tmp_path / "b", steps=3, batch_size=8))
    assert a.losses == b.losses
    ta, tb = load_kmeans_tokenizer(a.tokenizer_path), load_kmeans_tokenizer(b.tokenizer_path)
    assert all(torch.equal(x, y) for x, y in zip(ta.state_dict().values(), tb.state_dict().values()))


def test_bad_records_are_skipped_and_counted(tmp_path):
    from imglish.data.skip import BadRecordCounter

    skipped = BadRecordCounter().report("test", 3, "image unreadable", "broken")
    pairs = _pairs(24, seed=3) + [skipped, {"image": _scene("red", "bar", 0), "text": "  "}]
    result = train_kmeans_tokenizer(pairs, _encode, len(WORDS), _config(tmp_path, steps=2, batch_size=32))
    assert result.skipped >= 2 and result.steps == 2


def test_clear_errors(trained, tmp_path):
    result, _ = trained
    tok = load_kmeans_tokenizer(result.tokenizer_path)
    with pytest.raises(ValueError, match="codes 32x32 images, got 64x64"):
        tok.get_codebook_indices(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"must be \(B, 3, H, W\)"):
        tok.get_codebook_indices(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="not a k-means tokenizer file"):
        load_kmeans_tokenizer(result.teacher_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_visual_tokenizer(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="power of two"):
        ConvCLIPConfig(patch_size=12)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        ConvCLIPConfig(img_size=40, patch_size=16)
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        KMeansTrainConfig(out=str(tmp_path), batch_size=1)
    with pytest.raises(ValueError, match="fewer than the 128 codes"):
        train_kmeans_tokenizer(_pairs(4, seed=0), _encode, len(WORDS),
                               _config(tmp_path / "few", steps=1, batch_size=4, n_code=128))


def test_load_visual_tokenizer_reads_vqkd_files_too(tmp_path):
    from imglish.tokenizers.vqkd import VQKD, create_vqkd, save_vqkd

    path = save_vqkd(create_vqkd("vqkd_tiny_patch8_64", img_size=32, n_code=8), tmp_path / "vqkd.safetensors")
    assert isinstance(load_visual_tokenizer(path), VQKD)


def test_precompute_writes_the_tokenizers_codes(trained, tmp_path):
    from imglish.tokenizers.vqkd_train import _eval_transform, load_visual_tokens, precompute_visual_tokens

    result, _ = trained
    folder = tmp_path / "images"
    folder.mkdir()
    scenes = [_scene(c, "bar", i) for i, c in enumerate(COLOURS)]
    for i, s in enumerate(scenes):
        s.save(folder / f"{i}.png")
    file = precompute_visual_tokens(result.tokenizer_path, folder, tmp_path / "codes.safetensors", progress=False)
    tokens = load_visual_tokens(file)
    tok = load_kmeans_tokenizer(result.tokenizer_path)
    tf = _eval_transform(32)
    for i in range(4):
        key = next(k for k in tokens if str(k).endswith(f"{i}.png"))
        assert torch.equal(tokens[key].long(), tok.get_codebook_indices(tf(scenes[i]).unsqueeze(0))[0])


def test_tokenizer_from_an_untrained_teacher_has_the_teachers_tower():
    clip = ConvCLIP(ConvCLIPConfig(img_size=32, patch_size=8, width=16, vocab_size=10))
    tok = KMeansTokenizer.from_teacher(clip, 4)
    assert tok.config == KMeansTokenizerConfig(teacher=clip.config, n_code=4)
    for (name, a), (_, b) in zip(tok.tower.state_dict().items(), clip.tower.state_dict().items()):
        assert torch.equal(a, b), name


def test_cli_train_kmeans_then_precompute(tmp_path, capsys):
    from imglish.cli.main import main
    from imglish.data.synthetic import WorldConfig, generate_world
    from imglish.tokenizers.text import train_sentencepiece
    from imglish.tokenizers.vqkd_train import load_visual_tokens

    world = tmp_path / "w"
    generate_world(WorldConfig(num_images=24, image_size=32, seed=2, formats=("coco", "imagenet", "text"),
                               workers=1), world)
    spm = train_sentencepiece([world / "text" / "train.txt"], 100, tmp_path / "t.model", model_type="bpe",
                              extra_options={"hard_vocab_limit": False})
    out = tmp_path / "km"
    assert main(["tokenizer", "train-kmeans", "--captions", str(world / "coco" / "dataset_coco.json"),
                 "--text-tokenizer", str(spm), "--out", str(out), "--img-size", "32", "--patch-size", "8",
                 "--width", "16", "--n-code", "8", "--steps", "2", "--batch-size", "8", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "kmeans.safetensors" in said and "in 2 steps" in said
    assert main(["tokenizer", "precompute", "--tokenizer", str(out / "kmeans.safetensors"), "--images",
                 str(world / "imagenet" / "train"), "--output", str(tmp_path / "codes.safetensors"),
                 "--no-progress"]) == 0
    codes = torch.stack(list(load_visual_tokens(tmp_path / "codes.safetensors").values()))
    assert codes.shape[1] == 16 and 0 <= int(codes.min()) and int(codes.max()) < 8
    assert main(["tokenizer", "train-kmeans", "--captions", str(world / "coco" / "dataset_coco.json"),
                 "--splits", "test2", "--text-tokenizer", str(spm), "--out", str(out)]) != 0
    assert "unknown Karpathy split" in capsys.readouterr().err
