"""``imglish predict``: every subcommand prints what the pipeline answers; bad input exits 2 with one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from imglish.cli.main import main
from imglish.inference import pipeline


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _close(a, b, tol=1e-5):
    """Answers equal up to float rounding: same labels, scores within ``tol`` (through JSON)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= tol
    return a == b


def test_classify_json_and_text(checkpoints, images, capsys):
    ck = str(checkpoints["classify"])
    assert main(["predict", "classify", "--checkpoint", ck, *map(str, images[:2]), "--top-k", "2", "--json"]) == 0
    rows = _json_lines(capsys.readouterr().out)
    pipe = pipeline("classify", ck, device="cpu")
    assert [r["image"] for r in rows] == [str(p) for p in images[:2]]
    assert all(_close(r["result"], pipe(p, top_k=2)) for r, p in zip(rows, images))
    assert main(["predict", "classify", "--checkpoint", ck, str(images[0]), "--top-k", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(images[0]) and out[1].split()[0] == rows[0]["result"][0]["label"]


def test_vqa_caption_nlvr2_zeroshot_rank(checkpoints, images, capsys):
    img = [str(p) for p in images]
    # vqa: one object per question
    assert main(["predict", "vqa", "--checkpoint", str(checkpoints["vqa"]), img[0], "--question", "what colour",
                 "--question", "how many balls", "--top-k", "2", "--json"]) == 0
    rows = _json_lines(capsys.readouterr().out)
    pipe = pipeline("vqa", checkpoints["vqa"], device="cpu")
    assert [r["question"] for r in rows] == ["what colour", "how many balls"]
    assert all(_close(r["result"], pipe(img[0], question=r["question"], top_k=2)) for r in rows)
    # caption
    assert main(["predict", "caption", "--checkpoint", str(checkpoints["caption"]), *img[:2], "--beams", "2",
                 "--max-length", "6", "--json"]) == 0
    rows = _json_lines(capsys.readouterr().out)
    want = pipeline("caption", checkpoints["caption"], device="cpu")(img[:2], num_beams=2, max_length=6)
    assert [r["result"] for r in rows] == want
    # nlvr2
    assert main(["predict", "nlvr2", "--checkpoint", str(checkpoints["nlvr2"]), img[0], img[1], "--text",
                 "a red ball", "--json"]) == 0
    (row,) = _json_lines(capsys.readouterr().out)
    assert _close(row["result"], pipeline("nlvr2", checkpoints["nlvr2"], device="cpu")(img[0], img[1], "a red ball"))
    # zeroshot
    assert main(["predict", "zeroshot", "--checkpoint", str(checkpoints["retrieval"]), img[2], "--labels",
                 "cat,dog,fish", "--json"]) == 0
    (row,) = _json_lines(capsys.readouterr().out)
    want = pipeline("zeroshot", checkpoints["retrieval"], device="cpu")(img[2], labels=["cat", "dog", "fish"])
    assert _close(row["result"], want)
    # rank: one object per image and per text, best first
    texts = ["a red ball", "a blue cube"]
    assert main(["predict", "rank", "--checkpoint", str(checkpoints["retrieval"]), "--images", *img[:3], "--texts",
                 *texts, "--json"]) == 0
    rows = _json_lines(capsys.readouterr().out)
    ranked = pipeline("rank", checkpoints["retrieval"], device="cpu")(img[:3], texts)
    for i in range(3):
        assert [t["text"] for t in rows[i]["result"]] == [texts[k] for k in ranked["image_to_text"][i]]
        assert rows[i]["result"][0]["score"] == pytest.approx(max(ranked["scores"][i]), abs=1e-5)
    for j in range(2):
        assert [r["image"] for r in rows[3 + j]["result"]] == [img[k] for k in ranked["text_to_image"][j]]


def test_zeroshot_templates_and_labels_files(checkpoints, images, tmp_path, capsys):
    tpl = tmp_path / "templates.txt"
    tpl.write_text("a photo of a {}.\n\na picture of a {}.\n")
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    assert main(["predict", "zeroshot", "--checkpoint", str(checkpoints["retrieval"]), str(images[0]), "--labels",
                 str(names), "--templates", str(tpl), "--json"]) == 0
    (row,) = _json_lines(capsys.readouterr().out)
    want = pipeline("zeroshot", checkpoints["retrieval"], device="cpu")(
        images[0], labels=["cat", "dog"], templates=["a photo of a {}.", "a picture of a {}."])
    assert _close(row["result"], want)
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholder here\n")
    assert main(["predict", "zeroshot", "--checkpoint", str(checkpoints["retrieval"]), str(images[0]), "--labels",
                 "cat,dog", "--templates", str(bad)]) == 2
    assert "must hold exactly one '{}'" in capsys.readouterr().err


def test_a_bad_file_among_several_is_skipped_and_counted(checkpoints, images, bad_files, capsys):
    args = ["predict", "classify", "--checkpoint", str(checkpoints["classify"]), str(images[0]),
            str(bad_files["truncated"]), str(bad_files["text"]), str(images[1]), "--json"]
    assert main(args) == 0
    cap = capsys.readouterr()
    rows = _json_lines(cap.out)
    assert [("error" in r) for r in rows] == [False, True, True, False]
    assert "truncated" in rows[1]["error"] and "notes.txt" in rows[2]["error"]
    assert "skipped 2 of 4 inputs" in cap.err


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "empty", "long_text", "other_task", "no_ckpt",
                                  "all_bad"])
def test_bad_input_exits_2_with_one_line(checkpoints, images, bad_files, capsys, case):
    ck = str(checkpoints["vqa"])
    argv = {
        "missing": ["vqa", "--checkpoint", ck, str(bad_files["missing"]), "--question", "what"],
        "text": ["vqa", "--checkpoint", ck, str(bad_files["text"]), "--question", "what"],
        "truncated": ["vqa", "--checkpoint", ck, str(bad_files["truncated"]), "--question", "what"],
        "empty": ["vqa", "--checkpoint", ck, str(bad_files["empty"]), "--question", "what"],
        "long_text": ["vqa", "--checkpoint", ck, str(images[0]), "--question", " ".join(["red"] * 50)],
        "other_task": ["caption", "--checkpoint", ck, str(images[0])],
        "no_ckpt": ["caption", "--checkpoint", "/no/such/model.safetensors", str(images[0])],
        "all_bad": ["classify", "--checkpoint", str(checkpoints["classify"]), str(bad_files["text"]),
                    str(bad_files["missing"])],
    }[case]
    expect = {
        "missing": "missing.png: no such file",
        "text": "notes.txt: not an image format",
        "truncated": "truncated or corrupt",
        "empty": "empty (0 bytes)",
        "long_text": "is 50 tokens; the model takes at most 30",
        "other_task": "holds a 'vqav2' model",
        "no_ckpt": "does not exist",
        "all_bad": "none of the 2 inputs could be used",
    }[case]
    assert main(["predict", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert expect in err[-1] and err[-1].startswith("imglish predict: error:")
    if case != "all_bad":
        assert len(err) == 1


def test_the_installed_command_prints_no_traceback(checkpoints, bad_files):
    proc = subprocess.run(
        [sys.executable, "-m", "imglish.cli.main", "predict", "classify", "--checkpoint",
         str(checkpoints["classify"]), str(bad_files["truncated"])],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert "truncated" in proc.stderr
