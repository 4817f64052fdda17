"""bf16 inference three ways at base size: float32, bfloat16 autocast over float32 weights (what training uses), and
bfloat16 weights (what imglish pipelines use since the weights are cast once), optionally each also under
``torch.compile`` (inductor). Forward only, ``inference_mode``, random weights; the accuracy columns compare the
retrieval model's L2-normalised embeddings with float32 ones (lowest cosine over the batch).

Writes ``OUT/results.json`` and ``OUT/results.md``.

Example (the figures in docs/benchmarks.md):
    python benchmarks/bf16_inference.py --threads 2 --compile --out benchmarks/results/bf16_inference
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_throughput import cpu_model, has_amx  # noqa: E402

import imglish  # noqa: E402


def median_time(fn: Any, repeats: int) -> float:
    fn()
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def variants(name: str) -> dict[str, tuple[torch.nn.Module, torch.dtype, Any]]:
    """mode -> (model, input dtype, context)."""
    torch.manual_seed(0)
    fp32 = imglish.create_model(name).eval()
    bf16 = imglish.create_model(name).eval()
    bf16.load_state_dict(fp32.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    return {
        "fp32": (fp32, torch.float32, contextlib.nullcontext),
        "bf16 autocast": (fp32, torch.float32, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
        "bf16 weights": (bf16, torch.bfloat16, contextlib.nullcontext),
    }


def run_forward(model: torch.nn.Module, x: torch.Tensor, ctx: Any, compiled: bool) -> Any:
    fn = torch.compile(model) if compiled else model

    def forward() -> Any:
        with torch.inference_mode(), ctx():
            return fn(image=x)

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bf16_inference"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (inductor) of each mode")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    host = {"cpu": cpu_model(), "amx_bf16": has_amx(), "threads": args.threads, "torch": torch.__version__,
            "load_average_before": list(os.getloadavg())}
    rows = []
    models = variants("beit3_base_patch16_224_imageclassification")
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        for mode, (model, dtype, ctx) in models.items():
            for compiled in ((False, True) if args.compile else (False,)):
                torch._dynamo.reset()
                fn = run_forward(model, x.to(dtype), ctx, compiled)
                start = time.perf_counter()
                fn()  # the first call compiles
                first = time.perf_counter() - start
                seconds = median_time(fn, args.repeats if batch == 1 else max(3, args.repeats // 2))
                rows.append({"batch": batch, "mode": mode, "compiled": compiled, "seconds": seconds,
                             "first_call_s": first})
                print(f"batch {batch} {mode}{' compiled' if compiled else ''}: {seconds * 1e3:.1f} ms "
                      f"(first call {first:.1f} s)", flush=True)
    # accuracy of the embeddings against float32
    accuracy = {}
    ret = variants("beit3_base_patch16_224_retrieval")
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(4, 60000, (4, 32), generator=torch.Generator().manual_seed(0))
    pad = torch.zeros(4, 32, dtype=torch.long)
    pad[2:, 20:] = 1
    embeds = {}
    for mode, (model, dtype, ctx) in ret.items():
        with torch.inference_mode(), ctx():
            embeds[mode] = (model.encode_image(x.to(dtype)).float(), model.encode_text(ids, pad).float())
    for mode in ("bf16 autocast", "bf16 weights"):
        accuracy[mode] = {
            kind: float(torch.nn.functional.cosine_similarity(embeds[mode][i], embeds["fp32"][i]).min())
            for i, kind in enumerate(("image", "text"))
        }
    host["load_average_after"] = list(os.getloadavg())
    doc = {"benchmark": "bf16_inference", "host": host, "rows": rows, "min_cosine_to_fp32": accuracy}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(doc))
    print(markdown(doc))


def markdown(doc: dict[str, Any]) -> str:
    h = doc["host"]
    compiled = any(r["compiled"] for r in doc["rows"])
    head = "| batch | mode | eager (ms) | speedup over fp32 |" + (" compiled (ms) | compile speedup |" if compiled else "")
    lines = [f"Base classification model at 224, forward only, {h['threads']} thread(s), {h['cpu']} "
             f"({'AMX' if h['amx_bf16'] else 'no AMX'}), torch {h['torch']}, load average "
             f"{h['load_average_before'][0]:.2f} before.", "", head,
             "|---|---|---:|---:|" + ("---:|---:|" if compiled else "")]
    by = {(r["batch"], r["mode"], r["compiled"]): r["seconds"] for r in doc["rows"]}
    for batch in sorted({r["batch"] for r in doc["rows"]}):
        base = by[(batch, "fp32", False)]
        for mode in ("fp32", "bf16 autocast", "bf16 weights"):
            eager = by[(batch, mode, False)]
            cells = [str(batch), mode, f"{eager * 1e3:.1f}", f"{base / eager:.2f}x"]
            if compiled:
                c = by[(batch, mode, True)]
                cells += [f"{c * 1e3:.1f}", f"{eager / c:.2f}x"]
            lines.append("| " + " | ".join(cells) + " |")
    acc = doc["min_cosine_to_fp32"]
    lines += ["", "Lowest cosine similarity to the float32 embeddings (base retrieval model, 4 images, 4 texts): "
              + "; ".join(f"{m}: image {a['image']:.5f}, text {a['text']:.5f}" for m, a in acc.items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
