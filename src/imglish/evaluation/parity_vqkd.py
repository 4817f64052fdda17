"""Parity of our VQ-KD tokenizer with the official BEiT v2 code, on ``vqkd-parity/1`` fixture files.

A fixture (see ``tests/fixtures/README.md``) holds a config, official-layout weights, input images in [0, 1] and
the official outputs. :func:`run_vqkd_cases` loads the weights strictly into :class:`imglish.tokenizers.vqkd.VQKD`
and compares:

* ``tokens``: ``get_codebook_indices`` ids, which must be equal;
* ``quantize``: the codebook vectors the encoder snaps to, (B, code_dim, h, w);
* ``decoded``: decoder + ``decode_task_layer`` on ``quantize``, (B, N, out_dim);
* ``released_keys/<name>``: for each entry of ``released_tokenizer_keys``, the key names and shapes of our model
  built from the preset of that name equal the released file's.

``imglish parity FILE`` dispatches files whose ``format`` is ``vqkd-parity/1`` here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

try:  # the generic parity runner (owned by the model engineer) defines the shared result type
    from imglish.evaluation.parity import CaseResult
except ImportError:  # pragma: no cover - fallback while that module does not exist
    from dataclasses import dataclass

    @dataclass
    class CaseResult:  # type: ignore[no-redef]
        """One compared output: its name, the largest absolute difference, and whether it passed."""

        name: str
        max_abs_diff: float
        passed: bool
        detail: str = ""


from imglish.tokenizers.vqkd import VQKD, VQKD_PRESETS, VQKDConfig, load_vqkd

__all__ = ["FORMAT", "run_vqkd_cases", "released_key_cases", "CaseResult"]

FORMAT = "vqkd-parity/1"


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def released_key_cases(released: Mapping[str, Mapping[str, Any]]) -> list[CaseResult]:
    """Compare our preset models' state-dict keys and shapes with released tokenizer files' (no weights built).

    Args:
        released: ``{preset name: {key: shape list}}``.
    """
    results: list[CaseResult] = []
    for name, keys in released.items():
        case = f"released_keys/{name}"
        if name not in VQKD_PRESETS:
            results.append(CaseResult(case, float("inf"), False, f"no imglish preset named {name}"))
            continue
        with torch.device("meta"):
            model = VQKD(VQKD_PRESETS[name])
        ours = {k: list(v.shape) for k, v in model.state_dict().items()}
        theirs = {k: list(v) for k, v in keys.items()}
        missing = sorted(set(theirs) - set(ours))
        extra = sorted(set(ours) - set(theirs))
        shapes = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
        ok = not (missing or extra or shapes)
        detail = (
            f"{len(ours)} keys, names and shapes equal"
            if ok
            else f"missing {missing[:5]}, unexpected {extra[:5]}, shape differs {shapes[:5]}"
        )
        results.append(CaseResult(case, 0.0 if ok else float("inf"), ok, detail))
    return results


def run_vqkd_cases(data: Mapping[str, Any], atol: float = 1e-4) -> list[CaseResult]:
    """Run every comparison of a ``vqkd-parity/1`` fixture.

    Args:
        data: the fixture dict (``torch.load(path, weights_only=True)``).
        atol: tolerance on float outputs (token ids must be equal).

    Returns:
        One :class:`CaseResult` per compared output (and per released key list).

    Raises:
        ValueError: ``data`` is not a ``vqkd-parity/1`` fixture.
    """
    if data.get("format") != FORMAT:
        raise ValueError(f"expected a {FORMAT!r} fixture, got format {data.get('format')!r}")
    for key in ("config", "weights", "inputs", "outputs"):
        if key not in data:
            raise ValueError(f"{FORMAT} fixture is missing the {key!r} entry")
    cfg_dict = dict(data["config"])
    known = set(VQKDConfig.__dataclass_fields__)
    ignored = sorted(set(cfg_dict) - known)
    config = VQKDConfig.from_dict(cfg_dict, strict=False)
    note = f" (config keys not used: {ignored})" if ignored else ""
    results: list[CaseResult] = []
    try:
        model, report = load_vqkd(dict(data["weights"]), config, strict=True)
    except ValueError as err:
        return [CaseResult("load_weights", float("inf"), False, str(err))]
    results.append(CaseResult("load_weights", 0.0, True, str(report) + note))
    model = model.float().eval()
    images = data["inputs"]["images"].float()
    outputs = data["outputs"]
    with torch.no_grad():
        tokens = model.get_codebook_indices(images)
        quant, _, _ = model.encode(model.preprocess(images))
        decoded = model.decode(quant)
    if "tokens" in outputs:
        ref = outputs["tokens"].long()
        equal = tokens.shape == ref.shape and bool((tokens == ref).all())
        wrong = int((tokens != ref).sum()) if tokens.shape == ref.shape else -1
        results.append(
            CaseResult("tokens", 0.0 if equal else float(max(wrong, 1)), equal,
                       f"{tuple(ref.shape)} ids; {'all equal' if equal else f'{wrong} differ'}")
        )
    for name, ours in (("quantize", quant), ("decoded", decoded)):
        if name in outputs:
            ref = outputs[name].float()
            d = _diff(ours, ref)
            results.append(CaseResult(name, d, d <= atol, f"shape {tuple(ref.shape)}, atol {atol}"))
    if "released_tokenizer_keys" in data:
        results.extend(released_key_cases(data["released_tokenizer_keys"]))
    return results
