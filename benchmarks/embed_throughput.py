"""Throughput of ``imglish embed``: images/s and texts/s through :func:`imglish.inference.embed.embed`.

Everything is made here, nothing is downloaded: a random-weight retrieval model (saved with its Processor, as
``imglish finetune`` saves one) with a small SentencePiece tokenizer trained on generated text, a folder of
generated JPEGs (smooth colour fields with noise, 640x480, decoded and resized to the model's resolution by the
pipeline's transform) and a ``.txt`` of generated sentences. Each configuration (model, precision, batch size,
DataLoader workers) runs the whole command path: index, workers decoding and transforming, batched forward, parts
on disk and the final safetensors file. The time is the embedding loop only (``EmbedSummary.seconds``: after the
model is loaded and the inputs are listed); the best of ``--repeats`` runs is reported.

Writes ``OUT/results.json`` (every run, the host) and ``OUT/results.md`` (one table).

Example (the figures in docs/inference.md):
    OMP_NUM_THREADS=1 python benchmarks/embed_throughput.py --threads 1 --out benchmarks/results/embed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

WORDS = ["a", "photo", "of", "the", "red", "blue", "green", "small", "large", "dog", "cat", "ball", "cube", "circle", "square", "on", "under", "next", "to", "two", "three", "people", "sitting", "standing", "street", "table", "bowl", "plate", "with", "some", "man", "woman", "child", "holding", "riding", "bike", "car"]


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def has_amx() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def make_images(folder: Path, n: int, size: tuple[int, int] = (640, 480)) -> None:
    """``n`` JPEGs: a smooth random colour field plus noise (so that they compress like photos, not like noise)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        c = rng.uniform(0, 1, size=(3, 3))
        field = np.stack([c[k, 0] * xx / w + c[k, 1] * yy / h + c[k, 2] for k in range(3)], -1)
        img = np.clip(field / field.max() * 230 + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=90)


def make_texts(path: Path, n: int) -> None:
    rng = np.random.default_rng(1)
    path.write_text("\n".join(" ".join(rng.choice(WORDS, size=int(rng.integers(6, 20)))) for _ in range(n)) + "\n")


def make_checkpoint(root: Path, name: str, tokenizer: Any) -> Path:
    import imglish
    from imglish.tokenizers.processor import Processor
    from imglish.tokenizers.transforms import TransformConfig

    torch.manual_seed(0)
    model = imglish.create_model(name, vocab_size=len(tokenizer))
    size = model.config.img_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    proc = Processor(tokenizer, TransformConfig.for_task("retrieval", size), max_length=64)
    return imglish.save_model(model.eval(), root / name / "model.safetensors", processor=proc)


def run_one(ckpt: Path, kind: str, source: Path, out: Path, *, batch: int, workers: int, precision: str) -> float:
    from imglish.inference.embed import embed

    if out.exists():
        out.unlink()
    kw = {"images": source} if kind == "image" else {"texts": source}
    s = embed(ckpt, out=out, batch_size=batch, num_workers=workers, device="cpu", precision=precision, **kw)
    if s.skipped:
        raise RuntimeError(f"unexpected skipped inputs: {s.skipped_line()}")
    return s.count / s.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["beit3_tiny_patch16_224_retrieval"])
    ap.add_argument("--images", type=int, default=256, help="generated JPEGs (default 256)")
    ap.add_argument("--texts", type=int, default=1024, help="generated text lines (default 1024)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=2, help="runs per configuration; the best is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the main process")
    ap.add_argument("--out", default="benchmarks/results/embed")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from imglish.tokenizers.text import TextTokenizer, train_sentencepiece

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    host = {"cpu": cpu_model(), "amx_bf16": has_amx(), "cores": os.cpu_count(), "threads": args.threads,
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_before": list(os.getloadavg())}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="embed_bench_") as tmp:
        root = Path(tmp)
        make_images(root / "images", args.images)
        make_texts(root / "texts.txt", args.texts)
        tok = TextTokenizer(train_sentencepiece([root / "texts.txt"], vocab_size=200, output=root / "spm.model",
                                                model_type="bpe", seed=0))
        for name in args.models:
            ckpt = make_checkpoint(root, name, tok)
            for kind, source, n in (("image", root / "images", args.images), ("text", root / "texts.txt", args.texts)):
                for precision in args.precision:
                    for batch in args.batch:
                        for workers in args.workers:
                            rates = [run_one(ckpt, kind, source, root / "out.safetensors", batch=batch,
                                             workers=workers, precision=precision) for _ in range(args.repeats)]
                            row = {"model": name, "kind": kind, "inputs": n, "precision": precision, "batch": batch,
                                   "workers": workers, "per_s": max(rates), "runs_per_s": rates}
                            rows.append(row)
                            print(f"{name} {kind:5s} {precision} batch {batch:3d} workers {workers}: "
                                  f"{row['per_s']:8.1f}/s  (runs {', '.join(f'{r:.1f}' for r in rates)})", flush=True)
    host["load_average_after"] = list(os.getloadavg())
    doc = {"command": "python benchmarks/embed_throughput.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()),
        "host": host, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out_dir / "results.md").write_text(markdown(doc))
    print(markdown(doc))


def markdown(doc: dict[str, Any]) -> str:
    h = doc["host"]
    lines = [f"CPU: {h['cpu']} ({h['cores']} cores; AMX bf16: {'yes' if h['amx_bf16'] else 'no'}), torch {h['torch']}, "
             f"{h['threads']} intra-op thread(s); load average before {h['load_average_before'][0]:.2f}. "
             "Best of the runs, inputs per second of the embedding loop.", "",
             "| model | input | precision | batch | workers | inputs/s |", "|---|---|---|---:|---:|---:|"]
    for r in doc["rows"]:
        short = r["model"].replace("beit3_", "").replace("_retrieval", "")
        lines.append(f"| {short} | {r['inputs']} {r['kind']}s | {r['precision']} | {r['batch']} | {r['workers']} | "
                     f"{r['per_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
