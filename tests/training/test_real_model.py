"""End to end with the real tiny imglish model: ``imglish pretrain --config FILE`` on a small generated world trains
both tokenizers, reads the world through the ``imglish.data`` readers, and the masked-modeling loss really falls."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import tiny_pretrain_args  # noqa: E402

from imglish.cli.main import main as cli_main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from imglish.data.synthetic import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("world") / "w"
    generate_world(
        WorldConfig(
            num_images=80, image_size=32, seed=3, formats=("coco", "imagenet", "text", "wds"), workers=1
        ),
        out,
    )
    return out


def _listing(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


def _window_mean(rows: list[dict], key: str, first: bool, n: int = 5) -> float:
    vals = [r[key] for r in rows if key in r]
    part = vals[:n] if first else vals[-n:]
    return sum(part) / len(part)


def test_real_tiny_model_loss_falls_through_cli_config(world, tmp_path, capsys):
    config = {
        "model": {"img_size": 32, "patch_size": 8},
        "data": {
            "image_batch": 8,
            "text_batch": 16,
            "pair_batch": 8,
            "max_text_len": 24,
            "text_vocab_size": 120,
            "visual_tokenizer_codes": 16,
            "visual_tokenizer_steps": 8,
            "heldout_batches": 1,
        },
        "optim": {"lr": 2e-3},
        "schedule": {"warmup_steps": 3, "max_steps": 999},  # the flag below wins over the file
        "checkpoint.save_every": 0,
        "logging": {"progress": False, "tensorboard": False, "log_every": 1},
        "parallel.threads": 1,
    }
    cfg_file = tmp_path / "tiny.json"
    cfg_file.write_text(json.dumps(config))
    out = tmp_path / "run"
    before = _listing(world)
    rc = cli_main(
        [
            "pretrain",
            "--preset",
            "tiny",
            "--config",
            str(cfg_file),
            "--data",
            str(world),
            "--out",
            str(out),
            "--max-steps",
            "30",
        ]
    )
    assert rc == 0
    assert _listing(world) == before, "pretraining wrote into the data folder"
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["schedule"]["max_steps"] == 30 and resolved["data"]["text_vocab_size"] == 120
    assert (out / "tokenizers" / "text.model").exists() and (
        out / "tokenizers" / "captions_train.txt"
    ).exists()
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(rows) == 30
    # means over the first and last 5 steps; ln(vocabulary) is where an untrained model starts
    for key, factor in (
        ("loss/image.mim", 0.7),
        ("loss/text.mlm", 0.9),
        ("loss/pair.mlm", 0.9),
        ("loss", 0.8),
    ):
        first, last = _window_mean(rows, key, True), _window_mean(rows, key, False)
        assert last < factor * first, (key, first, last)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["heldout"]) == {"image.mim", "text.mlm", "pair.mlm"}
    assert summary["bad_records"] == {}
    assert "held-out text.mlm" in capsys.readouterr().out

    import imglish

    model, processor = imglish.create_model_and_processor(None, pretrained=str(out / "model.safetensors"))
    assert sum(p.numel() for p in model.parameters()) > 0
    # the processor saved next to the model turns raw text and images into inputs the model accepts
    assert processor.tokenizer is not None and processor.tokenizer.vocab_size == model.config.vocab_size
    from imglish.tokenizers.image import find_images

    first_image = find_images(world)[0]
    batch = processor(images=[first_image], text=["a red circle"])
    out_ = model.eval()(batch["image"], batch["input_ids"], batch["padding_mask"])
    assert out_.features.last_hidden_state.shape[1] == batch["input_ids"].shape[1] + model.config.num_patches + 1
    assert os.path.getsize(out / "model.safetensors") > 0


def test_precomputed_visual_targets_equal_online_ones_on_the_plain_view(world, tmp_path):
    import torch

    from imglish.tasks.pretraining import attach_visual_targets
    from imglish.tokenizers.vqkd import create_vqkd
    from imglish.tokenizers.vqkd_train import precompute_visual_tokens
    from imglish.training.config import build_config
    from imglish.training.pretrain import build_image_transform, load_world_sources
    from imglish.training.streams import PrecomputedTargets, SampleMaker, StepBatches

    torch.manual_seed(0)
    tokenizer = create_vqkd(
        "vqkd_tiny_patch8_64", img_size=32, n_code=16, kmeans_init=False
    ).eval()  # random unit codes
    root = world / "imagenet" / "train"
    file = precompute_visual_tokens(tokenizer, root, tmp_path / "codes.safetensors", progress=False)
    sources = load_world_sources(world, "train")

    def batch(augment: bool, lookup):
        maker = SampleMaker(
            lambda t: [0, 2], build_image_transform(32, augment), 4, 8, 9, visual_targets=lookup
        )
        return StepBatches(sources, maker, {"image": 16}, seed=5)[1]["image"]

    pre = batch(False, PrecomputedTargets({root: file}))
    assert len(pre["visual_targets"].unique()) > 3  # a tokenizer that tells patches apart
    assert "tokenizer_image" not in pre  # the tokenizer is not needed for these samples
    online = {"image": batch(False, None)}
    attach_visual_targets(online, tokenizer)
    assert torch.equal(pre["visual_targets"], online["image"]["visual_targets"])
    assert torch.equal(pre["image"], online["image"]["image"]) and torch.equal(
        pre["image_mask"], online["image"]["image_mask"]
    )
    # with random crops the codes of the crop differ from those of the whole image: why augment must be off
    cropped = {"image": batch(True, None)}
    attach_visual_targets(cropped, tokenizer)
    assert not torch.equal(cropped["image"]["visual_targets"], pre["visual_targets"])
    with pytest.raises(ValueError, match="needs data.augment=false"):
        build_config("tiny", overrides={"data.visual_targets": "precomputed"})


def test_pretrain_with_precomputed_targets_through_cli(world, tmp_path):
    out = tmp_path / "run"
    rc = cli_main(
        tiny_pretrain_args(
            world, out, 3, **{"--data.visual_targets": "precomputed", "--data.augment": "false"}
        )
    )
    assert rc == 0
    assert (out / "tokenizers" / "visual_tokens.safetensors").exists()
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert all("loss/image.mim" in r for r in rows)


def test_pretrain_with_a_kmeans_visual_tokenizer_through_cli(world, tmp_path):
    """``data.visual_tokenizer_kind=kmeans``: a conv CLIP is trained on the pair stream, its k-means codes are the
    image stream's precomputed targets, and the held-out image accuracy is scored with the same tokenizer."""
    from safetensors import safe_open

    from imglish.tokenizers.kmeans import KMeansTokenizer, load_visual_tokenizer
    from imglish.tokenizers.vqkd_train import load_visual_tokens

    out = tmp_path / "run"
    rc = cli_main(tiny_pretrain_args(world, out, 3, **{
        "--data.visual_tokenizer_kind": "kmeans", "--data.visual_tokenizer_steps": "3",
        "--data.visual_tokenizer_batch": "8", "--data.visual_targets": "precomputed", "--data.augment": "false",
    }))
    assert rc == 0
    tok = load_visual_tokenizer(out / "tokenizers" / "kmeans" / "kmeans.safetensors")
    assert isinstance(tok, KMeansTokenizer) and tok.n_code == 16 and tok.config.num_tokens == 16
    assert not (out / "tokenizers" / "vqkd").exists()  # no VQ-KD is trained for nothing
    codes = out / "tokenizers" / "visual_tokens.safetensors"
    with safe_open(str(codes), "pt") as fh:
        assert fh.metadata()["n_code"] == "16"
    assert int(torch_max(load_visual_tokens(codes))) < 16
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert all("loss/image.mim" in r for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heldout"]["image.mim"]["tokens"] > 0


def torch_max(tokens: dict) -> int:
    import torch

    return int(torch.stack(list(tokens.values())).max())


def test_a_kmeans_tokenizer_without_pairs_is_refused_with_the_reason(tmp_path, capsys):
    from imglish.data.synthetic import WorldConfig, generate_world

    data = tmp_path / "w"
    generate_world(WorldConfig(num_images=20, image_size=32, seed=1, formats=("imagenet", "text"), workers=1), data)
    assert cli_main(tiny_pretrain_args(data, tmp_path / "run", 1, **{"--data.visual_tokenizer_kind": "kmeans"})) != 0
    assert "conv CLIP on the pair stream with the text tokenizer; this run has no image-text pairs" in (
        capsys.readouterr().err
    )
    assert cli_main(tiny_pretrain_args(data, tmp_path / "run", 1, **{"--data.visual_tokenizer_kind": "vq"})) != 0
    assert "data.visual_tokenizer_kind must be 'vqkd' or 'kmeans', got 'vq'" in capsys.readouterr().err


def test_bad_image_is_skipped_in_a_worker_and_counted_once(world, tmp_path):
    import shutil

    from imglish.data import BadRecordCounter, ImageOnlyDataset
    from imglish.training.pretrain import build_image_transform
    from imglish.training.streams import SampleMaker, StepBatches, make_step_loader, pop_skipped

    root = tmp_path / "images"
    shutil.copytree(world / "imagenet" / "train", root)
    files = sorted(root.rglob("*.JPEG"))
    files[3].write_bytes(b"not a jpeg")
    counter = BadRecordCounter()
    images = ImageOnlyDataset(root, skip=counter)
    maker = SampleMaker(lambda t: [0, 2], build_image_transform(32, True), 4, 8, 9)
    n = len(images)
    ds = StepBatches(_sources(images), maker, {"image": n}, seed=0, skip_counter=counter)
    seen = []
    for batch in make_step_loader(ds, 0, 1, num_workers=1):  # one step = every image once
        seen += pop_skipped(batch)
        assert batch["image"]["image"].shape[0] == n  # the bad image was replaced, the batch is full
    assert counter.total == 0  # counted in the worker's copy only...
    counter.absorb(seen)  # ...until the batch brings it back, as the trainer does
    assert [r.reason for r in seen] == ["image unreadable"]
    assert counter.counts == {"image unreadable": 1}
    counter.absorb(seen)
    assert counter.total == 1  # counted once


def _sources(images):
    from imglish.training.streams import StreamSources

    return StreamSources(images=images)


def test_pretrain_with_a_cls_head_through_cli(world, tmp_path):
    """``objective.cls_head_layers``: the [CLS] head's four terms are trained, logged and scored on held-out
    batches, and the exported model keeps the head (a resumed or continued run rebuilds it)."""
    import imglish

    out = tmp_path / "run"
    rc = cli_main(tiny_pretrain_args(world, out, 3, **{
        "--objective.cls_head_layers": "1", "--objective.cls_head_weight": "0.5", "--objective.pair_image_mask_ratio":
        "0.25", "--model.patch_size": "16", "--data.visual_targets": "precomputed", "--data.augment": "false",
    }))
    assert rc == 0
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    for term in ("image.cls_mim", "text.cls_mlm", "pair.cls_mlm", "pair.cls_mim"):
        assert all(f"loss/{term}" in r for r in rows), term
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heldout"]["pair.cls_mlm"]["tokens"] == summary["heldout"]["pair.mlm"]["tokens"] > 0
    model = imglish.create_model(None, pretrained=out / "model.safetensors")
    assert model.cls_head_layers == 1 and model.cls_head_from == 2


@pytest.mark.parametrize("flags, message", [
    ({"--objective.cls_head_layers": "1", "--objective.cls_head_weight": "0"},
     "objective.cls_head_weight must be > 0 with a [CLS] head"),
    ({"--objective.cls_head_layers": "1", "--objective.cls_head_from": "-2"},
     "objective.cls_head_from must be a layer (0 for the embeddings) or -1"),
])
def test_a_bad_cls_head_setting_is_refused_before_training(world, tmp_path, capsys, flags, message):
    rc = cli_main(tiny_pretrain_args(world, tmp_path / "run", 3, **flags))
    assert rc != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "tokenizers").exists()  # refused before any work
