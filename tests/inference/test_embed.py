"""``imglish embed``: batch embeddings of folders, shards and text files equal the pipeline's own embeddings; bad
files are skipped and counted; an interrupted run resumes to the same file; bad input exits 2 with one line."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import imglish
from imglish.cli.main import main
from imglish.inference.embed import embed, load_embeddings

from .conftest import write_image


@pytest.fixture(scope="module")
def pipe(checkpoints):
    return imglish.pipeline("embed", checkpoints["retrieval"], device="cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, bad_files) -> Path:
    """Seven good images (in sub-folders, PNG and JPEG) and three bad files (truncated JPEG, text named .jpg,
    empty .png), plus a .txt that is not an image and must be ignored."""
    root = tmp_path_factory.mktemp("embed_folder")
    for i in range(4):
        write_image(root / "a" / f"img{i}.png", 10 + i)
    for i in range(3):
        write_image(root / "b" / f"photo{i}.png", 20 + i)
        Image.open(root / "b" / f"photo{i}.png").save(root / "b" / f"photo{i}.jpg", quality=90)
        (root / "b" / f"photo{i}.png").unlink()
    shutil.copy(bad_files["truncated"], root / "a" / "truncated.jpg")
    (root / "b" / "notes.jpg").write_text("this is not an image\n")
    (root / "empty.png").write_bytes(b"")
    (root / "readme.txt").write_text("ignored\n")
    return root


BAD = {"a/truncated.jpg", "b/notes.jpg", "empty.png"}


def _good(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.suffix in (".png", ".jpg") and p.relative_to(root).as_posix() not in BAD)


def test_folder_with_bad_files(checkpoints, folder, pipe, tmp_path):
    out = tmp_path / "emb.safetensors"
    summary = embed(checkpoints["retrieval"], images=folder, out=out, batch_size=3, part_batches=2, device="cpu")
    ids, emb, meta = load_embeddings(out)
    good = _good(folder)
    assert ids == good and summary.count == len(good) == 7
    assert emb.dtype == torch.float32 and emb.shape == (7, pipe.model.config.embed_dim)
    assert torch.allclose(emb, pipe.embed_images([folder / i for i in ids]), atol=1e-5)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(7), atol=1e-5)
    assert meta["skipped"] == summary.skipped == 3 and meta["skipped_reasons"] == {"image unreadable": 3}
    assert {r["record_id"] for r in meta["skipped_records"]} == BAD
    assert meta["kind"] == "image" and meta["count"] == 7 and meta["dim"] == emb.shape[1]
    assert meta["checkpoint"] == str(checkpoints["retrieval"])
    assert meta["model_name"] == "beit3_tiny_patch16_224_retrieval"
    assert summary.skipped_line().startswith("skipped 3 bad files: ")
    assert not (tmp_path / "emb.safetensors.parts").exists()
    # the file is plain safetensors too
    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["ids"]) == ids and torch.equal(f.get_tensor("embeddings"), emb)


def test_resume_equals_one_shot(checkpoints, folder, tmp_path):
    kw = dict(images=folder, batch_size=2, part_batches=1, device="cpu")
    embed(checkpoints["retrieval"], out=tmp_path / "one.safetensors", **kw)
    out = tmp_path / "two.safetensors"
    seen = []
    first = embed(checkpoints["retrieval"], out=out, stop_after_parts=2, on_part=seen.append, **kw)
    assert not first.complete and seen == [1, 2] and not out.exists()
    assert sorted(p.name for p in (tmp_path / "two.safetensors.parts").iterdir()) == [
        "part-000000.safetensors", "part-000001.safetensors", "progress.json"]
    with pytest.raises(ValueError, match="--resume"):  # without --resume the parts are not overwritten
        embed(checkpoints["retrieval"], out=out, **kw)
    with pytest.raises(ValueError, match="batch_size was 2 .* now 3"):  # other settings cannot continue them
        embed(checkpoints["retrieval"], out=out, resume=True, **{**kw, "batch_size": 3})
    # a crash between writing a part and recording it in progress.json leaves a part that resume rewrites
    (tmp_path / "two.safetensors.parts" / "part-000002.safetensors").write_bytes(b"half-written")
    second = embed(checkpoints["retrieval"], out=out, resume=True, **kw)
    assert second.complete and second.resumed_records == 4
    a, b = load_embeddings(tmp_path / "one.safetensors"), load_embeddings(out)
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == b[2]
    # resuming a finished job changes nothing
    assert embed(checkpoints["retrieval"], out=out, resume=True, **kw).count == 7


def test_workers_give_the_same_file(checkpoints, folder, tmp_path):
    kw = dict(images=folder, batch_size=4, device="cpu")
    embed(checkpoints["retrieval"], out=tmp_path / "w0.safetensors", num_workers=0, **kw)
    embed(checkpoints["retrieval"], out=tmp_path / "w2.safetensors", num_workers=2, **kw)
    a, b = load_embeddings(tmp_path / "w0.safetensors"), load_embeddings(tmp_path / "w2.safetensors")
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[2]["skipped_records"] == b[2]["skipped_records"]


def _encoded(seed: int, fmt: str = "PNG") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_shards(checkpoints, pipe, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "s-000.tar", "w") as tar:
        for k in range(3):
            _add(tar, f"k{k:03d}.png", _encoded(k))
            _add(tar, f"k{k:03d}.txt", b"a caption")
    with tarfile.open(shards / "s-001.tar", "w") as tar:
        _add(tar, "k003.webp", _encoded(3, "WEBP"))
        _add(tar, "k004.jpg", b"not a jpeg")  # unreadable image
        _add(tar, "k005.txt", b"no image at all")  # image missing
    out = tmp_path / "shards.safetensors"
    summary = embed(checkpoints["retrieval"], images=str(shards / "s-{000..001}.tar"), out=out, batch_size=2,
                    device="cpu")
    ids, emb, meta = load_embeddings(out)
    assert ids == ["k000", "k001", "k002", "k003"]
    want = pipe.embed_images([_encoded(i) for i in range(3)] + [_encoded(3, "WEBP")])
    assert torch.allclose(emb, want, atol=1e-5)
    assert summary.skipped == 2 and meta["skipped_reasons"] == {"image unreadable": 1, "image missing": 1}
    assert {(r["source"], r["record_id"]) for r in meta["skipped_records"]} == {("s-001.tar", "k004"),
                                                                              ("s-001.tar", "k005")}
    # a folder of shards and a '::' list are the same input
    for spec in (shards, f"{shards / 's-000.tar'}::{shards / 's-001.tar'}"):
        again = tmp_path / "again.safetensors"
        embed(checkpoints["retrieval"], images=spec, out=again, batch_size=2, device="cpu")
        assert load_embeddings(again)[0] == ids and torch.equal(load_embeddings(again)[1], emb)
        again.unlink()


def test_texts_txt_and_jsonl(checkpoints, pipe, tmp_path):
    lines = ["a red ball", "", "the small cat", "   ", "two blue cubes", "a photo of a dog"]
    txt = tmp_path / "t.txt"
    txt.write_text("\n".join(lines) + "\n")
    s = embed(checkpoints["retrieval"], texts=txt, out=tmp_path / "t.safetensors", batch_size=2, device="cpu")
    ids, emb, meta = load_embeddings(tmp_path / "t.safetensors")
    assert ids == ["0", "2", "4", "5"] and meta["kind"] == "text"
    assert torch.allclose(emb, pipe.embed_texts([lines[int(i)] for i in ids]), atol=1e-5)
    assert s.skipped == 2 and meta["skipped_reasons"] == {"empty line": 2}

    rows = [{"id": "x1", "text": "a red ball"}, {"id": 7, "text": "three green squares"}, "not json",
            {"text": "no id"}, {"id": "x1", "text": "duplicate id"}]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    s = embed(checkpoints["retrieval"], texts=jsonl, out=tmp_path / "j.safetensors", device="cpu")
    ids, emb, meta = load_embeddings(tmp_path / "j.safetensors")
    assert ids == ["x1", "7"]
    assert torch.allclose(emb, pipe.embed_texts(["a red ball", "three green squares"]), atol=1e-5)
    assert meta["skipped_reasons"] == {"malformed record": 2, "duplicate id": 1}


def test_large_id_lists_go_to_a_tensor(checkpoints, tmp_path, monkeypatch):
    import imglish.inference.embed as mod

    monkeypatch.setattr(mod, "MAX_IDS_METADATA_BYTES", 4)
    txt = tmp_path / "t.txt"
    txt.write_text("a red ball\nthe small cat\n")
    out = tmp_path / "t.safetensors"
    embed(checkpoints["retrieval"], texts=txt, out=out, device="cpu")
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["ids"] == "@ids_json" and "ids_json" in f.keys()
    assert load_embeddings(out)[0] == ["0", "1"]


def test_backbone_checkpoint(infer_tokenizer, images, tmp_path):
    from imglish.tokenizers.processor import Processor
    from imglish.tokenizers.transforms import TransformConfig

    torch.manual_seed(0)
    net = imglish.create_model("beit3_tiny_patch16_224", img_size=32, vocab_size=len(infer_tokenizer), depth=2)
    proc = Processor(infer_tokenizer, TransformConfig.for_task("retrieval", 32), max_length=32)
    ck = imglish.save_model(net.eval(), tmp_path / "bb" / "model.safetensors", processor=proc)
    src = tmp_path / "imgs"
    src.mkdir()
    for p in images:
        shutil.copy(p, src / p.name)
    embed(ck, images=src, out=tmp_path / "bb.safetensors", device="cpu")
    ids, emb, _ = load_embeddings(tmp_path / "bb.safetensors")
    want = torch.nn.functional.normalize(net.encode_image(torch.stack([imglish.pipeline(
        "embed", ck, device="cpu").preprocess({"image": src / i})["image"] for i in ids])), dim=-1)
    assert ids == [p.name for p in images] and torch.allclose(emb, want, atol=1e-5)


def test_cli(checkpoints, folder, bad_files, tmp_path, capsys):
    ck = str(checkpoints["retrieval"])
    out = tmp_path / "cli.safetensors"
    base = ["embed", "--checkpoint", ck, "--device", "cpu", "--quiet", "--workers", "0"]
    assert main([*base, "--images", str(folder), "--out", str(out), "--batch-size", "4"]) == 0
    cap = capsys.readouterr()
    assert "skipped 3 bad files" in cap.err and f"wrote {out}: 7 image embeddings" in cap.out
    assert load_embeddings(out)[0] == _good(folder)

    def fails(args: list[str], *words: str) -> None:
        assert main([*base, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("imglish embed: error: ")
        assert all(w in err[0] for w in words), err[0]

    fails(["--images", str(folder), "--out", str(out)], "already exists", "--resume")
    other = ["--checkpoint", str(checkpoints["classify"])]
    fails(["--images", str(folder), "--out", str(tmp_path / "x.st"), *other], str(checkpoints["classify"]),
          "imageclassification", "retrieval")
    fails(["--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.st")], "nowhere", "does not exist")
    fails(["--texts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "x.st")], "none.txt", "does not exist")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "notes.md").write_text("x")
    fails(["--images", str(empty), "--out", str(tmp_path / "x.st")], "no image files", "empty_dir")
    fails(["--images", str(folder), "--out", str(tmp_path / "x.st"), "--strict"], "--strict", "a/truncated.jpg")
    assert not (tmp_path / "x.st").exists() and not (tmp_path / "x.st.parts").exists()
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    shutil.copy(bad_files["truncated"], only_bad / "t.jpg")
    (only_bad / "e.png").write_bytes(b"")
    fails(["--images", str(only_bad), "--out", str(tmp_path / "x.st")], "none of the 2 inputs", "skipped 2")
    assert not (tmp_path / "x.st.parts").exists()
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n")
    fails(["--texts", str(blank), "--out", str(tmp_path / "x.st")], "none of the 2 inputs")
    # --resume on the finished output is a no-op that succeeds
    assert main([*base, "--images", str(folder), "--out", str(out), "--batch-size", "4", "--resume"]) == 0


def _torchrun_embed(*args: str):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "imglish.cli.main", "embed", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_two_processes_write_the_file_of_one(checkpoints, folder, tmp_path):
    kw = dict(images=folder, batch_size=2, part_batches=1, device="cpu")
    embed(checkpoints["retrieval"], out=tmp_path / "one.safetensors", **kw)
    one = load_embeddings(tmp_path / "one.safetensors")
    flags = ["--checkpoint", str(checkpoints["retrieval"]), "--images", str(folder), "--batch-size", "2",
             "--part-batches", "1", "--workers", "0", "--device", "cpu", "--quiet"]
    # from nothing: the parts are shared out between the ranks and rank 0 joins them
    done = _torchrun_embed(*flags, "--out", str(tmp_path / "two.safetensors"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1 and "7 image embeddings" in done.stdout  # rank 0 reports for all
    two = load_embeddings(tmp_path / "two.safetensors")
    assert two[0] == one[0] and two[2]["skipped_records"] == one[2]["skipped_records"]
    torch.testing.assert_close(two[1], one[1], atol=1e-6, rtol=0)
    assert not (tmp_path / "two.safetensors.parts").exists()
    # a single-process run stopped after 2 parts, resumed by 2 processes: the same file again
    out = tmp_path / "three.safetensors"
    assert not embed(checkpoints["retrieval"], out=out, stop_after_parts=2, **kw).complete
    done = _torchrun_embed(*flags, "--out", str(out), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    three = load_embeddings(out)
    assert three[0] == one[0] and three[2]["skipped"] == one[2]["skipped"]
    torch.testing.assert_close(three[1], one[1], atol=1e-6, rtol=0)
