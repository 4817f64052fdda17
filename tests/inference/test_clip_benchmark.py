"""The CLIP_benchmark adapter feeds CLIP_benchmark exactly imglish's own embeddings.

On a small embedded world (40 val images, 30 classes, COCO-style captions) the accuracies and recalls that
CLIP_benchmark's zero-shot classification and retrieval report, through its Python functions and through its command
line (run by ``python -m imglish.inference.clip_benchmark``, on local datasets: nothing is downloaded), must equal
the ones computed here from ``imglish.pipeline("zeroshot")``'s ``embed_images`` / ``class_embeddings`` /
``embed_texts`` for the same data.

The checkpoint is a tiny random-weight retrieval model whose weights are drawn wide (std 0.1) so that embeddings of
different inputs differ clearly; each test also checks that no ranking decision is a near-tie that float noise
between batchings could flip, so an equality failure always means the adapter changed the numbers.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("clip_benchmark", reason="CLIP_benchmark is not installed (pip install clip-benchmark)")

import torchvision
from clip_benchmark.datasets.builder import image_captions_collate_fn
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

import imglish
from imglish.data.synthetic import WorldConfig, generate_world, world_paths
from imglish.inference import clip_benchmark as cb
from imglish.tokenizers.text import TextTokenizer, train_sentencepiece
from tests.inference.conftest import CHECKPOINTS, FINETUNE_TASK, IMG, TRANSFORM

TEMPLATES = ["a photo of a {c}.", "a large {c} on a background."]
RECALL_K = [1, 5]
#: a ranking decision closer than this to its threshold could flip between batchings (float32 noise is ~1e-8)
MIN_MARGIN = 1e-6
BATCH = 16


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cb_world") / "w"
    generate_world(WorldConfig(num_images=100, seed=3, workers=1, val_fraction=0.4, test_fraction=0.1,
                               formats=("coco", "imagenet", "wds")), root)
    return root


@pytest.fixture(scope="module")
def checkpoint(world, tmp_path_factory) -> Path:
    """A tiny retrieval checkpoint in the ``imglish finetune`` layout, with a tokenizer trained on the world's
    captions (whole words: no caption is cut at the 32-token length)."""
    from imglish.tokenizers.processor import Processor
    from imglish.tokenizers.transforms import TransformConfig

    folder = tmp_path_factory.mktemp("cb_ckpt")
    karpathy = json.loads(world_paths(world)["coco_karpathy"].read_text())
    corpus = folder / "corpus.txt"
    corpus.write_text("".join(s["raw"] + "\n" for im in karpathy["images"] for s in im["sentences"]))
    tok = TextTokenizer(train_sentencepiece([corpus], vocab_size=200, output=folder / "spm.model", model_type="bpe",
                                            seed=0, extra_options={"hard_vocab_limit": False}))
    name, state = CHECKPOINTS["retrieval"]
    torch.manual_seed(0)
    model = imglish.create_model(name, img_size=IMG, vocab_size=len(tok), depth=2)
    with torch.no_grad():  # wide random weights: distinct inputs get clearly distinct embeddings
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.1)
    proc = Processor(tok, TransformConfig.for_task(TRANSFORM["retrieval"], IMG), max_length=32)
    path = imglish.save_model(model.eval(), folder / "retrieval" / "model.safetensors", processor=proc)
    (path.parent / "task.json").write_text(json.dumps({"task": FINETUNE_TASK["retrieval"], "state": state}))
    return path


@pytest.fixture(scope="module")
def pipe(checkpoint):
    """imglish's own pipeline: the reference every number is computed from."""
    return imglish.pipeline("zeroshot", checkpoint=checkpoint, device="cpu")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return cb.load_imglish("auto", str(checkpoint), device="cpu")


@pytest.fixture(scope="module")
def coco_val(world, tmp_path_factory) -> tuple[Path, Path]:
    """The world's COCO val split as CLIP_benchmark's ``mscoco_captions`` reads it: ``ROOT/val2014/<file>`` and an
    annotation file whose ``file_name`` is relative to that folder. Captions that occur under more than one image are
    left out: identical texts tie exactly, and top-k breaks ties in no defined order."""
    paths = world_paths(world)
    gt = json.loads(paths["coco_gt_val"].read_text())
    counts: dict[str, set[int]] = {}
    for a in gt["annotations"]:
        counts.setdefault(a["caption"], set()).add(a["image_id"])
    root = tmp_path_factory.mktemp("cb_coco")
    (root / "val2014").symlink_to(paths["coco_root"] / "val2014", target_is_directory=True)
    ann = {**gt, "images": [{**im, "file_name": Path(im["file_name"]).name} for im in gt["images"]],
           "annotations": [a for a in gt["annotations"] if len(counts[a["caption"]]) == 1]}
    assert len(ann["annotations"]) > len(ann["images"])  # still several captions per image
    ann_file = root / "captions_val.json"
    ann_file.write_text(json.dumps(ann))
    return root, ann_file


# --------------------------------------------------------------------------------------------------- reference
def _margins(scores: torch.Tensor, positive: torch.Tensor, ks: list[int]) -> float:
    """Smallest gap, over rows and k, between a row's best positive score and the k-th best negative one: the
    threshold where the row's top-k hit decision would flip."""
    best_pos = scores.masked_fill(~positive, float("-inf")).max(1).values
    negs = scores.masked_fill(positive, float("-inf")).sort(1, descending=True).values
    return min(float((best_pos - negs[:, k - 1]).abs().min()) for k in ks)


def _recall(scores: torch.Tensor, positive: torch.Tensor, k: int) -> float:
    """Share of rows with a positive among their k highest scores (ranks counted as scores strictly above the
    row's best positive)."""
    best_pos = scores.masked_fill(~positive, float("-inf")).max(1).values
    rank = (scores > best_pos[:, None]).sum(1)
    return float((rank < k).double().mean())


@pytest.fixture(scope="module")
def expected_classification(pipe, world) -> dict[str, float]:
    """acc1, acc5 and mean per-class recall from the pipeline's image and class embeddings."""
    ds = torchvision.datasets.ImageFolder(str(world_paths(world)["imagenet_val"]), allow_empty=True)
    names = [c.replace("_", " ") for c in ds.classes]
    images = pipe.embed_images([path for path, _ in ds.samples]).double()
    classes = pipe.class_embeddings(names, [t.replace("{c}", "{}") for t in TEMPLATES]).double()
    scores = images @ classes.t()
    target = torch.tensor(ds.targets)
    positive = torch.nn.functional.one_hot(target, len(names)).bool()
    assert _margins(scores, positive, [1, 5]) > MIN_MARGIN, "a class ranking is a near-tie: pick another seed"
    hit1 = scores.argmax(1) == target
    recalls = [float(hit1[target == c].double().mean()) for c in target.unique()]
    return {"acc1": _recall(scores, positive, 1), "acc5": _recall(scores, positive, 5),
            "mean_per_class_recall": sum(recalls) / len(recalls), "n": len(target)}


@pytest.fixture(scope="module")
def expected_retrieval(pipe, coco_val) -> dict[str, float]:
    """Recall@k both ways from the pipeline's image and caption embeddings (images in id order, as
    torchvision's CocoCaptions reads them)."""
    root, ann_file = coco_val
    ann = json.loads(ann_file.read_text())
    images = sorted(ann["images"], key=lambda im: im["id"])
    column = {im["id"]: j for j, im in enumerate(images)}
    texts = [(a["caption"], column[a["image_id"]]) for im in images for a in ann["annotations"]
             if a["image_id"] == im["id"]]
    img = pipe.embed_images([root / "val2014" / im["file_name"] for im in images]).double()
    txt = pipe.embed_texts([t for t, _ in texts]).double()
    scores = txt @ img.t()  # texts x images
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(texts)), torch.tensor([j for _, j in texts])] = True
    assert _margins(scores, positive, RECALL_K) > MIN_MARGIN, "an image ranking is a near-tie"
    assert _margins(scores.t(), positive.t(), RECALL_K) > MIN_MARGIN, "a caption ranking is a near-tie"
    out = {}
    for k in RECALL_K:
        out[f"image_retrieval_recall@{k}"] = _recall(scores, positive, k)
        out[f"text_retrieval_recall@{k}"] = _recall(scores.t(), positive.t(), k)
    return out


def _same(reported: dict[str, float], expected: dict[str, float]) -> None:
    """CLIP_benchmark's float32 fractions against the exact ones (k hits of n: equal to float32 rounding)."""
    for key, value in expected.items():
        if key != "n":
            assert reported[key] == pytest.approx(value, abs=1e-6), key


# --------------------------------------------------------------------------------------------------- tests
def test_encoders_and_tokenizer_match_the_pipeline(loaded, pipe, world):
    model, transform, tokenizer = loaded
    texts = ["a photo of a red circle.", "a small blue square on a white background", "a green cross"]
    ids = tokenizer(texts)
    ref = pipe.processor.tokenizer(texts, max_length=pipe.processor.max_length)
    assert ids.dtype == torch.long and ids.shape == (3, pipe.processor.max_length)
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(tokenizer.padding_mask(ids), ref["padding_mask"])
    assert torch.allclose(model.encode_text(ids), pipe.embed_texts(texts), atol=1e-6)
    assert torch.allclose(model.encode_text(dict(ref)), pipe.embed_texts(texts), atol=1e-6)

    files = sorted(world_paths(world)["imagenet_val"].rglob("*.JPEG"))[:5]
    from PIL import Image

    batch = torch.stack([transform(Image.open(f)) for f in files])
    emb = model.encode_image(batch)
    assert emb.dtype == torch.float32 and emb.shape == (5, pipe.model.config.embed_dim)
    assert torch.allclose(emb, pipe.embed_images(files), atol=1e-6)
    # CLIP_benchmark wraps the encoders in autocast (amp=True by default): precision fp32 switches it off...
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model.encode_image(batch), emb)
    # ... and precision "amp" leaves it on (bfloat16 on the CPU gives other numbers)
    amp_model, _, _ = cb.load_imglish("auto", str(pipe.checkpoint), precision="amp")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp_emb = amp_model.encode_image(batch)
    assert not torch.equal(amp_emb, emb) and torch.allclose(amp_emb, emb, atol=0.05)


def test_tokenizer_cuts_long_texts_and_counts_them(checkpoint):
    _, _, tokenizer = cb.load_imglish("auto", str(checkpoint))
    long = " ".join(["red circle"] * 40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tokenizer([long, "", "a blue square"])
        tokenizer([long])
    assert ids.shape == (3, 32) and tokenizer.truncated == 2 and tokenizer.empty == 1
    assert len([w for w in caught if "imglish tokenizer" in str(w.message)]) == 1  # warned once
    assert int(tokenizer.padding_mask(ids)[0].sum()) == 0  # the long text fills the row


def test_zeroshot_classification_reports_the_pipeline_numbers(loaded, world, expected_classification):
    model, transform, tokenizer = loaded
    ds = torchvision.datasets.ImageFolder(str(world_paths(world)["imagenet_val"]), transform=transform,
                                          allow_empty=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=0)
    names = [c.replace("_", " ") for c in ds.classes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn: some classes have no val image
        metrics = zeroshot_classification.evaluate(model, loader, tokenizer, names, TEMPLATES, "cpu", amp=False)
    _same(metrics, expected_classification)


def test_zeroshot_retrieval_reports_the_pipeline_numbers(loaded, coco_val, expected_retrieval):
    model, transform, tokenizer = loaded
    root, ann_file = coco_val
    ds = torchvision.datasets.CocoCaptions(str(root / "val2014"), str(ann_file), transform=transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, collate_fn=image_captions_collate_fn)
    metrics = zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=RECALL_K)
    _same(metrics, expected_retrieval)
    assert tokenizer.truncated == 0 and tokenizer.empty == 0


def test_cli_runs_offline_on_local_datasets(checkpoint, world, coco_val, tmp_path, expected_retrieval,
                                            expected_classification, capsys):
    common = ["--pretrained", str(checkpoint), "--batch_size", str(BATCH), "--num_workers", "0", "--no_amp",
              "--quiet"]
    # retrieval: mscoco_captions finds its images and annotation file, so it downloads nothing
    root, ann_file = coco_val
    out = tmp_path / "coco.json"
    assert cb.main(["eval", "--dataset", "mscoco_captions", "--dataset_root", str(root), "--split", "test",
                    "--annotation_file", str(ann_file), "--recall_k", *map(str, RECALL_K), "--output", str(out),
                    *common]) == 0
    doc = json.loads(out.read_text())
    assert doc["task"] == "zeroshot_retrieval" and doc["model"] == "auto"
    _same(doc["metrics"], expected_retrieval)

    # classification: a local webdataset (CLIP_benchmark's wds/ layout) over the world's val image shard
    wds = tmp_path / "wds_world"
    (wds / "test").mkdir(parents=True)
    (wds / "test" / "0.tar").symlink_to(world_paths(world)["wds_dir"] / "images-val-000000.tar")
    (wds / "test" / "nshards.txt").write_text("1\n")
    classes = json.loads(world_paths(world)["world_json"].read_text())["classes"]
    (wds / "classnames.txt").write_text("".join(c.replace("_", " ") + "\n" for c in classes))
    (wds / "zeroshot_classification_templates.txt").write_text("".join(t + "\n" for t in TEMPLATES))
    out = tmp_path / "cls.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cb.main(["eval", "--dataset", "wds/world", "--dataset_root", str(wds), "--task",
                        "zeroshot_classification", "--output", str(out), *common]) == 0
    doc = json.loads(out.read_text())
    assert doc["task"] == "zeroshot_classification"
    _same(doc["metrics"], expected_classification)

    # a bad checkpoint: exit status 2 and one line naming it
    capsys.readouterr()
    assert cb.main(["eval", "--dataset", "mscoco_captions", "--dataset_root", str(root), "--annotation_file",
                    str(ann_file), "--pretrained", str(tmp_path / "missing.safetensors"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.safetensors" in err[0] and err[0].startswith("imglish clip_benchmark: error:")


def test_register_and_load_errors(checkpoint, monkeypatch):
    from clip_benchmark import models

    cb.register()
    cb.register()
    assert models.MODEL_TYPES.count("imglish") == 1
    model, transform, tokenizer = models.load_clip("imglish", "auto", str(checkpoint), None, "cpu")
    assert isinstance(model, cb.BenchmarkModel) and not model.training
    with pytest.raises(ValueError, match="'auto'"):
        cb.load_imglish("ViT-B-32-quickgelu", str(checkpoint))
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        cb.load_imglish("auto", "nowhere.safetensors")
    monkeypatch.setenv(cb.PRECISION_ENV, "fp16")
    with pytest.raises(ValueError, match="IMGLISH_PRECISION"):
        cb.load_imglish("auto", str(checkpoint))
    # the environment sets what CLIP_benchmark's command line has no flag for
    monkeypatch.setenv(cb.PRECISION_ENV, "bf16")
    monkeypatch.setenv(cb.TOKENIZER_ENV, str(checkpoint.parent / "sentencepiece.model"))
    model, _, tokenizer = cb.load_imglish("auto", str(checkpoint))
    assert model.pipe.precision == "bf16" and model.precision == "bf16"
    assert tokenizer(["a red circle"]).shape == (1, 32)
