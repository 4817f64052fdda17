"""imglish eager against imglish under `torch.compile` (and the official code), one configuration, one process.

Built on `official_vs_imglish.py` (same models, weights, batches, steps): the compiled side is a copy of imglish's
with its loss (training) or inference pass wrapped in `torch.compile` (inductor). All three run alternately
(ABBA-style order, reversed every repeat) after a warm-up that also compiles; medians are printed.

    python benchmarks/compile_vs_eager.py --workload image224 --mode forward --dtype bf16 --batch 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official_vs_imglish as bench


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench.add_config_args(p)
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args(argv)
    _, _, pair, data = bench.build_config_pair(args)
    compiled = copy.deepcopy(pair["imglish"])
    compiled.loss, compiled.infer = torch.compile(compiled.loss), torch.compile(compiled.infer)
    sides = {"official": pair["official"], "imglish": pair["imglish"], "imglish compiled": compiled}
    steps = {k: bench.make_step(side, args.mode, args.dtype, data, True) for k, side in sides.items()}
    start = time.perf_counter()
    for step in steps.values():  # warm-up; the compiled side compiles here
        step()
        step()
    print(f"warm-up (with compilation): {time.perf_counter() - start:.0f} s", flush=True)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.repeats):
        for k in (list(steps) if r % 2 == 0 else list(reversed(steps))):
            t = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.workload} {args.mode} {args.dtype} batch {args.batch}, {args.threads} threads, medians of "
          f"{args.repeats}: " + ", ".join(f"{k} {v:.3f} s" for k, v in med.items()))
    print(f"compiled / eager imglish: {med['imglish'] / med['imglish compiled']:.2f}x; against the official: "
          f"eager {med['official'] / med['imglish']:.2f}x, compiled {med['official'] / med['imglish compiled']:.2f}x")
    return med


if __name__ == "__main__":
    main()
