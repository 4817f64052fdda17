"""onnxruntime against PyTorch eager for every part ``imglish export`` writes: latency at batch 1 and throughput
at a larger batch, float32 on the CPU, the same inputs on both sides.

Models are random-weight base-size models at their registered resolution (the speed does not depend on the
weights): the retrieval towers at 384 pixels and 64 text tokens (the shapes community exports use), classification
and NLVR2 at 224, VQA at 384 with 32 question tokens, captioning at 224 (the encoder call on BOS + [MASK], one
decoder step against a cache of the image and 16 words, and a whole greedy caption of 20 tokens decoded with
:func:`imglish.export.onnx.onnx_greedy_search` against :func:`imglish.generation.greedy_search`). Each part is
exported (and verified within 1e-4) first; then the two sides alternate, ``--repeats`` timed runs each after a
warm-up, and the median is reported. torch and onnxruntime get the same number of threads.

Writes ``OUT/results.json`` (every timed run, the host, the export times) and ``OUT/results.md`` (the table quoted in
docs/deployment.md).

Example (the figures in docs/deployment.md):
    python benchmarks/onnx_vs_eager.py --threads 2 --out benchmarks/results/onnx
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_throughput import cpu_model, has_amx  # noqa: E402

#: (label, registered model, part, text length or cached words)
CASES = [
    ("retrieval image 384", "beit3_base_patch16_384_retrieval", "image_encoder", 0),
    ("retrieval text 64", "beit3_base_patch16_384_retrieval", "text_encoder", 64),
    ("classification 224", "beit3_base_patch16_224_imageclassification", "model", 0),
    ("VQA 384, question 32", "beit3_base_patch16_384_vqav2", "model", 32),
    ("NLVR2 224, text 32", "beit3_base_patch16_224_nlvr2", "model", 32),
    ("captioning 224: encoder", "beit3_base_patch16_224_captioning", "encoder", 2),
    ("captioning 224: decoder step, 16 words cached", "beit3_base_patch16_224_captioning", "decoder_step", 16),
]


def session(path: Path, threads: int) -> Any:
    from imglish.export.onnx import _session

    return _session(path, threads)


def inputs_for(model: torch.nn.Module, part: str, batch: int, length: int) -> dict[str, torch.Tensor]:
    from imglish.export.onnx import example_inputs

    if part == "decoder_step":  # a cache of the image, BOS and `length` words; the step feeds [word, MASK]
        return example_inputs(model, part, batch=batch, past_len=1 + length, seed=0)
    if part == "encoder":
        return example_inputs(model, part, batch=batch, seed=0)  # 2 text tokens: BOS, [MASK]
    return example_inputs(model, part, batch=batch, text_len=max(length, 2), seed=0)


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(eager: Any, onnx: Any, repeats: int) -> dict[str, Any]:
    """Warm both up, then alternate them (eager, onnx, onnx, eager, ...); seconds per run of each."""
    eager(), onnx()
    runs: dict[str, list[float]] = {"eager": [], "onnx": []}
    for r in range(repeats):
        order = ("eager", "onnx") if r % 2 == 0 else ("onnx", "eager")
        for side in order:
            runs[side].append(timed(eager if side == "eager" else onnx))
    return {side: {"median_s": statistics.median(v), "runs_s": v} for side, v in runs.items()}


def measure_case(label: str, name: str, part: str, length: int, folder: Path, args: argparse.Namespace,
                 models: dict[str, torch.nn.Module]) -> dict[str, Any]:
    import imglish
    from imglish.export import export_onnx
    from imglish.export.onnx import _wrap

    if name not in models:
        torch.manual_seed(0)
        models[name] = imglish.create_model(name).eval()
    model = models[name]
    start = time.perf_counter()
    result = export_onnx(model, part, folder / f"{name}.{part}.onnx", verify=not args.no_verify)
    export_s = time.perf_counter() - start
    wrapper, _ = _wrap(model, part)
    sess = session(result.path, args.threads)
    row: dict[str, Any] = {"case": label, "model": name, "part": part, "export_s": export_s,
                           "max_abs_diff": result.max_abs_diff, "batches": {}}
    for batch in (1, args.batch):
        inputs = inputs_for(model, part, batch, length)
        feed = {k: v.numpy() for k, v in inputs.items()}

        def eager(inputs: dict[str, torch.Tensor] = inputs) -> None:
            with torch.inference_mode():
                wrapper(**inputs)

        def onnx(feed: dict[str, Any] = feed) -> None:
            sess.run(None, feed)

        timing = compare(eager, onnx, args.repeats)
        row["batches"][str(batch)] = timing
        print(f"  {label} batch {batch}: eager {timing['eager']['median_s'] * 1e3:.1f} ms, onnxruntime "
              f"{timing['onnx']['median_s'] * 1e3:.1f} ms", flush=True)
    return row


def measure_caption(folder: Path, args: argparse.Namespace, models: dict[str, torch.nn.Module]) -> dict[str, Any]:
    """A whole greedy caption of 20 tokens on both sides (eos disabled so that both decode every step)."""
    from imglish.export.onnx import onnx_greedy_search
    from imglish.generation import GenerationConfig, greedy_search

    name = "beit3_base_patch16_224_captioning"
    model = models[name]
    enc, dec = (session(folder / f"{name}.{part}.onnx", args.threads) for part in ("encoder", "decoder_step"))
    cfg = GenerationConfig(max_len=20, num_beams=1, eos_token_id=-1)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    same = bool((onnx_greedy_search(enc, dec, image, cfg) == greedy_search(model, image, cfg).numpy()).all())

    def eager() -> None:
        with torch.inference_mode():
            greedy_search(model, image, cfg)

    timing = compare(eager, lambda: onnx_greedy_search(enc, dec, image, cfg), max(3, args.repeats // 2))
    print(f"  greedy caption of 20 tokens: eager {timing['eager']['median_s'] * 1e3:.0f} ms, onnxruntime "
          f"{timing['onnx']['median_s'] * 1e3:.0f} ms, same tokens: {same}", flush=True)
    return {"case": "captioning 224: greedy caption, 20 tokens", "model": name, "part": "encoder+decoder_step",
            "same_tokens": same, "batches": {"1": timing}}


def markdown(doc: dict[str, Any]) -> str:
    h = doc["host"]
    lines = [
        f"onnxruntime {h['onnxruntime']} against PyTorch {h['torch']} eager, float32, {h['threads']} thread(s) each; "
        f"{h['cpu']} ({'AMX' if h['amx_bf16'] else 'no AMX'}), load average {h['load_average_before'][0]:.2f} "
        f"before, {h['load_average_after'][0]:.2f} after. Medians of {h['repeats']} alternating runs.",
        "",
        f"| part | eager, batch 1 (ms) | onnxruntime, batch 1 (ms) | ratio | eager, batch {h['batch']} (items/s) "
        f"| onnxruntime, batch {h['batch']} (items/s) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in doc["rows"]:
        one = row["batches"]["1"]
        e1, o1 = one["eager"]["median_s"], one["onnx"]["median_s"]
        cells = [row["case"], f"{e1 * 1e3:.1f}", f"{o1 * 1e3:.1f}", f"{e1 / o1:.2f}x"]
        big = row["batches"].get(str(h["batch"]))
        if big:
            eb, ob = big["eager"]["median_s"], big["onnx"]["median_s"]
            cells += [f"{h['batch'] / eb:.1f}", f"{h['batch'] / ob:.1f}", f"{eb / ob:.2f}x"]
        else:
            cells += ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "ratio: eager time / onnxruntime time (above 1: onnxruntime is faster). Export time and the "
              "largest |onnx - torch| per part are in results.json."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/onnx"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="the throughput batch (default 8)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", default=None, help="comma-separated substrings of the case labels to run")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check after export")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    host = {"cpu": cpu_model(), "amx_bf16": has_amx(), "cores": os.cpu_count(), "threads": args.threads,
            "torch": torch.__version__, "onnxruntime": ort.__version__, "python": sys.version.split()[0],
            "batch": args.batch, "repeats": args.repeats, "load_average_before": list(os.getloadavg())}
    cases = [c for c in CASES if args.only is None or any(s in c[0] for s in args.only.split(","))]
    rows: list[dict[str, Any]] = []
    models: dict[str, torch.nn.Module] = {}
    with tempfile.TemporaryDirectory(prefix="imglish-onnx-bench-") as tmp:
        for i, (label, name, part, length) in enumerate(cases):
            print(f"{label}: exporting {name} part {part}", flush=True)
            rows.append(measure_case(label, name, part, length, Path(tmp), args, models))
            if part == "decoder_step" and (Path(tmp) / f"{name}.encoder.onnx").exists():
                rows.append(measure_caption(Path(tmp), args, models))
            if all(later[1] != name for later in cases[i + 1:]):
                del models[name]  # no later case uses it
    host["load_average_after"] = list(os.getloadavg())
    doc = {"benchmark": "onnx_vs_eager", "host": host, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
