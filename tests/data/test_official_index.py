"""Official BEiT-3 index files (spec §6): names, writing them from the world, reading them back like the readers do."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imglish.cli.main import main
from imglish.data.coco import KarpathyCaptions
from imglish.data.collate import collate_records
from imglish.data.flickr import Flickr30kCaptions
from imglish.data.imagenet import ImageFolderDataset
from imglish.data.nlvr2 import NLVR2Dataset
from imglish.data.official import (
    OFFICIAL_TASKS,
    OfficialIndexDataset,
    load_answer2label,
    official_index_files,
    write_official_index,
)
from imglish.data.skip import BadRecordCounter, BadRecordError, SkippedRecord
from imglish.data.synthetic import load_world, world_paths
from imglish.data.vqav2 import VQAv2Dataset, build_answer_vocab, load_answer_vocab, save_answer_vocab
from imglish.tokenizers.text import TextTokenizer, train_sentencepiece

MIN_COUNT = 3  # the 48-image training split is too small for the official 9


@pytest.fixture(scope="module")
def spm(world, tmp_path_factory) -> Path:
    """A SentencePiece model of the world's language (corpus, captions, questions, statements)."""
    folder = tmp_path_factory.mktemp("official-spm")
    p = world_paths(world)
    lines = p["text_train"].read_text().splitlines()
    lines += [q["question"] for q in json.loads(
        (p["vqav2_dir"] / "v2_OpenEnded_mscoco_train2014_questions.json").read_text())["questions"]]
    lines += [json.loads(x)["sentence"] for x in (p["nlvr2_dir"] / "train.json").read_text().splitlines()]
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    return train_sentencepiece([corpus], vocab_size=80, output=folder / "shapes.model", seed=0)


@pytest.fixture(scope="module")
def tok(spm) -> TextTokenizer:
    return TextTokenizer(spm)


@pytest.fixture(scope="module")
def ids(tok):
    """The ids of an index line's ``text_segment``: no BOS/EOS."""
    return lambda text: tok.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def official(world, tok, tmp_path_factory):
    """Every task written into one folder (which is then the data root of every task)."""
    out = tmp_path_factory.mktemp("official") / "data"
    skip = BadRecordCounter()
    written = {task: write_official_index(world, out, task, tok, vqa_min_count=MIN_COUNT, skip=skip)
               for task in OFFICIAL_TASKS}
    return out, written, skip


def _all(ds):
    return [ds[i] for i in range(len(ds))]


def _open(out, task, split, **kw):
    return OfficialIndexDataset(official_index_files(task, split), out, task, **kw)


# -- names -------------------------------------------------------------------------------------------------------------

SPEC_FILES = {
    ("imagenet", "train"): ["imagenet.train.index.jsonl"],
    ("imagenet", "val"): ["imagenet.val.index.jsonl"],
    ("imagenet", "test"): ["imagenet.val.index.jsonl"],
    ("nlvr2", "train"): ["nlvr2.train.index.jsonl"],
    ("nlvr2", "val"): ["nlvr2.dev.index.jsonl"],
    ("nlvr2", "dev"): ["nlvr2.dev.index.jsonl"],
    ("nlvr2", "test"): ["nlvr2.test-P.index.jsonl"],
    ("nlvr2", "test-P"): ["nlvr2.test-P.index.jsonl"],
    ("vqav2", "train"): ["vqa.train.jsonl", "vqa.trainable_val.jsonl"],
    ("vqav2", "val"): ["vqa.rest_val.jsonl"],
    ("vqav2", "test"): ["vqa.test.jsonl"],
    ("vqav2", "test-dev"): ["vqa.test-dev.jsonl"],
    ("coco_retrieval", "train"): ["coco_retrieval.train.jsonl"],
    ("coco_retrieval", "val"): ["coco_retrieval.val.jsonl"],
    ("coco_retrieval", "test"): ["coco_retrieval.test.jsonl"],
    ("flickr30k", "train"): ["flickr30k.train.jsonl"],
    ("flickr30k", "val"): ["flickr30k.val.jsonl"],
    ("flickr30k", "test"): ["flickr30k.test.jsonl"],
    ("coco_captioning", "train"): ["coco_captioning.train.jsonl"],
    ("coco_captioning", "val"): ["coco_captioning.val.jsonl"],
    ("coco_captioning", "test"): ["coco_captioning.test.jsonl"],
    ("nocaps", "train"): ["coco_captioning.train.jsonl"],
    ("nocaps", "val"): ["nocaps.val.jsonl"],
    ("nocaps", "test"): ["nocaps.test.jsonl"],
}


def test_index_file_names_follow_the_spec():
    for (task, split), names in SPEC_FILES.items():
        assert official_index_files(task, split) == names, (task, split)
    assert {t for t, _ in SPEC_FILES} == set(OFFICIAL_TASKS)
    with pytest.raises(ValueError, match="coco_retrieval.*nocaps"):
        official_index_files("retrieval", "train")
    with pytest.raises(ValueError, match="train, val, test"):
        official_index_files("flickr30k", "dev")


# -- writing -----------------------------------------------------------------------------------------------------------

FIELD_ORDER = {
    "imagenet": ["image_path", "label"],
    "nlvr2": ["image_path", "image2_path", "text_segment", "label", "identifier"],
    "vqav2": ["image_path", "text_segment", "labels", "scores", "qid"],
    "coco_retrieval": ["image_path", "text_segment", "image_id"],
    "flickr30k": ["image_path", "text_segment", "image_id"],
    "coco_captioning": ["image_path", "text_segment", "image_id"],
    "nocaps": ["image_path", "text_segment", "image_id"],
}


def test_written_files_have_the_official_layout_and_links(official):
    out, written, skip = official
    for task, files in written.items():
        for f in files:
            assert f.parent == out
            if f.name == "answer2label.txt":
                continue
            lines = [json.loads(x) for x in f.read_text().splitlines()]
            assert lines, f
            assert all(list(rec) == FIELD_ORDER[task] for rec in lines), f
    for split in ("train", "val", "test"):
        for task in OFFICIAL_TASKS:
            assert all((out / n).is_file() for n in official_index_files(task, split))
    # out is a data root: relative links to the world's image folders, one name per folder, no collisions
    links = {"train2014", "val2014", "images", "flickr30k-images", "train", "val"}
    assert {p.name for p in out.iterdir() if p.is_symlink()} == links
    assert all(not os.path.isabs(os.readlink(out / n)) for n in links)
    first = json.loads((out / "vqa.train.jsonl").read_text().splitlines()[0])
    assert first["image_path"].startswith("train2014/COCO_train2014_")
    assert json.loads((out / "imagenet.val.index.jsonl").read_text().splitlines()[0])["image_path"].startswith("val/")
    assert json.loads((out / "nlvr2.dev.index.jsonl").read_text().splitlines()[0])["image_path"].startswith(
        "images/dev/dev-")
    assert json.loads((out / "flickr30k.test.jsonl").read_text().splitlines()[0])["image_path"].startswith(
        "flickr30k-images/")
    assert skip.counts == {"answer outside vocabulary": skip.total}  # only the questions the official code drops


def test_writing_again_is_deterministic_and_keeps_the_links(official, world, tok, tmp_path):
    out, written, _ = official

    def digest(files):
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}

    before = digest(written["vqav2"] + written["imagenet"])
    again = write_official_index(world, out, "vqav2", tok, vqa_min_count=MIN_COUNT)
    again += write_official_index(world, out, "imagenet", tok)
    assert digest(again) == before
    elsewhere = write_official_index(world, tmp_path / "o", "vqav2", tok, vqa_min_count=MIN_COUNT)
    assert digest(elsewhere) == digest(written["vqav2"])
    # a real folder of other content where a link should go is an error, not silently used
    (tmp_path / "x" / "train2014").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="train2014"):
        write_official_index(world, tmp_path / "x", "coco_captioning", tok)


def test_writer_errors_and_untokenizable_texts(world, ids, tmp_path):
    with pytest.raises(ValueError, match="imagenet, vqav2"):
        write_official_index(world, tmp_path, "vqa", ids)
    with pytest.raises(FileNotFoundError, match="world.json"):
        write_official_index(tmp_path, tmp_path / "o", "nlvr2", ids)
    with pytest.raises(ValueError, match="vqa_min_count"):
        write_official_index(world, tmp_path / "o", "vqav2", ids, vqa_min_count=10**6)
    nl = world_paths(world)["nlvr2_dir"]
    train = [json.loads(x)["sentence"] for x in (nl / "train.json").read_text().splitlines()]
    every = [json.loads(x)["sentence"] for f in ("train.json", "dev.json", "test1.json")
             for x in (nl / f).read_text().splitlines()]
    skip = BadRecordCounter()
    write_official_index(world, tmp_path / "o", "nlvr2", lambda s: [] if s == train[0] else ids(s), skip=skip)
    assert skip.counts == {"text not tokenizable": every.count(train[0])}
    lines = (tmp_path / "o" / "nlvr2.train.index.jsonl").read_text().splitlines()
    assert len(lines) == len(train) - train.count(train[0])


# -- read back = what the imglish readers give ------------------------------------------------------------------------


def test_imagenet_read_back_equals_the_folder_reader(official, world):
    out, _, _ = official
    p = world_paths(world)
    classes = sorted(d.name for d in p["imagenet_train"].iterdir() if d.is_dir())
    for split, folder in (("train", "imagenet_train"), ("val", "imagenet_val"), ("test", "imagenet_val")):
        off = _all(_open(out, "imagenet", split, loader=str))
        ref = _all(ImageFolderDataset(p[folder], classes=classes, loader=str))
        assert len(off) == len(ref) > 0
        for o, r in zip(off, ref):
            assert o["label"] == r["label"] and os.path.samefile(o["path"], r["path"])
    rec = _open(out, "imagenet", "train")[0]
    ref = ImageFolderDataset(p["imagenet_train"], classes=classes)[0]
    assert set(rec) == {"image", "label", "path"}
    assert np.array_equal(np.asarray(rec["image"]), np.asarray(ref["image"]))


def test_nlvr2_read_back_equals_the_reader(official, world, ids, tok):
    out, _, _ = official
    root = world_paths(world)["nlvr2_dir"]
    for split, fname in (("train", "train.json"), ("val", "dev.json"), ("test", "test1.json")):
        off = _all(_open(out, "nlvr2", split, loader=str))
        ref = _all(NLVR2Dataset(root / fname, tokenizer=ids, loader=str))
        assert len(off) == len(ref) > 0
        for o, r in zip(off, ref):
            assert (o["identifier"], o["label"], o["text_ids"]) == (r["identifier"], r["label"], r["text_ids"])
            assert os.path.samefile(o["image"], r["image"]) and os.path.samefile(o["image2"], r["image2"])
    # with add_special the ids are those of a reader given the TextTokenizer itself (BOS ... EOS)
    wrapped = _open(out, "nlvr2", "val", loader=str, add_special=True)[0]
    assert wrapped["text_ids"] == NLVR2Dataset(root / "dev.json", tokenizer=tok, loader=str)[0]["text_ids"]
    rec = _open(out, "nlvr2", "val")[0]
    assert set(rec) == {"image", "image2", "text_ids", "label", "identifier"}
    assert isinstance(rec["image"], Image.Image) and isinstance(rec["image2"], Image.Image)


def test_vqav2_read_back_equals_the_reader(official, world, ids):
    out, _, _ = official
    p = world_paths(world)
    vq, coco = p["vqav2_dir"], p["coco_root"]
    tq, ta = vq / "v2_OpenEnded_mscoco_train2014_questions.json", vq / "v2_mscoco_train2014_annotations.json"
    vq_, va = vq / "v2_OpenEnded_mscoco_val2014_questions.json", vq / "v2_mscoco_val2014_annotations.json"
    splits = load_world(world)["splits"]
    val_ids = range(splits["val"]["first_id"], splits["val"]["stop_id"])
    test_ids = range(splits["test"]["first_id"], splits["test"]["stop_id"])

    vocab = load_answer_vocab(out / "answer2label.txt")
    assert vocab == build_answer_vocab([ta], min_count=MIN_COUNT)
    a2l = out / "answer2label.txt"

    def by_qid(records):
        return {r["question_id"]: r for r in records}

    r_train = by_qid(_all(VQAv2Dataset(tq, ta, coco, vocab, tokenizer=ids, loader=str)))
    r_val = by_qid(_all(VQAv2Dataset(vq_, va, coco, vocab, image_ids=val_ids, tokenizer=ids, loader=str)))
    o_train = by_qid(_all(_open(out, "vqav2", "train", answer2label=a2l, loader=str)))
    o_val = by_qid(_all(_open(out, "vqav2", "val", answer2label=a2l, loader=str)))
    # official train = train2014 + trainable_val, val = rest_val: together the world's train and val questions
    assert set(r_train) <= set(o_train) and not set(o_train) & set(o_val)
    assert set(o_train) | set(o_val) == set(r_train) | set(r_val)
    # rest_val is half of the val split's images, none of which is trained on
    val_images = {Path(r["image"]).name for r in r_val.values()}
    rest = {Path(o["image"]).name for o in o_val.values()}
    assert rest <= val_images and len(rest) == round(0.5 * len(val_images))
    assert not rest & {Path(o["image"]).name for o in o_train.values()}
    ref = {**r_train, **r_val}
    for qid, o in {**o_train, **o_val}.items():
        r = ref[qid]
        assert o["text_ids"] == r["text_ids"] and os.path.samefile(o["image"], r["image"])
        assert (o["labels"], o["scores"]) == (r["labels"], r["scores"])
        assert torch.equal(o["target"], r["target"])
    # test = the world's test split, without answers (as test2015)
    r_test = by_qid(_all(VQAv2Dataset(vq_, None, coco, image_ids=test_ids, tokenizer=ids, loader=str)))
    for split in ("test", "test-dev"):
        o_test = by_qid(_all(_open(out, "vqav2", split, answer2label=a2l, loader=str)))
        assert set(o_test) == set(r_test)
        assert all(o["text_ids"] == r_test[q]["text_ids"] and set(o) == {"image", "text_ids", "question_id"}
                   for q, o in o_test.items())
    rec = _open(out, "vqav2", "train", answer2label=load_answer2label(a2l))[0]
    assert set(rec) == {"image", "text_ids", "question_id", "labels", "scores", "target"}
    assert rec["target"].shape == (len(vocab),) and rec["target"].dtype == torch.float32
    batch = collate_records([rec, _open(out, "vqav2", "val", answer2label=a2l)[0]])
    assert batch["target"].shape == (2, len(vocab)) and batch["text_ids"].shape[0] == 2
    # without a vocabulary: labels and scores, no target
    assert "target" not in _open(out, "vqav2", "val")[0]


@pytest.mark.parametrize("task", ["coco_retrieval", "flickr30k"])
def test_retrieval_read_back_equals_the_reader(official, world, ids, task):
    out, _, _ = official
    p = world_paths(world)
    for split in ("train", "val", "test"):
        if task == "coco_retrieval":
            reader = KarpathyCaptions(p["coco_karpathy"], splits=("train", "restval") if split == "train" else (split,),
                                      tokenizer=ids, loader=str)
        else:
            reader = Flickr30kCaptions(p["flickr30k_karpathy"], splits=(split,), tokenizer=ids, loader=str)
        off, ref = _all(_open(out, task, split, loader=str)), _all(reader)
        assert len(off) == len(ref) > 0
        for o, r in zip(off, ref):
            assert (o["image_id"], o["text_ids"]) == (r["image_index"], r["text_ids"])
            assert os.path.samefile(o["image_path"], r["image_path"]) and o["image"] == o["image_path"]
        assert sorted({o["image_id"] for o in off}) == list(range(len({o["image_path"] for o in off})))
    rec = _open(out, task, "test")[0]
    assert set(rec) == {"image", "text_ids", "image_id", "image_path"}


@pytest.mark.parametrize("task", ["coco_captioning", "nocaps"])
def test_captioning_read_back_equals_the_reader(official, world, ids, task):
    out, _, _ = official
    js = world_paths(world)["coco_karpathy"]
    off = _all(_open(out, task, "train", loader=str))
    ref = _all(KarpathyCaptions(js, splits=("train", "restval"), tokenizer=ids, loader=str))
    assert len(off) == len(ref) > 0
    for o, r in zip(off, ref):
        assert (o["image_id"], o["text_ids"]) == (r["image_id"], r["text_ids"])
        assert os.path.samefile(o["image_path"], r["image_path"])
    for split in ("val", "test"):
        off = _all(_open(out, task, split, loader=str))
        ref = _all(KarpathyCaptions(js, splits=(split,), per="image", loader=str))
        assert [o["image_id"] for o in off] == [r["image_id"] for r in ref] and len(off) > 0
        assert all(os.path.samefile(o["image_path"], r["image_path"]) for o, r in zip(off, ref))
        assert all("text_ids" not in o for o in off)
    assert set(_open(out, task, "train")[0]) == {"image", "image_id", "image_path", "text_ids"}
    assert set(_open(out, task, "val")[0]) == {"image", "image_id", "image_path"}


def test_cli_requires_a_tokenizer_and_writes_what_the_api_writes(official, world, spm, tmp_path, capsys):
    out, written, _ = official
    assert main(["data", "official-index", "--world", str(world), "--out", str(tmp_path), "--task", "nlvr2"]) == 2
    assert "--tokenizer SPM is required" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    assert main(["data", "official-index", "--world", str(world), "--out", str(tmp_path), "--task", "nlvr2",
                 "--tokenizer", str(spm), "--quiet"]) == 0
    for f in written["nlvr2"]:
        assert (tmp_path / f.name).read_bytes() == f.read_bytes()
    assert main(["data", "official-index", "--world", str(world), "--out", str(tmp_path), "--task", "vqa",
                 "--tokenizer", str(spm)]) == 2
    assert "unknown task" in capsys.readouterr().err


# -- hand-written lines, as users of the official code have them -------------------------------------------------------


def _image(path: Path, color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def _jsonl(path: Path, lines) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_hand_written_official_lines(tmp_path):
    root = tmp_path
    _image(root / "train2014" / "COCO_train2014_000000000009.jpg")
    _image(root / "test2015" / "COCO_test2015_000000000001.jpg", (0, 0, 255))
    save_answer_vocab(["yes", "no", "2"], root / "answer2label.txt")
    _jsonl(root / "vqa.train.jsonl", [
        {"image_path": "train2014/COCO_train2014_000000000009.jpg", "text_segment": [10, 11, 12],
         "labels": [0, 2], "scores": [1.0, 0.3], "qid": 9001}])
    _jsonl(root / "vqa.test.jsonl", [
        {"image_path": "test2015/COCO_test2015_000000000001.jpg", "text_segment": [13], "labels": [], "scores": [],
         "qid": 1000}])
    train = OfficialIndexDataset(["vqa.train.jsonl"], root, "vqav2", answer2label=root / "answer2label.txt")
    rec = train[0]
    assert rec["question_id"] == 9001 and rec["text_ids"] == [10, 11, 12]
    assert rec["labels"] == [0, 2] and rec["scores"] == [1.0, 0.3]
    assert rec["target"].tolist() == pytest.approx([1.0, 0.0, 0.3])
    assert rec["image"].size == (8, 8)
    test = OfficialIndexDataset(root / "vqa.test.jsonl", root, "vqav2", answer2label=["yes", "no", "2"])
    assert set(test[0]) == {"image", "text_ids", "question_id"} and test[0]["question_id"] == 1000

    _image(root / "images" / "dev" / "dev-850-0-img0.png")
    _image(root / "images" / "dev" / "dev-850-0-img1.png", (0, 255, 0))
    _jsonl(root / "nlvr2.dev.index.jsonl", [
        {"image_path": "images/dev/dev-850-0-img0.png", "image2_path": "images/dev/dev-850-0-img1.png",
         "text_segment": [5, 6], "label": 1, "identifier": "dev-850-0-0"}])
    rec = OfficialIndexDataset("nlvr2.dev.index.jsonl", root, "nlvr2", add_special=True)[0]
    assert (rec["label"], rec["identifier"], rec["text_ids"]) == (1, "dev-850-0-0", [0, 5, 6, 2])
    assert rec["image2"].getpixel((0, 0)) == (0, 255, 0)

    _image(root / "train" / "n01440764" / "a.JPEG")
    _jsonl(root / "imagenet.val.index.jsonl", [{"image_path": "train/n01440764/a.JPEG", "label": 0}])
    rec = OfficialIndexDataset("imagenet.val.index.jsonl", root, "imagenet")[0]
    assert rec["label"] == 0 and rec["path"] == str(root / "train" / "n01440764" / "a.JPEG")

    _jsonl(root / "coco_captioning.val.jsonl", [
        {"image_path": "train2014/COCO_train2014_000000000009.jpg", "text_segment": None, "image_id": 9}])
    _jsonl(root / "coco_captioning.train.jsonl", [
        {"image_path": "train2014/COCO_train2014_000000000009.jpg", "text_segment": [7, 8], "image_id": 9}])
    val = OfficialIndexDataset("coco_captioning.val.jsonl", root, "nocaps")[0]
    assert (val["image_id"], "text_ids" in val) == (9, False)
    assert OfficialIndexDataset("coco_captioning.train.jsonl", root, "coco_captioning")[0]["text_ids"] == [7, 8]
    _jsonl(root / "flickr30k.test.jsonl", [
        {"image_path": "train2014/COCO_train2014_000000000009.jpg", "text_segment": [7], "image_id": 0}] * 2)
    recs = _all(OfficialIndexDataset("flickr30k.test.jsonl", root, "flickr30k"))
    assert [r["image_id"] for r in recs] == [0, 0] and recs[0]["image_path"].endswith("000000000009.jpg")


def test_missing_image_is_skipped_and_counted(tmp_path):
    _image(tmp_path / "train2014" / "a.jpg")
    (tmp_path / "train2014" / "broken.jpg").write_bytes(b"not a jpeg")
    lines = [{"image_path": f"train2014/{n}", "text_segment": [5], "image_id": k}
             for k, n in enumerate(["a.jpg", "gone.jpg", "broken.jpg"])]
    skip = BadRecordCounter()
    ds = OfficialIndexDataset(_jsonl(tmp_path / "coco_retrieval.val.jsonl", lines), tmp_path, "coco_retrieval",
                              skip=skip)
    assert len(ds) == 3 and skip.total == 0
    recs = _all(ds)
    assert isinstance(recs[0], dict)
    assert [r.reason for r in recs[1:]] == ["image missing", "image unreadable"]
    assert recs[1] == SkippedRecord("coco_retrieval.val.jsonl", "line 2", "image missing", recs[1].detail)
    assert skip.counts == {"image missing": 1, "image unreadable": 1}
    batch = collate_records(recs)
    assert batch["batch_size"] == 1 and len(batch["skipped"]) == 2
    with pytest.raises(BadRecordError, match="gone.jpg"):
        OfficialIndexDataset(tmp_path / "coco_retrieval.val.jsonl", tmp_path, "coco_retrieval",
                             skip=BadRecordCounter(strict=True))[1]


def test_malformed_lines_are_counted_and_left_out(tmp_path):
    good = {"image_path": "train2014/a.jpg", "text_segment": [5, 6], "labels": [1], "scores": [0.6], "qid": 1}
    lines = [
        good,
        "{not json",
        "[1, 2]",
        {k: v for k, v in good.items() if k != "qid"},          # missing field
        {**good, "text_segment": None},                          # VQA needs a text
        {**good, "text_segment": ["a", "b"]},                    # not ids
        {**good, "labels": [1, 2]},                              # labels and scores differ in length
        {**good, "text_segment": []},                            # empty text
        {**good, "labels": [7]},                                 # outside the answers
        "",
        {**good, "qid": 2, "labels": [], "scores": []},          # a test line: fine
    ]
    skip = BadRecordCounter()
    ds = OfficialIndexDataset(_jsonl(tmp_path / "vqa.x.jsonl", lines), tmp_path, "vqav2", skip=skip,
                              answer2label={"yes": 0, "no": 1})
    assert [it["question_id"] for it in ds.items] == [1, 2]
    assert skip.counts == {"malformed record": 6, "empty text": 1, "bad label": 1}
    assert ("vqa.x.jsonl", "line 2", "malformed record") in {(r.source, r.record_id, r.reason) for r in skip.records()}
    nl = {"image_path": "a", "image2_path": "b", "text_segment": [5], "label": 1, "identifier": "dev-1-0-0"}
    skip = BadRecordCounter()
    bad = [{**nl, "label": 2, "identifier": "dev-2-0-0"}, {**nl, "label": "True"}]
    ds = OfficialIndexDataset(_jsonl(tmp_path / "n.jsonl", [nl, *bad]), tmp_path, "nlvr2", skip=skip)
    assert len(ds) == 1 and skip.counts == {"bad label": 2}
    skip = BadRecordCounter()
    cap = {"image_path": "a", "text_segment": None, "image_id": 3}
    bad = [{**cap, "image_id": "3"}, {**cap, "text_segment": []}]
    ds = OfficialIndexDataset(_jsonl(tmp_path / "c.jsonl", [cap, *bad]), tmp_path, "coco_captioning", skip=skip)
    assert len(ds) == 1 and skip.counts == {"malformed record": 1, "empty text": 1}
    with pytest.raises(BadRecordError, match="line 2"):
        OfficialIndexDataset(tmp_path / "vqa.x.jsonl", tmp_path, "vqav2", skip=BadRecordCounter(strict=True))


def test_unknown_task_missing_file_and_answer2label(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"image_path": "x", "label": 0}])
    with pytest.raises(ValueError, match="imagenet, vqav2, nlvr2, coco_retrieval, flickr30k, coco_captioning, nocaps"):
        OfficialIndexDataset(tmp_path / "a.jsonl", tmp_path, "retrieval")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        OfficialIndexDataset(["a.jsonl", "nope.jsonl"], tmp_path, "imagenet")
    save_answer_vocab(["yes", "no"], tmp_path / "answer2label.txt")
    assert load_answer2label(tmp_path / "answer2label.txt") == {"yes": 0, "no": 1}
    (tmp_path / "bad.txt").write_text('{"answer": "no", "label": 1}\n{"answer": "yes", "label": 0}\n')
    with pytest.raises(ValueError, match="label"):
        load_answer2label(tmp_path / "bad.txt")
