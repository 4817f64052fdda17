"""imglish against the official BEiT-3 backbone (torchscale 0.3.0) on a GPU, fp32 and bf16, in one command.

The GPU counterpart of `official_vs_imglish.py`, whose models, workloads, inputs, heads, losses, steps, FLOP
count and agreement check it imports (nothing is copied). What it adds is what a GPU run needs:

- inputs and models on `--device`, larger batches, CUDA-synchronised timing (warm-up, ABBA order, medians);
- three precisions: fp32 with TF32 off (IEEE float32 matmuls and convolutions), bf16 autocast over fp32
  weights, and, for inference, bf16 weights (the model cast with `.to(torch.bfloat16)`); fused AdamW on both
  sides;
- MFU against a measured matmul peak (square `torch.mm`, best of a few sizes, at the start and the end, the
  higher kept) and, for bf16 on a known device, against its nominal dense bf16 peak;
- peak GPU memory of each implementation in each configuration (`torch.cuda.max_memory_allocated`);
- the agreement of both implementations in fp32 on the device, and the bf16 error against fp32;
- a time budget (`--budget-s`) after which the remaining configurations are skipped and reported as such;
  `results.json` and `results.md` are rewritten after every configuration, so a run cut short keeps its rows.

Run from the repository root (needs the `bench` extra):

    python benchmarks/cuda_bench.py --out benchmarks/results/cuda          # the GPU run, under --budget-s
    python benchmarks/cuda_bench.py --device cpu --size tiny --quick      # smoke test without a GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_vs_imglish import (  # noqa: E402
    IMPLS,
    WORKLOADS,
    Settings,
    Side,
    _atomic_write,
    abba_times,
    adamw_for,
    autocast,
    build_pair,
    check_agreement,
    count_flops,
    machine_info,
    make_batch,
    make_step,
)

#: batches of the GPU run (the CPU benchmark's are 4 / 1 / 8 / 2)
GPU_BATCH = {"image224": 64, "vqa480": 16, "text64": 128, "retrieval384": 32}
#: batches of `--quick` (a smoke test)
QUICK_BATCH = {"image224": 2, "vqa480": 1, "text64": 4, "retrieval384": 2}
#: nominal dense bf16 tensor-core peak in TFLOP/s, by a substring of the device name (first match wins)
NOMINAL_BF16_TFLOPS = {"H200 NVL": 835.0, "H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
                       "A100": 312.0}
#: precisions: the table's name and the dtype whose matmul peak the MFU is measured against
DTYPE_TITLES = {"fp32": "fp32", "bf16": "bf16 autocast", "bf16w": "bf16 weights"}
PEAK_DTYPE = {"fp32": "fp32", "bf16": "bf16", "bf16w": "bf16"}
MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------- helpers
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def nominal_bf16_tflops(name: str) -> float | None:
    """The nominal dense bf16 peak of a device name, None when the name is not in the table."""
    return next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)


def matmul_peak(dtype: str, device: torch.device, quick: bool) -> dict:
    """Best TFLOP/s of a square `torch.mm` of `dtype` on `device` over a few sizes (each timed as a burst of
    calls between two synchronisations, best of three bursts)."""
    if device.type == "cuda":
        sizes = (4096, 8192) if dtype == "fp32" or quick else (4096, 8192, 16384)
        calls = 10
    else:
        sizes, calls = (256, 512), 3
    best: dict[int, float] = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=MATMUL_DTYPES[dtype])
        b = torch.randn(n, n, device=device, dtype=MATMUL_DTYPES[dtype])
        out = torch.mm(a, b)
        for _ in range(3):
            torch.mm(a, b, out=out)
        seconds = []
        for _ in range(3):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                torch.mm(a, b, out=out)
            synchronize(device)
            seconds.append((time.perf_counter() - start) / calls)
        best[n] = 2 * n**3 / min(seconds) / 1e12
        del a, b, out
    return {"tflops": max(best.values()), "by_size": best}


def device_info(device: torch.device, threads: int) -> dict:
    """What the report's header names: the device, torch, CUDA and torchscale versions."""
    info = machine_info(Settings(threads=threads))
    out = {"type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
           "torchscale": info["versions"]["torchscale"], "python": info["versions"]["python"],
           "cpu": info["cpu"], "threads": threads}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(name=props.name, memory_gib=props.total_memory / 2**30, sms=props.multi_processor_count,
                   capability=f"sm_{props.major}{props.minor}",
                   flash_sdp=torch.backends.cuda.flash_sdp_enabled(),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   tf32_cudnn=torch.backends.cudnn.allow_tf32)
    else:
        out["name"] = f"CPU ({info['cpu']}, {threads} threads)"
    return out


def to_device(batch: dict[str, Tensor], device: torch.device,
              dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The batch on `device`, its floating-point tensors (the images) cast to `dtype` when given."""
    return {k: v.to(device, dtype=dtype if dtype is not None and v.is_floating_point() else None)
            for k, v in batch.items()}


def repeated(step: Callable[[], None], inner: int, device: torch.device) -> Callable[[], None]:
    """`inner` calls of `step` followed by a synchronisation, so a timed call covers finished GPU work."""

    def run() -> None:
        for _ in range(inner):
            step()
        synchronize(device)

    return run


def pooled(side: Side, batch: dict[str, Tensor], dtype: str, device: torch.device) -> Tensor:
    """The pooled features of every pass, stacked, in float32 (eval mode, autocast for "bf16")."""
    side.eval()
    with torch.no_grad(), autocast("bf16" if dtype == "bf16" else "fp32", str(device)):
        return torch.cat([o.float() for o in side.outputs(batch)], dim=0)


def rel_rms(low: Tensor, ref: Tensor) -> float:
    return float((low - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def resident_bytes(side: Side, step: Callable[[], None]) -> int:
    """Bytes of `side`'s parameters, buffers and optimizer state (what stays on the device between steps)."""
    tensors = [*side.parameters(), *side.buffers()]
    opt = getattr(step, "optimizer", None)
    if opt is not None:
        tensors += [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
    seen, total = set(), 0
    for t in tensors:
        if t.device.type != "cpu" and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def step_memory(sides: dict[str, Side], steps: dict[str, Callable[[], None]], impl: str,
                device: torch.device) -> dict | None:
    """Peak GPU memory of one step of `impl`: its own weights, buffers and optimizer state, plus the most the
    step allocated above what was resident when it began (activations, gradients, workspaces). Both
    implementations live on the device together, so the other one's resident memory is left out. None off
    CUDA."""
    if device.type != "cuda":
        return None
    for side in sides.values():
        side.zero_grad(set_to_none=True)
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    steps[impl]()
    synchronize(device)
    above = torch.cuda.max_memory_allocated(device) - before
    resident = resident_bytes(sides[impl], steps[impl])
    gib = 2**30
    return {"peak_gib": (resident + above) / gib, "resident_gib": resident / gib, "above_gib": above / gib}


# ---------------------------------------------------------------------------------------------------- the run
def configurations(settings: Settings) -> list[tuple[str, str]]:
    """(mode, dtype) in run order: bf16 weights for inference only."""
    return [(m, d) for m in settings.modes for d in settings.dtypes if not (m == "train" and d == "bf16w")]


def run_workload(name: str, settings: Settings, device: torch.device, inner: int, deadline: float,
                 results: dict, save: Callable[[], None], log: Callable[[str], None]) -> None:
    """Every configuration of one workload, appended to `results["rows"]`: measured, skipped (past the
    deadline) or failed (the error recorded, the run goes on)."""
    workload, batch_size = WORKLOADS[name], settings.batch[name]
    todo = configurations(settings)
    if time.perf_counter() >= deadline:
        results["rows"] += [skipped_row(name, batch_size, mode, dtype) for mode, dtype in todo]
        log(f"[{name}] skipped: time budget spent")
        save()
        return
    try:
        pair = {impl: side.to(device) for impl, side in build_pair(settings, workload).items()}
        data = to_device(make_batch(workload, batch_size, settings.seed), device)
        results["agreement"][name] = check_agreement(pair, workload, data)
        reference = {impl: pooled(pair[impl], data, "fp32", device) for impl in IMPLS}
        flops = count_flops(settings, workload, batch_size)
    except Exception as exc:  # noqa: BLE001 - reported, and the other workloads still run
        results["rows"] += [failed_row(name, batch_size, mode, dtype, exc) for mode, dtype in todo]
        log(f"[{name}] failed before timing: {results['rows'][-1]['error']}")
        save()
        return
    log(f"[{name}] batch {batch_size}: fp32 agreement on {device.type}, max |imglish - official| = "
        f"{results['agreement'][name]['max_abs_diff']:.2e}")
    for mode, dtype in todo:
        if time.perf_counter() >= deadline:
            results["rows"].append(skipped_row(name, batch_size, mode, dtype))
            log(f"[{name}] {mode} {DTYPE_TITLES[dtype]}: skipped (time budget)")
        else:
            try:
                row = run_configuration(pair, data, reference, flops, name, mode, dtype, settings, device,
                                        inner, results)
                log(describe(row, results))
            except Exception as exc:  # noqa: BLE001 - reported, and the next configuration still runs
                row = failed_row(name, batch_size, mode, dtype, exc)
                log(f"[{name}] {mode} {DTYPE_TITLES[dtype]}: failed: {row['error']}")
            results["rows"].append(row)
            for side in pair.values():
                side.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        save()


def run_configuration(pair: dict[str, Side], data: dict[str, Tensor], reference: dict[str, Tensor],
                      flops: dict[str, float], name: str, mode: str, dtype: str, settings: Settings,
                      device: torch.device, inner: int, results: dict) -> dict:
    """Time one (mode, dtype) of both implementations (ABBA), measure their memory and, for bf16 inference,
    the error against the fp32 `reference`; the row of the table."""
    batch_size = settings.batch[name]
    sides, batch = pair, data
    if dtype == "bf16w":
        sides = {impl: copy.deepcopy(side).to(torch.bfloat16) for impl, side in pair.items()}
        batch = to_device(data, device, torch.bfloat16)
    step_dtype = "bf16" if dtype == "bf16" else "fp32"  # bf16 weights: no autocast, the model is bf16
    steps = {impl: make_step(sides[impl], mode, step_dtype, batch, settings.fused_adamw,
                             adamw_for(settings, impl), device=str(device)) for impl in IMPLS}
    try:
        times = abba_times({impl: repeated(steps[impl], inner, device) for impl in IMPLS},
                           settings.warmup, settings.repeats)
        row = {"workload": name, "batch": batch_size, "mode": mode, "dtype": dtype, "inner": inner,
               "flops": flops[mode], "times": {impl: [t / inner for t in times[impl]] for impl in IMPLS}}
        for impl in IMPLS:
            med = statistics.median(row["times"][impl])
            row[impl] = {"median_s": med, "best_s": min(row["times"][impl]),
                         "samples_per_s": batch_size / med, "tflops": flops[mode] / med / 1e12,
                         "memory": step_memory(sides, steps, impl, device)}
        row["speedup"] = row["official"]["median_s"] / row["imglish"]["median_s"]
        if mode == "forward" and dtype != "fp32":
            results["bf16_error"].setdefault(name, {})[dtype] = {
                impl: rel_rms(pooled(sides[impl], batch, dtype, device), reference[impl]) for impl in IMPLS}
        return row
    finally:
        for step in steps.values():  # OptimizerInBackward hooks must not outlive their step
            getattr(getattr(step, "optimizer", None), "remove_hooks", lambda: None)()


def failed_row(name: str, batch: int, mode: str, dtype: str, exc: Exception) -> dict:
    """A configuration that raised: the error's first line for the table, the traceback's end for the JSON."""
    return {"workload": name, "batch": batch, "mode": mode, "dtype": dtype,
            "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
            "traceback": traceback.format_exc()[-3000:]}


def skipped_row(name: str, batch: int, mode: str, dtype: str) -> dict:
    return {"workload": name, "batch": batch, "mode": mode, "dtype": dtype, "skipped": "time budget"}


def mfu(row: dict, impl: str, results: dict) -> float:
    """Model-FLOPs utilisation of `impl` in `row` against the measured matmul peak of the row's dtype."""
    return row[impl]["tflops"] / results["peak"][PEAK_DTYPE[row["dtype"]]]["tflops"]


def describe(row: dict, results: dict) -> str:
    mem = [row[i]["memory"] for i in IMPLS]
    memory = "" if None in mem else f", peak {mem[0]['peak_gib']:.2f} / {mem[1]['peak_gib']:.2f} GiB"
    sides = [f"{impl} {1e3 * row[impl]['median_s']:.2f} ms (MFU {100 * mfu(row, impl, results):.0f}%)"
             for impl in IMPLS]
    return (f"[{row['workload']}] {row['mode']:7s} {DTYPE_TITLES[row['dtype']]:13s}: {sides[0]}, {sides[1]}, "
            f"speedup {row['speedup']:.2f}x{memory}")


# ------------------------------------------------------------------------------------------------- reporting
def render_markdown(results: dict) -> str:
    """The header line, the table and the peak, agreement and bf16-error lines."""
    d, s = results["device"], results["settings"]
    depth = "" if s["depth"] is None else f" (depth {s['depth']})"
    gpu = f" ({d['memory_gib']:.0f} GiB, {d['sms']} SMs, {d['capability']})" if d["type"] == "cuda" else ""
    cuda = f"CUDA {d['cuda']}" if d["type"] == "cuda" else f"no CUDA device (torch built for {d['cuda']})"
    precisions = {"fp32": "fp32" + (" with TF32 off (IEEE float32 matmuls and convolutions)" if gpu else ""),
                  "bf16": "bf16 autocast over fp32 weights",
                  "bf16w": "bf16 weights (`.to(torch.bfloat16)`, inference only)"}
    lines = [
        f"Measured {results['date']} on {d['name']}{gpu}, torch {d['torch']}, {cuda}, torchscale "
        f"{d['torchscale']}. Model {s['size']}{depth}; " + ", ".join(precisions[p] for p in s["dtypes"])
        + f"; AdamW(fused={s['fused_adamw']}) on both sides; {s['warmup']} warm-up and {s['repeats']} timed "
        f"calls of {results['inner']} step(s) per implementation, alternating (ABBA), synchronised; medians.",
        "",
        "| workload | batch | mode | dtype | imglish samples/s | official samples/s | speedup | "
        "imglish MFU | official MFU | peak memory imglish/official |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    nominal = results.get("nominal_bf16_tflops")
    for r in results["rows"]:
        title = WORKLOADS[r["workload"]].title
        head = f"| {title} | {r['batch']} | {r['mode']} | {DTYPE_TITLES[r['dtype']]} |"
        if r.get("skipped") or r.get("error"):
            error = r.get("error", "").replace("|", "/")
            why = f"skipped ({r['skipped']})" if r.get("skipped") else f"failed: {error}"
            lines.append(f"{head} {why} | | | | | |")
            continue
        cells = []
        for impl in IMPLS:
            text = f"{100 * mfu(r, impl, results):.0f}%"
            if nominal and PEAK_DTYPE[r["dtype"]] == "bf16":
                text += f" ({100 * r[impl]['tflops'] / nominal:.0f}% of nominal)"
            cells.append(text)
        mem = [r[i]["memory"] for i in IMPLS]
        memory = "n/a" if None in mem else f"{mem[0]['peak_gib']:.2f} / {mem[1]['peak_gib']:.2f} GiB"
        lines.append(f"{head} {r['imglish']['samples_per_s']:,.1f} | {r['official']['samples_per_s']:,.1f} | "
                     f"**{r['speedup']:.2f}x** | {cells[0]} | {cells[1]} | {memory} |")
    peak = results["peak"]
    line = ("Matmul peak measured on the device (square `torch.mm`, best of sizes): "
            + "; ".join(f"{k} **{v['tflops']:.1f} TFLOP/s** (sizes {', '.join(str(n) for n in v['by_size'])})"
                        for k, v in peak.items()) + ". MFU is against the measured peak of the row's dtype")
    if nominal:
        line += f"; bf16 rows also against the nominal dense bf16 peak of this device, {nominal:.0f} TFLOP/s"
    lines += ["", line + ". FLOPs: `count_flops` of `official_vs_imglish.py` (matmuls and the patch "
              "convolution, counted on the meta device; the training count includes backward)."]
    if results["agreement"]:
        diffs = ", ".join(f"{k} {v['max_abs_diff']:.1e} (features up to {v['output_max_abs']:.1f})"
                          for k, v in results["agreement"].items())
        lines += ["", f"Exactness (fp32 on {d['type']}, same weights), max |imglish - official| of the "
                  f"pooled features: {diffs}."]
    if results["bf16_error"]:
        lines += ["", "bf16 against fp32, relative RMS error of the pooled features (imglish / official): "
                  + "; ".join(f"{k} {DTYPE_TITLES[dt]} {e['imglish']:.4f} / {e['official']:.4f}"
                              for k, by in results["bf16_error"].items() for dt, e in by.items()) + "."]
    if any(r.get("error") for r in results["rows"]):
        lines += ["", "Failed rows: the configuration raised; `results.json` keeps the end of its traceback."]
    if any(r.get("skipped") for r in results["rows"]):
        lines += ["", f"Skipped rows: the run's time budget ({results['budget_s']:.0f} s) was spent before "
                  "they began."]
    if d["type"] == "cuda":
        lines += ["", "Peak memory: an implementation's weights, buffers and optimizer state plus the most "
                  "one step allocated above what was resident (`torch.cuda.max_memory_allocated` after "
                  "`reset_peak_memory_stats`); the other implementation's resident memory is left out."]
    for note in results["notes"]:
        lines += ["", note]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke test")
    p.add_argument("--size", default="base", help="model size (imglish SIZES name); default base")
    p.add_argument("--depth", type=int, default=None, help="override the number of layers (for development)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {sorted(WORKLOADS)}")
    p.add_argument("--modes", default="forward,train")
    p.add_argument("--dtypes", default="auto",
                   help="comma list of fp32, bf16 (autocast), bf16w (bf16 weights, inference only); 'auto' "
                        "is all three on CUDA and fp32 on the CPU")
    p.add_argument("--batch", default=None, help="per-workload batch sizes, e.g. image224=32,vqa480=8")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per implementation (default 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per implementation (default 12)")
    p.add_argument("--inner", type=int, default=1, help="steps per timed call")
    p.add_argument("--quick", action="store_true", help="small batches, 1 warm-up, 2 repeats (a smoke test)")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="seconds after which the remaining configurations are skipped (default 270)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cuda")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace, device: torch.device) -> tuple[Settings, list[str]]:
    notes: list[str] = []
    batch = dict(QUICK_BATCH if args.quick else GPU_BATCH)
    for item in (args.batch or "").split(","):
        if not item:
            continue
        key, _, value = item.partition("=")
        if key not in WORKLOADS or not value.isdigit():
            raise SystemExit(f"--batch expects workload=N items, workloads {sorted(WORKLOADS)}; got {item!r}")
        batch[key] = int(value)
    workloads = tuple(w for w in args.workloads.split(",") if w)
    if unknown := [w for w in workloads if w not in WORKLOADS]:
        raise SystemExit(f"unknown workloads {unknown}; expected some of {sorted(WORKLOADS)}")
    modes = tuple(m for m in args.modes.split(",") if m)
    if bad := [m for m in modes if m not in ("forward", "train")]:
        raise SystemExit(f"unknown modes {bad}; expected forward and/or train")
    if args.dtypes == "auto":
        dtypes = tuple(DTYPE_TITLES) if device.type == "cuda" else ("fp32",)
        if device.type != "cuda":
            notes.append("bf16 was not run (`--dtypes auto` on the CPU); `--dtypes fp32,bf16,bf16w` forces "
                         "it.")
    else:
        dtypes = tuple(d for d in args.dtypes.split(",") if d)
        if bad := [d for d in dtypes if d not in DTYPE_TITLES]:
            raise SystemExit(f"unknown dtypes {bad}; expected some of {list(DTYPE_TITLES)}")
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 12)
    settings = Settings(size=args.size, depth=args.depth, threads=torch.get_num_threads(), batch=batch,
                        warmup=warmup, repeats=repeats, modes=modes, dtypes=dtypes, workloads=workloads,
                        memory=False, fused_adamw=True)
    return settings, notes


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here (torch {torch.__version__}, "
                         f"built for CUDA {torch.version.cuda}); for a smoke test use --device cpu --size "
                         "tiny --quick")
    if device.type not in ("cuda", "cpu"):
        raise SystemExit(f"--device {args.device}: expected cuda, cuda:N or cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are IEEE float32
        torch.backends.cudnn.allow_tf32 = False
    settings, notes = settings_from_args(args, device)
    deadline = start + args.budget_s

    def log(msg: str) -> None:
        print(msg, flush=True)

    command = " ".join(["benchmarks/cuda_bench.py", *(argv if argv is not None else sys.argv[1:])])
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": command,
                     "device": device_info(device, settings.threads), "settings": asdict(settings),
                     "inner": args.inner, "budget_s": args.budget_s, "notes": notes, "rows": [],
                     "agreement": {}, "bf16_error": {}, "complete": False}
    name = results["device"]["name"]
    results["nominal_bf16_tflops"] = nominal_bf16_tflops(name) if device.type == "cuda" else None
    peak_dtypes = ("fp32", "bf16") if any(PEAK_DTYPE[d] == "bf16" for d in settings.dtypes) else ("fp32",)
    results["peak"] = {d: matmul_peak(d, device, args.quick) for d in peak_dtypes}
    log(f"device: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}; matmul peak: "
        + ", ".join(f"{d} {p['tflops']:.2f} TFLOP/s" for d, p in results["peak"].items())
        + (f"; nominal dense bf16 {results['nominal_bf16_tflops']:.0f} TFLOP/s"
           if results["nominal_bf16_tflops"] else ""))

    out: Path = args.out

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - start
        _atomic_write(out / "results.json", json.dumps(results, indent=1, default=str))
        _atomic_write(out / "results.md", render_markdown(results))

    for workload in settings.workloads:
        run_workload(workload, settings, device, args.inner, deadline, results, save, log)
    if time.perf_counter() < deadline:  # a second peak measurement; a busy or cold device only lowers it
        for dtype in peak_dtypes:
            again = matmul_peak(dtype, device, args.quick)
            if again["tflops"] > results["peak"][dtype]["tflops"]:
                results["peak"][dtype] = again
    results["complete"] = True
    save()
    done = sum(1 for r in results["rows"] if not r.get("skipped") and not r.get("error"))
    log(f"{done} of {len(results['rows'])} configurations run in {time.perf_counter() - start:.0f} s; wrote "
        f"{out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
