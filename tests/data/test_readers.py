"""Readers of the real formats: official conventions, bad records skipped and counted, strict mode."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from imglish.data.check import check_world
from imglish.data.coco import KarpathyCaptions, karpathy_caption_gt, load_caption_gt
from imglish.data.collate import Collator, collate_records, pad_sequences, text_segment
from imglish.data.flickr import Flickr30kCaptions
from imglish.data.imagenet import ImageFolderDataset, ImageOnlyDataset
from imglish.data.nlvr2 import NLVR2Dataset, nlvr2_image_paths
from imglish.data.skip import BadRecordCounter, BadRecordError, SkippedRecord
from imglish.data.synthetic import world_paths
from imglish.data.text import TextCorpus
from imglish.data.vqav2 import (
    VQAv2Dataset,
    answer_scores,
    build_answer_vocab,
    load_answer_vocab,
    normalize_answer,
    save_answer_vocab,
)
from imglish.data.wds import WdsStream


def _jpeg(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("raw,norm", [
    ("Two", "2"), ("a circle.", "circle"), ("t-shirt", "t shirt"), ("dont", "don't"), ("1,000", "1000"),
    ("2.5", "2.5"), ("yes!", "yes"), ("The Red one", "red 1"), ("  none ", "0"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def _ann(qid, mc, answers):
    return {"question_id": qid, "image_id": 1, "multiple_choice_answer": mc,
            "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]}


def test_answer_vocab_threshold_and_first_occurrence_order(tmp_path):
    anns = [_ann(i, "blue", []) for i in range(9)] + [_ann(100 + i, "Two", []) for i in range(10)]
    anns = [_ann(99, "red", [])] * 8 + anns + [_ann(200 + i, "2", []) for i in range(3)]
    vocab = build_answer_vocab([{"annotations": anns}])
    assert vocab == ["blue", "2"]  # red has 8 < 9; "Two" and "2" merge after normalisation
    path = save_answer_vocab(vocab, tmp_path / "answer2label.txt")
    assert load_answer_vocab(path) == vocab
    assert json.loads(path.read_text().splitlines()[1]) == {"answer": "2", "label": 1}


def test_soft_scores_vilt_and_vqa_and_raw_counting():
    a2l = {"2": 0, "blue": 1, "red": 2}
    answers = ["2"] * 5 + ["two"] * 2 + ["blue"] * 2 + ["red"]
    assert answer_scores(answers, a2l, "vilt") == {0: 1.0, 1: 0.6, 2: 0.3}
    assert answer_scores(answers, a2l, "vqa") == pytest.approx({0: 1.0, 1: 2 / 3, 2: 1 / 3})
    # official: raw strings are counted, so "two" is lost; normalising first recovers it
    assert answer_scores(["2", "two", "two"], a2l, "vilt") == {0: 0.3}
    assert answer_scores(["2", "two", "two"], a2l, "vilt", normalize=True) == {0: 0.9}


def test_vqa_reader_on_the_world_and_answers_outside_the_vocabulary(world):
    vq = world_paths(world)["vqav2_dir"]
    train_ann = vq / "v2_mscoco_train2014_annotations.json"
    vocab = build_answer_vocab([train_ann], min_count=9)
    ds = VQAv2Dataset(vq / "v2_OpenEnded_mscoco_train2014_questions.json", train_ann,
                      world_paths(world)["coco_root"], vocab)
    total = len(json.loads(train_ann.read_text())["annotations"])
    assert len(ds) + ds.skip.total == total  # nothing dropped silently
    rec = ds[0]
    assert rec["image"].size == (64, 64) and rec["text"].endswith("?")
    assert rec["target"].shape == (len(vocab),) and rec["target"].max() > 0
    # a vocabulary without most answers: those questions are counted, and strict mode names the first one
    small = ["yes", "no"]
    ds2 = VQAv2Dataset(vq / "v2_OpenEnded_mscoco_train2014_questions.json", train_ann,
                       world_paths(world)["coco_root"], small)
    assert ds2.skip.counts["answer outside vocabulary"] == total - len(ds2) > 0
    with pytest.raises(BadRecordError, match="answer outside vocabulary"):
        VQAv2Dataset(vq / "v2_OpenEnded_mscoco_train2014_questions.json", train_ann,
                     world_paths(world)["coco_root"], small, skip=BadRecordCounter(strict=True))


def test_karpathy_reader_splits_modes_and_gt(world):
    p = world_paths(world)
    pairs = KarpathyCaptions(p["coco_karpathy"], splits=["train"])
    per_image = KarpathyCaptions(p["coco_karpathy"], splits=["val", "test"], per="image")
    assert len(pairs) == 48 * 5 and len(per_image) == 12
    rec = pairs[7]
    assert rec["image"].size == (64, 64) and rec["text"] and rec["image_index"] == 1
    assert len(per_image[0]["captions"]) == 5
    flickr = Flickr30kCaptions(p["flickr30k_karpathy"], splits=["test"], per="image")
    # Flickr30k entries have no cocoid: the id is the 0-based imgid
    assert [e["image_id"] + 1 for e in flickr.images] == [e["image_id"] for e in per_image.images[6:]]
    gt = karpathy_caption_gt(p["coco_karpathy"], ["test"])
    assert load_caption_gt(p["coco_gt_test"]) == {im["id"]: [a["caption"] for a in gt["annotations"]
                                                             if a["image_id"] == im["id"]] for im in gt["images"]}
    with pytest.raises(ValueError, match="unknown Karpathy split"):
        KarpathyCaptions(p["coco_karpathy"], splits=["dev"])


def test_empty_caption_and_missing_image_are_skipped_and_counted(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(_jpeg())
    data = {"images": [
        {"filename": "a.jpg", "imgid": 0, "split": "train", "sentences": [{"raw": "a red square"}, {"raw": "  "}]},
        {"filename": "gone.jpg", "imgid": 1, "split": "train", "sentences": [{"raw": "nothing"}]},
    ]}
    (tmp_path / "k.json").write_text(json.dumps(data))
    ds = KarpathyCaptions(tmp_path / "k.json", tmp_path / "imgs")
    assert len(ds) == 2 and ds.skip.counts == {"empty text": 1}
    batch = collate_records([ds[0], ds[1]])
    assert batch["batch_size"] == 1 and batch["text"] == ["a red square"]
    assert [r.reason for r in batch["skipped"]] == ["image missing"]
    ds.skip.absorb(batch["skipped"])  # reported once in __getitem__ and once here: counted once
    assert ds.skip.counts == {"empty text": 1, "image missing": 1}
    assert "gone.jpg" not in ds.skip.summary() or "1#1" in ds.skip.summary()
    with pytest.raises(BadRecordError, match=r"k.json: bad record '0/1': empty text"):
        KarpathyCaptions(tmp_path / "k.json", tmp_path / "imgs", skip=BadRecordCounter(strict=True))


def test_nlvr2_naming_malformed_lines_and_corrupt_images(tmp_path):
    assert nlvr2_image_paths("R", "train-10171-0-0", "52")[1].as_posix() == "R/images/train/52/train-10171-0-img1.png"
    assert nlvr2_image_paths("R", "dev-850-0-3")[0].as_posix() == "R/images/dev/dev-850-0-img0.png"
    assert nlvr2_image_paths("R", "test1-0-1-0")[0].as_posix() == "R/images/test1/test1-0-1-img0.png"
    folder = tmp_path / "images" / "dev"
    folder.mkdir(parents=True)
    (folder / "dev-1-0-img0.png").write_bytes(_jpeg())
    (folder / "dev-1-0-img1.png").write_bytes(_jpeg((0, 0, 255)))
    (folder / "dev-2-0-img0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "dev-2-0-img1.png").write_bytes(_jpeg())
    lines = [json.dumps({"identifier": "dev-1-0-0", "sentence": "Both images are red.", "label": "False"}),
             '{"identifier": "dev-3-0-0", "sentence": ',
             json.dumps({"identifier": "dev-2-0-0", "sentence": "One is blue.", "label": "True"}),
             json.dumps({"identifier": "dev-4-0-0", "sentence": "x", "label": "maybe"})]
    (tmp_path / "dev.json").write_text("\n".join(lines) + "\n")
    ds = NLVR2Dataset(tmp_path / "dev.json")
    assert len(ds) == 2 and ds.skip.counts == {"malformed record": 1, "bad label": 1}
    rec = ds[0]
    assert rec["label"] == 0 and rec["image2"].getpixel((5, 5))[2] > 200
    bad = ds[1]
    assert isinstance(bad, SkippedRecord) and bad.reason == "image unreadable" and bad.record_id == "dev-2-0-0"
    with pytest.raises(BadRecordError, match="line 2"):
        NLVR2Dataset(tmp_path / "dev.json", skip=BadRecordCounter(strict=True))


def test_counts_from_dataloader_workers_reach_the_main_process(tmp_path):
    root = tmp_path / "tree"
    for i, cls in enumerate(["a", "b"]):
        (root / cls).mkdir(parents=True)
        for j in range(5):
            (root / cls / f"{j}.jpg").write_bytes(_jpeg() if (i, j) not in {(0, 1), (1, 3)} else b"not an image")
    ds = ImageFolderDataset(root, transform=lambda im: torch.tensor(im.getpixel((0, 0)), dtype=torch.float32))
    counter = BadRecordCounter()
    n = 0
    for batch in DataLoader(ds, batch_size=4, num_workers=2, collate_fn=Collator()):
        counter.absorb(batch["skipped"])
        n += batch["batch_size"]
    assert n == 8 and counter.counts == {"image unreadable": 2}
    assert ds.skip.total == 0  # the main-process copy saw nothing: counts travel with the batches
    with pytest.raises(BadRecordError, match="image unreadable"):
        strict = ImageFolderDataset(root, skip=BadRecordCounter(strict=True))
        [strict[i] for i in range(len(strict))]


def test_image_only_and_text_corpus(world, tmp_path):
    p = world_paths(world)
    imgs = ImageOnlyDataset(p["images_train"])
    assert len(imgs) == 48 and imgs[3]["image"].mode == "RGB"
    f = tmp_path / "t.txt"
    f.write_bytes("first line\n\n  \nsecond \xe9t\xe9\n".encode() + b"\xff\xfe bad\n" + b"last")
    corpus = TextCorpus([f, p["text_train"]], tokenizer=lambda s: [0] + [4] * len(s.split()) + [2])
    assert corpus.skip.counts == {"empty text": 2}
    assert corpus[1]["text"] == "second \xe9t\xe9" and corpus[1]["text_ids"] == [0, 4, 4, 2]
    assert isinstance(corpus[2], SkippedRecord) and corpus[2].reason == "bad encoding"
    assert corpus[3]["text"] == "last" and corpus[3]["source"] == "t.txt:6"
    assert len(corpus) == 4 + 48 * 5


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_wds_pairs_skip_bad_samples_and_shuffle_by_seed_and_epoch(tmp_path):
    samples = [(f"{i:04d}", {"jpg": _jpeg(), "txt": f"caption {i}".encode()}) for i in range(20)]
    samples[5] = ("0005", {"jpg": b"garbage", "txt": b"caption 5"})
    samples[9] = ("0009", {"jpg": _jpeg(), "txt": b"   "})
    _write_tar(tmp_path / "s-0.tar", samples[:10])
    _write_tar(tmp_path / "s-1.tar", samples[10:])
    stream = WdsStream(str(tmp_path / "s-{0..1}.tar"), "pairs", tokenizer=lambda s: [0, 5, 2])
    recs = list(stream)
    good = [r for r in recs if not isinstance(r, SkippedRecord)]
    assert len(good) == 18 and good[0]["text_ids"] == [0, 5, 2]
    assert stream.skip.counts == {"image unreadable": 1, "empty text": 1}
    order = lambda s: [r["key"] for r in s if not isinstance(r, SkippedRecord)]
    a = WdsStream(str(tmp_path), "pairs", shuffle_shards=True, shuffle_buffer=8, seed=1)
    b = WdsStream(str(tmp_path), "pairs", shuffle_shards=True, shuffle_buffer=8, seed=1)
    first = order(a)
    assert first == order(b) and sorted(first) == sorted(order(stream))
    a.set_epoch(1)
    assert order(a) != first
    with pytest.raises(BadRecordError, match="0005"):
        list(WdsStream(str(tmp_path), "pairs", skip=BadRecordCounter(strict=True)))


def test_text_segment_and_padding_follow_the_official_layout():
    tokens, pad, n = text_segment([7, 8, 9, 10], max_len=5)
    assert tokens == [0, 7, 8, 9, 2] and pad == [0] * 5 and n == 5
    tokens, pad, n = text_segment([7], max_len=6)
    assert tokens == [0, 7, 2, 1, 1, 1] and pad == [0, 0, 0, 1, 1, 1] and n == 3
    with pytest.raises(ValueError, match="empty text"):
        text_segment([], 8)
    ids, mask = pad_sequences([[0, 5, 2], [0, 5, 6, 7, 2]], max_length=4)
    assert ids.tolist() == [[0, 5, 2, 1], [0, 5, 6, 2]] and mask.tolist() == [[0, 0, 0, 1], [0, 0, 0, 0]]


def test_check_world_reads_everything_and_reports_a_corrupt_file(world, tmp_path):
    import shutil

    copy = tmp_path / "w"
    shutil.copytree(world, copy)
    victim = sorted((copy / "coco" / "train2014").glob("*.jpg"))[0]
    victim.unlink()
    victim.write_bytes(b"\xff\xd8 truncated jpeg")  # a new file: the flickr/imagenet links keep the good bytes
    report = check_world(copy)
    assert report["coco_train"]["records"] == 48 * 5 - 5
    assert report["coco_train"]["skipped"] == {"image unreadable": 5}  # its five caption records
    assert report["flickr30k_train"]["skipped"] == {}
    assert report["nlvr2_train"]["records"] == 48 * 4 and report["wds_texts"]["records"] == 60 * 5
    # the dense layouts: the ADE20K copy is a hard link to the good bytes; the instances file shares coco/
    assert report["ade20k_train"] == {"records": 48, "skipped": {}}
    assert report["coco_instances_train"]["records"] == 47
    assert sum(report["coco_instances_train"]["skipped"].values()) == 1
    with pytest.raises(BadRecordError, match="image unreadable"):
        check_world(copy, strict=True)
