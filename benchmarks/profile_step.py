"""Where the time goes: torch.profiler tables of one configuration, imglish and official side by side.

Uses the same models, weights, inputs and steps as `official_vs_imglish.py`:

    python benchmarks/profile_step.py --workload vqa480 --mode train --batch 1
    python benchmarks/profile_step.py --workload image224 --mode forward --batch 4 --depth 4

Prints, for each implementation, the operators with the most self CPU time over `--steps` profiled steps (after
one warm-up step), and a summary grouped into matmuls, attention, normalisation, element-wise/copies, optimizer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official_vs_imglish as bench  # noqa: E402

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
               "aten::convolution_backward"),
    "attention (fused SDPA)": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                               "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "softmax / masking": ("aten::_softmax", "aten::_softmax_backward_data", "aten::masked_fill_",
                          "aten::masked_fill", "aten::nan_to_num"),
    "layer norm": ("aten::native_layer_norm", "aten::native_layer_norm_backward"),
    "gelu": ("aten::gelu", "aten::gelu_backward"),
    "copies (cat/copy/clone/fill)": ("aten::cat", "aten::copy_", "aten::clone", "aten::fill_", "aten::zero_"),
    "element-wise (add/mul/sum)": ("aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::sum", "aten::div"),
    "optimizer": ("aten::_fused_adamw_", "aten::_foreach_add_", "aten::_foreach_mul_", "aten::_foreach_addcmul_",
                  "aten::_foreach_addcdiv_", "aten::_foreach_sqrt", "aten::_foreach_div_", "aten::_foreach_lerp_"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_config_args(p, workload="vqa480")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args(argv)
    settings, _, pair, data = bench.build_config_pair(args)
    summary: dict[str, dict[str, float]] = {}
    for impl in bench.IMPLS:
        step = bench.make_step(pair[impl], args.mode, args.dtype, data, settings.fused_adamw, bench.adamw_for(settings, impl))
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        averages = prof.key_averages()
        print(f"\n=== {impl}: {args.workload} {args.mode} {args.dtype}, batch {args.batch}, {args.steps} step(s)")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=55))
        total = sum(e.self_cpu_time_total for e in averages)
        groups = {name: 0.0 for name in GROUPS}
        for event in averages:
            for name, keys in GROUPS.items():
                if event.key in keys:
                    groups[name] += event.self_cpu_time_total
        groups["other"] = total - sum(groups.values())
        summary[impl] = {k: v / 1e6 / args.steps for k, v in groups.items()}
        summary[impl]["total"] = total / 1e6 / args.steps
    print("\nself CPU seconds per step (summed over threads' host-side ops):")
    print(f"| group | {' | '.join(bench.IMPLS)} |\n|---|---|---|")
    for name in [*GROUPS, "other", "total"]:
        print(f"| {name} | " + " | ".join(f"{summary[i][name]:.2f}" for i in bench.IMPLS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
