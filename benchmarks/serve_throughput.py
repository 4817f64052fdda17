"""Throughput and latency of ``imglish serve``: requests/s and p50/p95 latency against a real uvicorn process, with
and without dynamic batching, for 1 and 16 concurrent clients.

Everything is made here, nothing is downloaded: random-weight tiny models at 224 pixels (an image classifier and a
retrieval model, saved with their Processor as ``imglish finetune`` saves them), a small SentencePiece tokenizer
trained on generated text and generated 640x480 JPEGs (decoded and resized by the server, as a real upload is).
For each setting the server is started as ``python -m imglish.cli.main serve`` on a free loopback port, warmed up,
and sent ``--requests`` requests from ``--clients`` threads (each with its own HTTP connection). The batch sizes are
read from ``GET /health`` afterwards.

Writes ``OUT/results.json`` (every run, the host) and ``OUT/results.md`` (one table).

Example (the figures in docs/inference.md):
    python benchmarks/serve_throughput.py --out benchmarks/results/serve
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_throughput import WORDS, cpu_model, has_amx, make_texts  # noqa: E402

ENDPOINTS = {"classify": "/v1/classify", "embed_text": "/v1/embed/text"}


def make_checkpoint(root: Path, name: str, tokenizer: Any, transform: str, **kw: Any) -> Path:
    import imglish
    from imglish.tokenizers.processor import Processor
    from imglish.tokenizers.transforms import TransformConfig

    torch.manual_seed(0)
    model = imglish.create_model(name, vocab_size=len(tokenizer), **kw)
    proc = Processor(tokenizer, TransformConfig.for_task(transform, 224), max_length=64)
    return imglish.save_model(model.eval(), root / name / "model.safetensors", processor=proc)


def jpegs(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    out = []
    for _ in range(n):
        c = rng.uniform(0, 1, size=(3, 3))
        field = np.stack([c[k, 0] * xx / 640 + c[k, 1] * yy / 480 + c[k, 2] for k in range(3)], -1)
        img = np.clip(field / field.max() * 230 + rng.normal(0, 12, size=(480, 640, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoints: list[Path], max_batch: int, max_wait_ms: float, threads: int, precision: str,
                 log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "imglish.cli.main", "serve", "--port", str(port), "--device", "cpu",
           "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--max-queue", "256",
           "--precision", precision, "--log-level", "warning"]
    for c in checkpoints:
        cmd += ["--checkpoint", str(c)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.3)


def fire(url: str, kind: str, n: int, clients: int, images: list[bytes], texts: list[str]) -> list[float]:
    """Send ``n`` requests from ``clients`` threads; returns the latencies (s). Raises on any non-200."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(n))

    def worker() -> None:
        with httpx.Client(timeout=300) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                if kind == "classify":
                    r = c.post(url + ENDPOINTS[kind], files={"image": ("x.jpg", images[i % len(images)], "image/jpeg")})
                else:
                    r = c.post(url + ENDPOINTS[kind], data={"text": texts[i % len(texts)]})
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                    latencies.append(dt)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200, help="requests per setting (default 200)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-batch", dest="max_batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-wait-ms", dest="max_wait_ms", type=float, default=10.0)
    ap.add_argument("--kinds", nargs="+", default=list(ENDPOINTS), choices=list(ENDPOINTS))
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server process (default 1)")
    ap.add_argument("--out", default="benchmarks/results/serve")
    args = ap.parse_args()

    import httpx

    from imglish.tokenizers.text import TextTokenizer, train_sentencepiece

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    host = {"cpu": cpu_model(), "amx_bf16": has_amx(), "cores": os.cpu_count(), "server_threads": args.threads,
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_before": list(os.getloadavg())}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="serve_bench_") as tmp:
        root = Path(tmp)
        make_texts(root / "texts.txt", 2000)
        texts = (root / "texts.txt").read_text().splitlines()
        tok = TextTokenizer(train_sentencepiece([root / "texts.txt"], vocab_size=200, output=root / "spm.model",
                                                model_type="bpe", seed=0))
        ckpts = [make_checkpoint(root, "beit3_tiny_patch16_224_imageclassification", tok, "imagenet",
                                 num_classes=1000),
                 make_checkpoint(root, "beit3_tiny_patch16_224_retrieval", tok, "retrieval")]
        images = jpegs(32)
        for precision, max_batch in [(p, b) for p in args.precision for b in args.max_batch]:
            proc, url = start_server(ckpts, max_batch, args.max_wait_ms, args.threads, precision,
                                     root / "server.log")
            try:
                for kind in args.kinds:
                    for clients in args.clients:
                        fire(url, kind, 2 * clients + 8, clients, images, texts)  # warm up
                        before = httpx.get(url + "/health").json()["batch_sizes"]
                        t0 = time.perf_counter()
                        lat = fire(url, kind, args.requests, clients, images, texts)
                        wall = time.perf_counter() - t0
                        after = httpx.get(url + "/health").json()["batch_sizes"]
                        sizes = {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
                        lat_ms = sorted(x * 1000 for x in lat)
                        row = {"kind": kind, "precision": precision, "max_batch": max_batch, "max_wait_ms": args.max_wait_ms,
                               "clients": clients, "requests": args.requests, "per_s": args.requests / wall,
                               "p50_ms": statistics.median(lat_ms),
                               "p95_ms": lat_ms[min(len(lat_ms) - 1, int(0.95 * len(lat_ms)))],
                               "mean_batch": sum(k * v for k, v in sizes.items()) / max(1, sum(sizes.values())),
                               "batch_sizes": sizes}
                        rows.append(row)
                        print(f"{kind:10s} {precision} max_batch {max_batch} clients {clients:2d}: {row['per_s']:6.1f} req/s, "
                              f"p50 {row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms, mean batch "
                              f"{row['mean_batch']:.2f}", flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
    host["load_average_after"] = list(os.getloadavg())
    doc = {"command": "python benchmarks/serve_throughput.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()),
        "host": host, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out_dir / "results.md").write_text(markdown(doc))
    print(markdown(doc))


def markdown(doc: dict[str, Any]) -> str:
    h = doc["host"]
    lines = [f"CPU: {h['cpu']} ({h['cores']} cores; AMX bf16: {'yes' if h['amx_bf16'] else 'no'}), torch {h['torch']}, "
             f"server with {h['server_threads']} torch thread(s), clients in the same machine; load average before "
             f"{h['load_average_before'][0]:.2f}. Tiny models (224 px); classify requests upload a 640x480 JPEG.",
             "",
             "| endpoint | precision | max batch | clients | requests/s | p50 ms | p95 ms | mean batch |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        lines.append(f"| {ENDPOINTS[r['kind']]} | {r['precision']} | {r['max_batch']} | {r['clients']} | {r['per_s']:.1f} | "
                     f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['mean_batch']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
