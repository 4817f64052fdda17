"""benchmarks/cuda_bench.py on the CPU: tiny model, small batches, two repeats (the GPU run needs a GPU)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchscale.model.BEiT3", reason="the official code is not installed (the bench extra)")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cuda_bench.py"
SMOKE = ["--device", "cpu", "--size", "tiny", "--quick", "--threads", "1", "--repeats", "2"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("cuda_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["cuda_bench"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("cuda_bench", None)


def run(bench, out: Path, *extra: str) -> tuple[dict, str]:
    torch.set_num_threads(1)
    assert bench.main([*SMOKE, "--out", str(out), *extra]) == 0
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


@pytest.fixture(scope="module")
def fp32_run(bench, tmp_path_factory):
    return run(bench, tmp_path_factory.mktemp("cuda_bench"), "--workloads", "image224,text64")


def test_every_configuration_is_timed(fp32_run):
    results, _ = fp32_run
    rows = results["rows"]
    assert results["complete"]
    assert [(r["workload"], r["mode"], r["dtype"]) for r in rows] == [
        ("image224", "forward", "fp32"), ("image224", "train", "fp32"),
        ("text64", "forward", "fp32"), ("text64", "train", "fp32"),
    ]
    for r in rows:
        assert not r.get("skipped") and "error" not in r
        assert r["flops"] > 0 and r["batch"] == {"image224": 2, "text64": 4}[r["workload"]]
        for impl in ("imglish", "official"):
            assert len(r["times"][impl]) == 2 and min(r["times"][impl]) > 0
            assert r[impl]["samples_per_s"] > 0 and r[impl]["tflops"] > 0
            assert r[impl]["memory"] is None  # CUDA memory only
        assert r["speedup"] == pytest.approx(r["official"]["median_s"] / r["imglish"]["median_s"])
    assert results["peak"]["fp32"]["tflops"] > 0 and "bf16" not in results["peak"]
    assert results["device"]["type"] == "cpu" and results["nominal_bf16_tflops"] is None


def test_agreement_and_table(fp32_run):
    results, md = fp32_run
    assert set(results["agreement"]) == {"image224", "text64"}
    for a in results["agreement"].values():
        assert a["max_abs_diff"] < 1e-4 and a["output_max_abs"] > 0.1
    table = [line for line in md.splitlines() if line.startswith("| ") and "fp32 |" in line]
    assert len(table) == 4
    assert sum("| train | fp32 |" in line for line in table) == 2
    assert all("**" in line and line.rstrip().endswith("n/a |") for line in table)
    assert md.startswith("Measured ") and f"torch {torch.__version__}" in md and "Exactness" in md


def test_forced_bf16_autocast_and_weights(bench, tmp_path):
    results, md = run(bench, tmp_path, "--workloads", "text64", "--modes", "forward",
                      "--dtypes", "fp32,bf16,bf16w")
    assert [r["dtype"] for r in results["rows"]] == ["fp32", "bf16", "bf16w"]
    for r in results["rows"]:
        assert r["imglish"]["samples_per_s"] > 0 and r["official"]["samples_per_s"] > 0
    errors = results["bf16_error"]["text64"]
    for dtype in ("bf16", "bf16w"):
        for impl in ("imglish", "official"):
            assert 0 < errors[dtype][impl] < 0.05
    assert "bf16" in results["peak"] and "| bf16 weights |" in md and "relative RMS" in md


def test_budget_guard_skips_the_rest(bench, tmp_path):
    results, md = run(bench, tmp_path, "--workloads", "image224,text64", "--budget-s", "0")
    rows = results["rows"]
    assert len(rows) == 4 and all(r["skipped"] == "time budget" for r in rows)
    assert results["agreement"] == {} and results["complete"]
    assert md.count("skipped (time budget)") == 4


def test_budget_spent_mid_run_skips_the_remaining_configurations(bench, tmp_path, monkeypatch):
    """The clock jumps past the budget once the first configuration is reported: the rest are skipped."""
    import time
    import types

    shift = [0.0]
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + shift[0], strftime=time.strftime)
    monkeypatch.setattr(bench, "time", clock)
    describe = bench.describe

    def describe_then_jump(row: dict, results: dict) -> str:
        shift[0] = 1e6
        return describe(row, results)

    monkeypatch.setattr(bench, "describe", describe_then_jump)
    results, md = run(bench, tmp_path, "--workloads", "image224,text64", "--budget-s", "100")
    assert [bool(r.get("skipped")) for r in results["rows"]] == [False, True, True, True]
    assert set(results["agreement"]) == {"image224"}
    assert md.count("skipped (time budget)") == 3 and "Skipped rows" in md


def test_a_failing_configuration_is_reported_and_the_run_goes_on(bench, tmp_path, monkeypatch):
    real = bench.run_configuration

    def fail_training(*args, **kwargs):
        if args[5] == "train":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "run_configuration", fail_training)
    results, md = run(bench, tmp_path, "--workloads", "text64")
    forward, train = results["rows"]
    assert forward["imglish"]["samples_per_s"] > 0 and "error" not in forward
    assert train["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert "fail_training" in train["traceback"]
    assert "failed: RuntimeError: CUDA out of memory (simulated)" in md and results["complete"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_asked_without_cuda_exits(bench, tmp_path):
    with pytest.raises(SystemExit, match="CUDA is not available"):
        bench.main(["--device", "cuda", "--out", str(tmp_path)])
    assert not (tmp_path / "results.json").exists()
