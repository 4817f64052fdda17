"""official_vs_imglish.py's imglish options (one-modality models, compile) and compile_vs_eager.py, tiny size."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchscale.model.BEiT3", reason="the official code is not installed (the bench extra)")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("workload, held", [("image224", ("vision",)), ("text64", ("text",)),
                                            ("vqa480", ("vision", "text"))])
def test_used_modalities_give_a_smaller_model_with_the_same_outputs(workload, held):
    bench = _load("official_vs_imglish")
    torch.set_num_threads(1)
    settings = bench.Settings(size="tiny", imglish_modalities="used")
    w = bench.WORKLOADS[workload]
    pair = bench.build_pair(settings, w)  # loads the official weights cleanly, or raises
    ours = pair["imglish"].backbone
    assert ours.config.modalities == held
    count = lambda m: sum(p.numel() for p in m.parameters())
    if len(held) == 1:  # the tiny text-only model keeps the 64,010-row text embedding: most of its weights
        share = 0.2 if held == ("vision",) else 0.95
        assert count(ours) < share * count(pair["official"].backbone)
    agreement = bench.check_agreement(pair, w, bench.make_batch(w, 2, 0))
    assert agreement["max_abs_diff"] < 1e-4


def test_lean_flag_sets_the_memory_lean_imglish_side():
    bench = _load("official_vs_imglish")
    settings, _ = bench.settings_from_args(bench.parse_args(["--lean", "--imglish-compile", "--dtypes", "fp32"]))
    assert (settings.imglish_recompute, settings.imglish_adamw, settings.imglish_modalities) == (
        "selective", "in_backward", "used")
    assert settings.imglish_compile


def test_compile_vs_eager_times_all_three_sides():
    script = _load("compile_vs_eager")
    med = script.main(["--size", "tiny", "--depth", "1", "--workload", "text64", "--mode", "train", "--batch", "2",
                       "--threads", "1", "--repeats", "2"])
    assert set(med) == {"official", "imglish", "imglish compiled"} and all(v > 0 for v in med.values())
