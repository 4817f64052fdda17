"""``imglish serve``: every endpoint answers what the pipeline answers, in-process and as a real uvicorn process;
requests are batched; bad uploads and overload are JSON 4xx/503, never a 500 or a dead server."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from imglish.inference.server import Batcher, QueueFull, ServeConfig, create_app, load_pipelines  # noqa: E402


def _close(a, b, tol=1e-4):
    """Answers equal up to float rounding (batched and single forwards): same labels, numbers within ``tol``."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= tol
    return a == b


def huge_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header for a ``width`` x ``height`` image with almost no data: decoding it would need
    gigabytes, reading its header needs nothing."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def pipes(checkpoints):
    return load_pipelines([checkpoints[k] for k in ("classify", "vqa", "caption", "nlvr2", "retrieval")],
                          device="cpu")


@pytest.fixture(scope="module")
def expected(pipes, images):
    """What the pipelines answer directly, per request kind and image."""
    img = [str(p) for p in images]
    return {
        "classify": [pipes["classify"](p, top_k=2) for p in img],
        "vqa": [pipes["vqa"](p, question="what colour is the ball", top_k=2) for p in img],
        "caption": [pipes["caption"](p, num_beams=2, max_length=8) for p in img],
        "nlvr2": [pipes["nlvr2"](img[i], img[(i + 1) % len(img)], text="two red balls") for i in range(len(img))],
        "zeroshot": [pipes["zeroshot"](p, labels=["cat", "dog", "fish"]) for p in img],
        "embed_image": [pipes["embed"](images=p)["image_embeds"].tolist() for p in img],
        "embed_text": [pipes["embed"](texts=t)["text_embeds"].tolist() for t in ("a red ball", "two cats")],
    }


def _request(kind: str, i: int, images: list[Path]) -> tuple[str, dict, dict]:
    """(path, files, form) of request ``kind`` on image ``i``."""
    data = [p.read_bytes() for p in images]
    n = len(images)
    image = {"image": (images[i].name, data[i], "image/png")}
    return {
        "classify": ("/v1/classify", image, {"top_k": "2"}),
        "vqa": ("/v1/vqa", image, {"question": "what colour is the ball", "top_k": "2"}),
        "caption": ("/v1/caption", image, {"num_beams": "2", "max_length": "8"}),
        "nlvr2": ("/v1/nlvr2", {"left": (images[i].name, data[i]), "right": ("r.png", data[(i + 1) % n])},
                  {"text": "two red balls"}),
        "zeroshot": ("/v1/zeroshot", image, {"labels": "cat,dog,fish"}),
        "embed_image": ("/v1/embed/image", image, {}),
        "embed_text": ("/v1/embed/text", {}, {"text": ("a red ball", "two cats")[i % 2]}),
    }[kind]


def _want(expected: dict, kind: str, i: int):
    if kind == "embed_image":
        return {"image_embeds": expected[kind][i], "dim": len(expected[kind][i][0])}
    if kind == "embed_text":
        row = expected[kind][i % 2]
        return {"text_embeds": row, "dim": len(row[0])}
    return expected[kind][i]


def _bad_uploads(bad_files) -> dict[str, tuple[str, dict, dict]]:
    return {
        "truncated JPEG": ("/v1/classify", {"image": ("t.jpg", bad_files["truncated"].read_bytes(), "image/jpeg")}, {}),
        "text file": ("/v1/classify", {"image": ("notes.txt", bad_files["text"].read_bytes(), "text/plain")}, {}),
        "huge-dimension PNG": ("/v1/classify", {"image": ("huge.png", huge_png(), "image/png")}, {}),
        "empty file": ("/v1/vqa", {"image": ("e.png", b"", "image/png")}, {"question": "what colour"}),
        "empty body": ("/v1/classify", {}, {}),
    }


BAD_STATUS = {"truncated JPEG": 422, "text file": 422, "huge-dimension PNG": 413, "empty file": 422,
              "empty body": 422}


# ============================================================================================= in-process
@pytest.fixture(scope="module")
def client(pipes):
    with TestClient(create_app(pipes, ServeConfig(max_wait_ms=2, max_upload_bytes=256 * 1024))) as c:
        yield c


def test_every_endpoint_answers_what_the_pipeline_answers(client, expected, images):
    for kind in expected:
        for i in range(2):
            path, files, form = _request(kind, i, images)
            r = client.post(path, files=files or None, data=form)
            assert r.status_code == 200, (kind, r.text)
            assert _close(r.json(), _want(expected, kind, i)), (kind, r.json())


def test_bad_uploads_are_json_4xx_naming_the_problem(client, bad_files, images):
    for what, (path, files, form) in _bad_uploads(bad_files).items():
        r = client.post(path, files=files or None, data=form)
        assert r.status_code == BAD_STATUS[what], (what, r.text)
        body = r.json()
        assert body["status"] == r.status_code and body["error"], what
    assert "900000000 pixels" in client.post(*_bad_uploads(bad_files)["huge-dimension PNG"][:1],
                                        files=_bad_uploads(bad_files)["huge-dimension PNG"][1]).json()["error"]
    # under Pillow's own bomb guard but over max_pixels: refused from the header, before decoding
    r = client.post("/v1/classify", files={"image": ("wide.png", huge_png(8000, 6000), "image/png")})
    assert r.status_code == 413 and "8000x6000 = 48000000 pixels" in r.json()["error"]
    assert "image is required" in client.post("/v1/classify").json()["error"]
    # a body over max_upload_bytes: 413 before parsing
    big = {"image": ("big.png", os.urandom(300 * 1024), "image/png")}
    r = client.post("/v1/classify", files=big)
    assert r.status_code == 413 and "262144 bytes" in r.json()["error"]
    # parameters and texts
    img = {"image": ("a.png", images[0].read_bytes())}
    assert client.post("/v1/classify", files=img, data={"top_k": "many"}).status_code == 422
    r = client.post("/v1/classify", files=img, data={"top_k": "0"})
    assert r.status_code == 422 and "top_k" in r.json()["error"]
    r = client.post("/v1/vqa", files=img, data={"question": "red " * 100})
    assert r.status_code == 422 and "tokens" in r.json()["error"]
    r = client.post("/v1/vqa", files=img, data={"question": "x" * 3000})
    assert r.status_code == 422 and "max_text_chars" in r.json()["error"]
    r = client.post("/v1/zeroshot", files=img, data={"labels": "cat,cat"})
    assert r.status_code == 422 and "distinct" in r.json()["error"]
    r = client.post("/v1/zeroshot", files=img, data={"labels": '["a cat", "a dog"]', "top_k": "1"})
    assert r.status_code == 200 and len(r.json()) == 1
    # unknown path and method
    assert client.post("/v1/segment").json()["status"] == 404
    assert client.get("/v1/classify").status_code == 405
    # the server still answers
    assert client.post("/v1/classify", files=img).status_code == 200
    health = client.get("/health").json()
    assert health["status_codes"]["413"] >= 2 and health["status_codes"]["422"] >= 5
    assert "500" not in health["status_codes"]


def test_unloaded_task_is_404_naming_the_checkpoint_to_pass(pipes, images):
    with TestClient(create_app({"classify": pipes["classify"]})) as c:
        r = c.post("/v1/vqa", files={"image": ("a.png", images[0].read_bytes())}, data={"question": "what"})
        assert r.status_code == 404
        assert "no vqa model is loaded" in r.json()["error"] and "vqav2" in r.json()["error"]
        page = c.get("/")
        assert page.status_code == 200 and '["classify"]' in page.text
        spec = c.get("/openapi.json").json()
        assert {"/v1/classify", "/v1/vqa", "/v1/embed/text", "/health"} <= set(spec["paths"])


def test_queue_full_and_timeout_are_503(pipes, images):
    pipe = pipes["classify"]
    release = threading.Event()

    class Slow:  # the classify pipeline with a forward that waits until released
        task, max_pixels, model, processor = pipe.task, pipe.max_pixels, pipe.model, pipe.processor
        checkpoint, device, precision = pipe.checkpoint, pipe.device, pipe.precision

        def __getattr__(self, name):
            return getattr(pipe, name)

        def forward(self, batch, **kw):
            release.wait(20)
            return pipe.forward(batch, **kw)

    cfg = ServeConfig(max_batch=1, max_wait_ms=0, max_queue=1, timeout_s=1.5)
    img = {"image": ("a.png", images[0].read_bytes())}
    with TestClient(create_app({"classify": Slow()}, cfg)) as c, ThreadPoolExecutor(2) as pool:
        first = pool.submit(c.post, "/v1/classify", files=img)  # runs, blocked in forward
        time.sleep(0.5)
        second = pool.submit(c.post, "/v1/classify", files=img)  # waits in the queue
        time.sleep(0.5)
        r = c.post("/v1/classify", files=img)  # no room
        assert r.status_code == 503 and "max_queue" in r.json()["error"]
        assert r.headers["retry-after"] == "1"
        # both waiting requests time out (1.5 s) while the forward is blocked
        assert first.result().status_code == 503 and "timeout_s" in first.result().json()["error"]
        assert second.result().status_code == 503
        release.set()
        time.sleep(0.3)
        ok = c.post("/v1/classify", files=img)  # the thread went on
        assert ok.status_code == 200
        assert c.get("/health").json()["dropped"] >= 1


def test_batcher_groups_by_pipeline_and_forward_parameters(pipes, images):
    cap, cls = pipes["caption"], pipes["classify"]
    seen = []

    class Spy:
        def __init__(self, inner):
            self.inner, self.task = inner, inner.task

        def collate(self, rows):
            return self.inner.collate(rows)

        def forward(self, batch, **kw):
            seen.append((self.task, len(next(iter(batch.values()))), kw.get("num_beams")))
            return self.inner.forward(batch, **kw)

        def postprocess(self, raw, **kw):
            return self.inner.postprocess(raw, **kw)

    spy_cap, spy_cls = Spy(cap), Spy(cls)
    b = Batcher(ServeConfig(max_batch=3, max_wait_ms=300, max_queue=20))
    x = cls.preprocess({"image": str(images[0])})
    futures = []
    b.start()
    try:
        for _ in range(7):  # seven handlers are reading requests: the first request waits for company
            b.announce()
        for i in range(4):
            futures.append(b.submit(spy_cls, x, {}, {"top_k": 1}, announced=True))
        for beams in (1, 2, 1):
            futures.append(b.submit(spy_cap, x, {"num_beams": beams, "max_length": 4, "length_penalty": 0.6}, {},
                                    announced=True))
        results = [f.result(timeout=60) for f in futures]
    finally:
        b.stop()
    # classify 3 + 1 (max_batch), caption beams 1 twice together, beams 2 alone
    assert sorted(seen) == sorted([("classify", 3, None), ("classify", 1, None), ("caption", 2, 1),
                                   ("caption", 1, 2)])
    assert b.batch_sizes == {3: 1, 1: 2, 2: 1}
    assert all(r == results[0] for r in results[:4])
    with pytest.raises(RuntimeError, match="not running"):
        b.submit(spy_cls, x, {}, {})
    full = Batcher(ServeConfig(max_queue=1, max_wait_ms=10_000))
    full.start()
    try:
        full.announce()
        full.announce()  # one more is on its way
        waiting = full.submit(spy_cls, x, {}, {"top_k": 1}, announced=True)  # waits up to 10 s for company
        with pytest.raises(QueueFull, match="max_queue 1"):
            full.submit(spy_cls, x, {}, {"top_k": 1})
    finally:
        full.stop()
    assert waiting.result(timeout=30) == results[0]  # stopping runs what is waiting instead of dropping it
    # with nothing announced a lone request does not wait for max_wait_ms
    lone = Batcher(ServeConfig(max_wait_ms=10_000))
    lone.start()
    try:
        t0 = time.monotonic()
        assert lone.submit(spy_cls, x, {}, {"top_k": 1}).result(timeout=30) == results[0]
        assert time.monotonic() - t0 < 5
    finally:
        lone.stop()


def test_load_pipelines_errors(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_pipelines([tmp_path / "missing.safetensors"])
    with pytest.raises(ValueError, match="two checkpoints serve 'classify'"):
        load_pipelines([checkpoints["classify"], checkpoints["classify"]])
    with pytest.raises(ValueError, match="--model"):
        load_pipelines([checkpoints["classify"], checkpoints["vqa"]], model="beit3_tiny_patch16_224_vqav2")
    with pytest.raises(ValueError, match="max_batch"):
        ServeConfig(max_batch=0)


# ============================================================================================= a real server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "imglish.cli.main", "serve", "--port", str(port), "--device", "cpu",
           "--max-batch", "8", "--max-wait-ms", "40", "--max-upload-mb", "1"]
    for k in ("classify", "vqa", "nlvr2", "retrieval"):
        cmd += ["--checkpoint", str(checkpoints[k])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"imglish serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"imglish serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_real_server_200_requests_from_16_clients(server, expected, images):
    url, proc, log = server
    kinds = ["classify", "vqa", "nlvr2", "zeroshot", "embed_image", "embed_text"]
    jobs = [(kinds[n % len(kinds)], (n // len(kinds)) % len(images)) for n in range(200)]

    def one(job):
        kind, i = job
        path, files, form = _request(kind, i, images)
        with httpx.Client(timeout=120) as c:
            r = c.post(url + path, files=files or None, data=form)
        return job, r.status_code, r.json()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, jobs))
    wrong = [(job, status, body) for job, status, body in answers
             if status != 200 or not _close(body, _want(expected, *job))]
    assert not wrong, wrong[:3]
    health = httpx.get(url + "/health").json()
    sizes = {int(k): v for k, v in health["batch_sizes"].items()}
    assert sum(k * v for k, v in sizes.items()) >= 200
    assert max(sizes) > 1, sizes  # requests were batched
    logged = [line for line in log.read_text().splitlines() if "batch task=" in line]
    assert any(int(line.split("size=")[1].split()[0]) > 1 for line in logged)


def test_real_server_bad_uploads_are_4xx_and_it_keeps_serving(server, bad_files, images):
    url, proc, _ = server
    with httpx.Client(timeout=60) as c:
        for what, (path, files, form) in _bad_uploads(bad_files).items():
            r = c.post(url + path, files=files or None, data=form)
            assert r.status_code == BAD_STATUS[what], (what, r.text)
            assert r.json()["error"]
        r = c.post(url + "/v1/classify", content=b"", headers={"content-type": "multipart/form-data; boundary=x"})
        assert 400 <= r.status_code < 500, r.text
        r = c.post(url + "/v1/classify", files={"image": ("big.png", os.urandom(1100 * 1024))})
        assert r.status_code == 413 and "max_upload_bytes" in r.json()["error"]
        r = c.post(url + "/v1/caption", files={"image": ("a.png", images[0].read_bytes())})
        assert r.status_code == 404 and "captioning" in r.json()["error"]
        assert c.post(url + "/v1/classify", files={"image": ("a.png", images[0].read_bytes())}).status_code == 200
    assert proc.poll() is None
    assert "500" not in httpx.get(url + "/health").json()["status_codes"]


def test_serve_cli_refuses_bad_checkpoints(checkpoints, tmp_path, capsys):
    from imglish.cli.main import main

    assert main(["serve", "--checkpoint", str(tmp_path / "none.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "none.safetensors" in err and "Traceback" not in err
    not_ckpt = tmp_path / "notes.safetensors"
    not_ckpt.write_text("hello")
    assert main(["serve", "--checkpoint", str(not_ckpt)]) == 2
    assert "cannot be read" in capsys.readouterr().err
