"""Parity runner: replay outputs of the official code (`beit3-parity/1` and `vqkd-parity/1` files) through imglish.

Each case names a model kind and a config, official state dict(s) and official inputs; the runner builds the imglish
model from the config, loads the weights through the official-checkpoint loader, runs the inputs and compares
(max absolute difference within the tolerance; token ids must be equal). Nothing is tuned to a particular file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from imglish.generation import GenerationConfig, beam_search
from imglish.model.config import BEiT3Config
from imglish.model.heads import (
    BEiT3ForCaptioning,
    BEiT3ForImageClassification,
    BEiT3ForRetrieval,
    BEiT3ForVisualQuestionAnswering,
    BEiT3ForVisualReasoning,
    BEiT3Model,
)
from imglish.model.loading import load_checkpoint

__all__ = ["CaseResult", "run_beit3_cases", "run_parity_file", "DEFAULT_ATOL"]

DEFAULT_ATOL = 1e-4

_MODEL_KINDS: dict[str, Callable[..., BEiT3Model]] = {
    "backbone": BEiT3Model,
    "image_classification": BEiT3ForImageClassification,
    "vqav2": BEiT3ForVisualQuestionAnswering,
    "nlvr2": BEiT3ForVisualReasoning,
    "retrieval": BEiT3ForRetrieval,
    "captioning": BEiT3ForCaptioning,
}
_CONFIG_KEYS = (
    "embed_dim", "num_heads", "depth", "ffn_dim", "img_size", "patch_size", "vocab_size", "normalize_output",
    "max_source_positions", "layernorm_eps",
)


@dataclass
class CaseResult:
    """The outcome of one parity case."""

    name: str
    max_abs_diff: float
    passed: bool
    detail: str = ""

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        extra = f"  ({self.detail})" if self.detail else ""
        return f"{status}  {self.name:<32} max_abs_diff={self.max_abs_diff:.3e}{extra}"


def _build(case: dict[str, Any]) -> BEiT3Model:
    kind = case["model"]
    if kind not in _MODEL_KINDS:
        raise ValueError(f"case {case.get('name')!r}: unknown model kind {kind!r}; expected one of {sorted(_MODEL_KINDS)}")
    cfg = case["config"]
    config = BEiT3Config(**{k: cfg[k] for k in _CONFIG_KEYS if k in cfg})
    kwargs = {"num_classes": int(cfg["num_classes"])} if "num_classes" in cfg else {}
    return _MODEL_KINDS[kind](config, **kwargs).eval()


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, Tensor) else value


def _diff(ours: Tensor, ref: Tensor, rows: Tensor | None = None) -> float:
    if tuple(ours.shape) != tuple(ref.shape):
        raise ValueError(f"shape {tuple(ours.shape)} differs from the official {tuple(ref.shape)}")
    delta = (ours.detach().float() - ref.float()).abs()
    if rows is not None:
        delta = delta[rows]
    return float(delta.max()) if delta.numel() else 0.0


def _valid_rows(inputs: dict[str, Tensor], n_vision: int) -> Tensor | None:
    """(B, T) True where an output row is meaningful: vision rows and unpadded text rows."""
    pad = inputs.get("text_padding_position", inputs.get("padding_mask"))
    if pad is None:
        return None
    text_ok = pad == 0
    if n_vision:
        vision_ok = torch.ones(pad.shape[0], n_vision, dtype=torch.bool)
        return torch.cat([vision_ok, text_ok], dim=1)
    return text_ok


def _run_case(case: dict[str, Any], weights: dict[str, dict[str, Tensor]]) -> dict[str, tuple[Tensor, Tensor, Tensor | None]]:
    """Run one case; returns {output name: (ours, official, rows to compare or None)}."""
    model = _build(case)
    inputs = case["inputs"]
    outputs = case["outputs"]
    name, kind = case["name"], case["model"]
    if "checkpoint_weights" in case:
        # A checkpoint made at another resolution, loaded (and interpolated) the way a user would load a file.
        load_checkpoint(model, {"model": weights[case["checkpoint_weights"]]})
    else:
        load_checkpoint(model, weights[case["weights"]])
    compared: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}
    with torch.no_grad():
        if kind == "backbone":
            out = model.beit3(
                textual_tokens=inputs.get("textual_tokens"),
                visual_tokens=inputs.get("visual_tokens"),
                text_padding_position=inputs.get("text_padding_position"),
                vision_masked_position=inputs.get("vision_masked_position"),
            )
            compared["encoder_out"] = (
                out["encoder_out"], outputs["encoder_out"], _valid_rows(inputs, out.num_vision_tokens)
            )
        elif kind in ("image_classification", "vqav2", "nlvr2"):
            compared["logits"] = (model(**inputs), outputs["logits"], None)
        elif kind == "retrieval":
            vision_cls, language_cls = model(**inputs, only_infer=True)
            for key, ours in (("vision_cls", vision_cls), ("language_cls", language_cls)):
                if key in outputs:
                    compared[key] = (ours, outputs[key], None)
            if "checkpoint_weights" in case:
                ref_table = weights[case["weights"]]["beit3.encoder.embed_positions.A.weight"]
                compared["interpolated_position_table"] = (model.beit3.vision_pos_embed, ref_table, None)
        elif kind == "captioning" and "token_ids" in outputs:
            cfg = GenerationConfig(
                max_len=int(_scalar(inputs["max_len"])),
                num_beams=int(_scalar(inputs["num_beams"])),
                length_penalty=float(_scalar(inputs["length_penalty"])),
                bos_token_id=int(_scalar(inputs["bos_token_id"])),
                pad_token_id=int(_scalar(inputs["pad_token_id"])),
                eos_token_id=int(_scalar(inputs["eos_token_id"])),
                mask_token_id=int(_scalar(inputs["mask_token_id"])),
            )
            compared["token_ids"] = (beam_search(model, inputs["image"], cfg), outputs["token_ids"], None)
        elif kind == "captioning" and "step_logits" in outputs:
            compared["step_logits"] = (_incremental_steps(model, inputs), outputs["step_logits"], None)
        elif kind == "captioning":
            pad = inputs.get("padding_mask")
            if "logits_all_text" in outputs:
                logits, _ = model(inputs["image"], inputs["text_ids"], pad, None)
                rows = (pad == 0) if pad is not None else None
                compared["logits_all_text"] = (logits, outputs["logits_all_text"], rows)
            if "logits_masked" in outputs:
                logits, _ = model(inputs["image"], inputs["text_ids"], pad, inputs["language_masked_pos"])
                compared["logits_masked"] = (logits, outputs["logits_masked"], None)
        else:  # pragma: no cover - guarded by _build
            raise ValueError(f"case {name!r}: nothing to compare for model kind {kind!r}")
    return compared


def _incremental_steps(model: BEiT3ForCaptioning, inputs: dict[str, Any]) -> Tensor:
    """Official incremental protocol: feed [BOS, MASK] with the image, then [w, MASK] per step, dropping the MASK's
    cached key/value after every step. Returns the MASK logits of every step, (B, steps, V)."""
    image, words = inputs["image"], inputs["words"]
    mask_id, bos_id = int(_scalar(inputs["mask_token_id"])), int(_scalar(inputs["bos_token_id"]))
    batch = image.shape[0]
    mask = torch.full((batch, 1), mask_id, dtype=torch.long)
    cache = model.new_cache()
    step_input = torch.cat([torch.full((batch, 1), bos_id, dtype=torch.long), mask], dim=1)
    logits = []
    for step in range(words.shape[1]):
        out, cache = model(image if step == 0 else None, step_input, torch.zeros_like(step_input), None,
                           incremental_state=cache)
        logits.append(out[:, -1])
        cache.truncate(cache.length - 1)
        step_input = torch.cat([words[:, step : step + 1], mask], dim=1)
    return torch.stack(logits, dim=1)


def run_beit3_cases(data: dict[str, Any], atol: float = DEFAULT_ATOL) -> list[CaseResult]:
    """Run every case of a `beit3-parity/1` dict."""
    results = []
    for case in data["cases"]:
        name = case.get("name", "?")
        try:
            compared = _run_case(case, data["weights"])
        except Exception as err:  # noqa: BLE001 - a failing case is reported, the others still run
            results.append(CaseResult(name, float("inf"), False, f"{type(err).__name__}: {err}"))
            continue
        worst, passed, details = 0.0, True, []
        for key, (ours, ref, rows) in compared.items():
            if not ref.is_floating_point():
                equal = tuple(ours.shape) == tuple(ref.shape) and bool(torch.equal(ours.to(ref.dtype), ref))
                passed &= equal
                details.append(f"{key}: {'equal' if equal else 'DIFFERENT'}")
                if not equal:
                    details.append(f"ours={ours.tolist()} official={ref.tolist()}")
                continue
            try:
                diff = _diff(ours, ref, rows)
            except ValueError as err:
                passed, diff = False, float("inf")
                details.append(f"{key}: {err}")
            worst = max(worst, diff)
            passed &= diff <= atol
            if len(compared) > 1:
                details.append(f"{key}: {diff:.2e}")
        results.append(CaseResult(name, worst, passed, "; ".join(details)))
    return results


def run_parity_file(path: str | os.PathLike, atol: float = DEFAULT_ATOL) -> list[CaseResult]:
    """Load a parity file (`torch.load(weights_only=True)`) and run it according to its `format`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"parity file not found: {path}")
    from imglish.model.loading import safe_torch_load

    data = safe_torch_load(path)
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt == "beit3-parity/1":
        return run_beit3_cases(data, atol)
    if fmt == "vqkd-parity/1":
        from imglish.evaluation.parity_vqkd import run_vqkd_cases

        return run_vqkd_cases(data, atol)
    raise ValueError(f"{path}: unknown parity format {fmt!r}; expected 'beit3-parity/1' or 'vqkd-parity/1'")


def summarize(results: Iterable[CaseResult]) -> tuple[int, int]:
    results = list(results)
    passed = sum(r.passed for r in results)
    return passed, len(results) - passed
