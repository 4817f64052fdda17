"""Acceptance: the official code's outputs, replayed through imglish (`imglish parity`)."""

from __future__ import annotations

import torch

from imglish.cli.main import main
from imglish.evaluation.parity import run_beit3_cases, run_parity_file
from tests.conftest import parity_file


def test_every_official_case_passes_through_the_cli(capsys):
    path = parity_file("official-tiny.pt")
    code = main(["parity", str(path)])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[-1] == "12 passed, 0 failed"
    assert code == 0
    case_lines = [line for line in lines if line.startswith(("PASS", "FAIL"))]
    assert len(case_lines) == 12 and all("max_abs_diff=" in line for line in case_lines)


def test_a_wrong_weight_makes_the_run_fail(capsys):
    data = torch.load(parity_file("official-tiny.pt"), weights_only=True)
    # Perturb one vision-expert FFN weight of the backbone used by the backbone cases.
    # (noise, not a constant: a constant shift of every row would be cancelled by the next LayerNorm)
    weight = data["weights"]["w0"]["encoder.layers.1.ffn.A.fc2.weight"]
    weight += 1e-2 * torch.randn_like(weight)
    data["cases"] = [c for c in data["cases"] if c["name"] in ("backbone_vision", "backbone_text")]
    results = {r.name: r for r in run_beit3_cases(data)}
    assert not results["backbone_vision"].passed
    # Text-only passes never touch the vision expert, so that case must still pass.
    assert results["backbone_text"].passed


def test_tolerance_is_applied():
    results = run_parity_file(parity_file("official-tiny.pt"), atol=1e-12)
    floats = [r for r in results if "token_ids" not in r.detail]
    assert any(not r.passed for r in floats)  # float outputs differ by ~1e-6, so 1e-12 must fail some
    assert all(r.max_abs_diff < 1e-4 for r in results)


def test_unknown_format_is_a_clear_error(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"format": "something/9"}, path)
    code = main(["parity", str(path)])
    assert code == 2
