"""Everything about the official checkpoint layout, in one place (spec §2, §3).

One rename table, read in both directions, maps official key names to ours; q/k/v are fused into one matrix per
expert on the way in and split on the way out. Functions are pure: state dict in, state dict out. The round trip
official -> imglish -> official is lossless (bitwise), the two unused fairseq position rows included.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

__all__ = [
    "from_official",
    "infer_official_config",
    "infer_task",
    "is_official_state_dict",
    "to_official",
    "unwrap_state_dict",
]

# (official pattern, imglish pattern). `{i}` is a layer index, `{e}` an expert (A or B), `{p}` weight or bias.
# Keys are relative to the backbone (the official `beit3.` prefix and ours are handled around the table).
_BACKBONE_TABLE: list[tuple[str, str]] = [
    ("text_embed.weight", "text_embed.weight"),
    ("vision_embed.proj.{p}", "vision_embed.proj.{p}"),
    ("vision_embed.cls_token", "vision_embed.cls_token"),
    ("vision_embed.mask_token", "vision_embed.mask_token"),
    ("encoder.embed_positions.A.weight", "vision_pos_embed"),
    ("encoder.embed_positions.B.weight", "text_pos_embed"),
    ("encoder.layer_norm.{e}.{p}", "norm.{e}.{p}"),
    ("encoder.layers.{i}.self_attn_layer_norm.{e}.{p}", "layers.{i}.norm1.{e}.{p}"),
    ("encoder.layers.{i}.self_attn.inner_attn_ln.{e}.{p}", "layers.{i}.attn.inner_norm.{e}.{p}"),
    ("encoder.layers.{i}.self_attn.out_proj.{e}.{p}", "layers.{i}.attn.proj.{e}.{p}"),
    ("encoder.layers.{i}.final_layer_norm.{e}.{p}", "layers.{i}.norm2.{e}.{p}"),
    ("encoder.layers.{i}.ffn.{e}.fc1.{p}", "layers.{i}.ffn.{e}.fc1.{p}"),
    ("encoder.layers.{i}.ffn.{e}.ffn_layernorm.{p}", "layers.{i}.ffn.{e}.norm.{p}"),
    ("encoder.layers.{i}.ffn.{e}.fc2.{p}", "layers.{i}.ffn.{e}.fc2.{p}"),
]
# Fused projections: official q/k/v (registration order k, v, q) <-> our qkv rows in the order q, k, v.
_QKV_OFFICIAL = "encoder.layers.{i}.self_attn.{n}_proj.{e}.{p}"
_QKV_OURS = "layers.{i}.attn.qkv.{e}.{p}"
_QKV_ORDER = ("q", "k", "v")
_QKV_OFFICIAL_ORDER = ("k", "v", "q")

# Task-level keys outside the backbone that are named differently.
_OFFICIAL_MLM_PROJECTION = "beit3.encoder.output_projection.weight"  # pretrained files (spec §2.1)
_OUR_MLM_PROJECTION = "mlm_head.weight"

_FIELDS = {"i": r"(?P<i>\d+)", "e": r"(?P<e>[AB])", "p": r"(?P<p>weight|bias)", "n": r"(?P<n>[qkv])"}


def _compile(pattern: str) -> re.Pattern[str]:
    regex = re.escape(pattern)
    for name, group in _FIELDS.items():
        regex = regex.replace(re.escape("{" + name + "}"), group)
    return re.compile(regex + r"\Z")


_TO_OURS = [(_compile(off), ours) for off, ours in _BACKBONE_TABLE]
_TO_OFFICIAL = [(_compile(ours), off) for off, ours in _BACKBONE_TABLE]
_QKV_OFFICIAL_RE = _compile(_QKV_OFFICIAL)
_QKV_OURS_RE = _compile(_QKV_OURS)


def unwrap_state_dict(obj: Mapping[str, object], model_key: str = "model|module") -> dict[str, Tensor]:
    """The state dict inside a checkpoint file: the first of `model_key` ('|'-separated) present, else the file.

    Leading `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes are stripped from every key.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"a checkpoint must be a mapping of names to tensors, got {type(obj).__name__}")
    for key in model_key.split("|"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    out: dict[str, Tensor] = {}
    for name, value in obj.items():
        if not isinstance(value, Tensor):
            continue  # e.g. 'epoch' or 'args' beside the weights in a bare training checkpoint
        for prefix in ("module.", "_orig_mod."):
            while name.startswith(prefix):
                name = name[len(prefix):]
        out[name] = value
    if not out:
        raise ValueError("the checkpoint holds no tensors (looked under 'model', 'module' and the top level)")
    return out


def is_official_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    """True for the official layout (torchscale key names), False for ours."""
    official = any(".self_attn." in k or "encoder.embed_positions." in k for k in state_dict)
    ours = any(".attn.qkv." in k or k.endswith("vision_pos_embed") for k in state_dict)
    if official and ours:
        raise ValueError("the state dict mixes official (torchscale) and imglish key names; cannot tell its layout")
    return official


def _backbone_part(key: str, bare: bool) -> tuple[str, str] | None:
    """`(prefix, rest)` for a backbone key (prefix `beit3.`, or empty in a bare backbone state dict), else None."""
    if bare:
        return "", key
    if key.startswith("beit3."):
        return "beit3.", key[len("beit3."):]
    return None


def _rename(rest: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    """`rest` renamed by the first matching row of `table`, or None when no row matches."""
    for regex, template in table:
        match = regex.match(rest)
        if match:
            return template.format(**match.groupdict())
    return None


def from_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official key names -> imglish key names (q/k/v fused). Non-backbone keys (heads) keep their names.

    Works for full task checkpoints (`beit3.`-prefixed backbone keys) and for bare backbone state dicts (the keys
    of torchscale's `BEiT3` itself); the prefix is preserved.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str, str, str], dict[str, Tensor]] = {}
    bare = not any(k.startswith("beit3.") for k in state_dict)
    for key, value in state_dict.items():
        if key == _OFFICIAL_MLM_PROJECTION:
            out[_OUR_MLM_PROJECTION] = value
            continue
        part = _backbone_part(key, bare)
        if part is None:
            out[key] = value  # a head
            continue
        prefix, rest = part
        match = _QKV_OFFICIAL_RE.match(rest)
        if match:
            slot = (prefix, match["i"], match["e"], match["p"])
            qkv.setdefault(slot, {})[match["n"]] = value
            continue
        renamed = _rename(rest, _TO_OURS)
        out[key if renamed is None else prefix + renamed] = value  # unknown keys are left for the report
    for (prefix, i, e, p), parts in qkv.items():
        missing = [n for n in _QKV_ORDER if n not in parts]
        if missing:
            for n, v in parts.items():  # incomplete: keep the pieces under their own names for the report
                out[prefix + _QKV_OFFICIAL.format(i=i, n=n, e=e, p=p)] = v
            continue
        out[prefix + _QKV_OURS.format(i=i, e=e, p=p)] = torch.cat([parts[n] for n in _QKV_ORDER], dim=0)
    return out


def to_official(state_dict: Mapping[str, Tensor] | torch.nn.Module) -> dict[str, Tensor]:
    """imglish key names -> official key names (q/k/v split, in the official registration order).

    Accepts a state dict or a model (whose `state_dict()` is used). Models built with the paper-only options
    (shared attention, vision-language FFN) have no official layout and raise a ValueError.
    """
    if isinstance(state_dict, torch.nn.Module):
        config = getattr(getattr(state_dict, "beit3", state_dict), "config", None)
        if config is not None and not config.has_official_layout:
            raise ValueError(
                "this model uses the paper-only options (shared_attention / vl_ffn_layers); the official code "
                "has no layout for them"
            )
        state_dict = state_dict.state_dict()
    bare = not any(k.startswith("beit3.") for k in state_dict)
    has_mlm_bias = "mlm_head.bias" in state_dict
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key == _OUR_MLM_PROJECTION and not has_mlm_bias:
            out[_OFFICIAL_MLM_PROJECTION] = value  # the pretraining MLM projection (no bias)
            continue
        part = _backbone_part(key, bare)
        if part is None:
            out[key] = value  # a head
            continue
        prefix, rest = part
        match = _QKV_OURS_RE.match(rest)
        if match:
            parts = dict(zip(_QKV_ORDER, value.chunk(3, dim=0)))
            for n in _QKV_OFFICIAL_ORDER:
                out[prefix + _QKV_OFFICIAL.format(n=n, **match.groupdict())] = parts[n].clone()
            continue
        renamed = _rename(rest, _TO_OFFICIAL)
        if renamed is None and (".shared." in rest or ".C." in rest):
            raise ValueError(f"{key!r} belongs to a paper-only option that has no official layout")
        out[key if renamed is None else prefix + renamed] = value
    return out


def infer_task(state_dict: Mapping[str, Tensor]) -> tuple[str, dict[str, int]]:
    """Guess the task model of a state dict (either layout) from its head keys: `(task, task_kwargs)`."""
    keys = set(state_dict)
    if "fc_norm.weight" in keys:
        return "imageclassification", {"num_classes": int(state_dict["head.weight"].shape[0])}
    if "pooler.dense.weight" in keys:
        return "vqav2", {"num_classes": int(state_dict["head.3.weight"].shape[0])}
    if "head.dense1.weight" in keys:
        return "nlvr2", {"num_classes": int(state_dict["head.dense2.weight"].shape[0])}
    if "vision_head.weight" in keys:
        return "retrieval", {}
    if "mlm_head.bias" in keys:
        return "captioning", {}
    if "mim_head.weight" in keys:
        return "pretraining", {"num_visual_tokens": int(state_dict["mim_head.weight"].shape[0])}
    return "backbone", {}


def infer_official_config(state_dict: Mapping[str, Tensor], num_heads: int | None = None) -> dict[str, object]:
    """Architecture fields of a BEiT3Config read off an official (or imglish) state dict's shapes.

    Head count is not visible in the shapes; without `num_heads` it assumes the released head size of 64.
    The image size assumes a square patch grid.
    """
    sd = from_official(state_dict) if is_official_state_dict(state_dict) else dict(state_dict)
    prefix = "beit3." if any(k.startswith("beit3.") for k in sd) else ""
    try:
        text = sd[prefix + "text_embed.weight"]
        patch = sd[prefix + "vision_embed.proj.weight"]
        vision_pos = sd[prefix + "vision_pos_embed"]
        text_pos = sd[prefix + "text_pos_embed"]
        fc1 = sd[prefix + "layers.0.ffn.A.fc1.weight"]
    except KeyError as err:
        raise ValueError(f"not a BEiT-3 state dict: {err.args[0]!r} is missing") from None
    dim = int(text.shape[1])
    depth = 1 + max(int(k[len(prefix):].split(".")[1]) for k in sd if k.startswith(prefix + "layers."))
    side = int(round((vision_pos.shape[0] - 3) ** 0.5))
    if side * side != vision_pos.shape[0] - 3:
        raise ValueError(f"vision position table of {vision_pos.shape[0]} rows is not 3 + a square grid")
    heads = num_heads or max(1, dim // 64)
    return {
        "embed_dim": dim,
        "num_heads": heads,
        "depth": depth,
        "ffn_dim": int(fc1.shape[0]),
        "patch_size": int(patch.shape[-1]),
        "in_chans": int(patch.shape[1]),
        "img_size": [side * int(patch.shape[-1])] * 2,
        "vocab_size": int(text.shape[0]),
        "max_source_positions": int(text_pos.shape[0]),
        "normalize_output": (prefix + "norm.A.weight") in sd,
    }
