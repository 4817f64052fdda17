"""Speed and memory of imglish against the official BEiT-3 backbone (torchscale 0.3.0), same weights, same run.

What it does, in order:

1. Measures the machine's practical matrix-multiply peak (square `torch.mm`, float32 and bfloat16; best time over
   sizes and repeats, measured at the start and again at the end of the run, the higher figure kept).
2. For each workload builds the official `torchscale.model.BEiT3.BEiT3` at the chosen size, copies its weights into
   an imglish `BEiT3Model` with our official-checkpoint loader, and checks that both give the same outputs.
3. Times inference (no_grad forward) and a full training step (forward, loss, backward, AdamW) of both, alternating
   imglish and official runs (ABBA order), with warm-up, and reports medians over the repeats.
4. Measures the peak resident set size of every configuration in a fresh Python process.
5. Times captioning beam search with the key/value cache against re-encoding the whole sequence at every step.
6. Writes `results.json`, `results.md` (tables) and `speedup.png` to `--out`, and optionally replaces the block
   between the `<!-- bench:begin -->` / `<!-- bench:end -->` markers of a Markdown file (`--update-doc`).

Run from the repository root (needs the `bench` extra: torchscale, timm, fairscale, psutil):

    python benchmarks/official_vs_imglish.py --quick          # a few minutes
    python benchmarks/official_vs_imglish.py --update-doc docs/benchmarks.md

FLOPs are counted, not estimated: `torch.utils.flop_counter.FlopCounterMode` runs the official model once on the meta
device (its attention is explicit `bmm`s, so every matrix product is seen) and sums 2 x multiply-adds over matmuls and
the patch-embedding convolution; the training count includes the backward pass. The same count is used for both
implementations (they do the same mathematical work), so model-FLOPs utilisation (MFU) = counted FLOPs / median
time / measured matmul peak of that dtype.

torchscale 0.3.0 runs unchanged on torch 2.x for these workloads; no monkeypatch is applied.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

warnings.filterwarnings("ignore", category=FutureWarning)  # timm's deprecated-import warning inside torchscale

IMPLS = ("imglish", "official")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
DOC_BEGIN, DOC_END = "<!-- bench:begin -->", "<!-- bench:end -->"


# ---------------------------------------------------------------------------------------------------- workloads
@dataclass(frozen=True)
class Workload:
    """One benchmark input: what the backbone sees and which loss the training step uses.

    Attributes:
        name: short key.
        title: what it stands for.
        img_size: image side, or None for text only.
        text_len: text tokens, or 0 for image only.
        dual: retrieval dual encoder (image and text encoded separately, contrastive loss).
        normalize_output: whether the backbone has its final LayerNorm (as the official task model does).
        num_classes: classes of the linear head (cls, vqa, text).
        pool: what the head reads, as the official task model does: "cls" (the first token of each pass: VQA,
            retrieval) or "mean" (the mean of the patch tokens: ImageNet classification). With "cls", imglish runs
            its backbone with `cls_only=True`, as its pooled task models do.
    """

    name: str
    title: str
    img_size: int | None
    text_len: int
    dual: bool = False
    normalize_output: bool = True
    num_classes: int = 1000
    pool: str = "cls"


WORKLOADS = {
    w.name: w
    for w in (
        Workload("image224", "image only, 224 (classification)", 224, 0, normalize_output=False, num_classes=1000,
                 pool="mean"),
        Workload("vqa480", "image+text, 480 + 64 tokens (VQA)", 480, 64, normalize_output=False, num_classes=3129),
        Workload("text64", "text only, 64 tokens", None, 64, num_classes=2),
        Workload("retrieval384", "retrieval dual encoder, 384 + 64 tokens", 384, 64, dual=True),
    )
}


@dataclass
class Settings:
    """Everything that decides what is measured."""

    size: str = "base"
    depth: int | None = None
    threads: int = 2
    batch: dict[str, int] = field(default_factory=lambda: {"image224": 4, "vqa480": 1, "text64": 8, "retrieval384": 2})
    warmup: int = 1
    repeats: int = 3
    modes: tuple[str, ...] = ("forward", "train")
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    workloads: tuple[str, ...] = tuple(WORKLOADS)
    memory: bool = True
    fused_adamw: bool = True
    imglish_recompute: str = "none"
    imglish_adamw: str = "after"
    imglish_modalities: str = "all"
    imglish_compile: bool = False
    gen_img_size: int = 224
    gen_max_len: int = 16
    gen_beams: int = 3
    gen_batch: int = 1
    seed: int = 0


def model_dims(settings: Settings) -> dict[str, int]:
    from imglish.model.config import SIZES

    dims = dict(SIZES[settings.size])
    if settings.depth is not None:
        dims["depth"] = settings.depth
    return dims


# ---------------------------------------------------------------------------------------------------- builders
def build_official(settings: Settings, workload: Workload, img_size: int) -> nn.Module:
    """torchscale's BEiT3 with the official `_get_base_config`-style arguments (spec §1.1), drop path off."""
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3 as OfficialBEiT3

    dims = model_dims(settings)
    args = EncoderConfig(
        img_size=img_size, patch_size=dims["patch_size"], vocab_size=64010, multiway=True,
        layernorm_embedding=False, normalize_output=workload.normalize_output, no_output_layer=True,
        drop_path_rate=0.0, encoder_embed_dim=dims["embed_dim"], encoder_attention_heads=dims["num_heads"],
        encoder_ffn_embed_dim=dims["ffn_dim"], encoder_layers=dims["depth"], checkpoint_activations=False,
    )
    return OfficialBEiT3(args)


def build_imglish(settings: Settings, workload: Workload, img_size: int, weights: dict | None = None,
                  model_cls: type[nn.Module] | None = None, **model_kwargs) -> nn.Module:
    """imglish's bare backbone model (or the task model `model_cls(config, **model_kwargs)`); `weights` (an
    official state dict) is loaded through our loader and must load cleanly."""
    from imglish.model import BEiT3Config, BEiT3Model, load_checkpoint

    dims = model_dims(settings)
    config = BEiT3Config(**dims, img_size=img_size, normalize_output=workload.normalize_output,
                         modalities=imglish_modalities(settings, workload))
    model = (model_cls or BEiT3Model)(config, **model_kwargs)
    model.set_grad_checkpointing(settings.imglish_recompute)
    if weights is not None:
        report = load_checkpoint(model, weights)
        if not report.clean:
            raise RuntimeError(f"official weights did not load cleanly:\n{report}")
    return model


def imglish_modalities(settings: Settings, workload: Workload) -> tuple[str, ...]:
    """The modalities imglish's model holds: both (the released layout), or with `imglish_modalities="used"` only
    those the workload feeds (an image-only or text-only model, `BEiT3Config.modalities`)."""
    if settings.imglish_modalities != "used":
        return ("vision", "text")
    return tuple(m for m, used in (("vision", workload.img_size is not None), ("text", workload.text_len > 0))
                 if used)


class Side(nn.Module):
    """One implementation behind a common interface: the backbone plus the workload's head and loss."""

    def __init__(self, impl: str, backbone: nn.Module, head: nn.Module, workload: Workload) -> None:
        super().__init__()
        self.impl = impl
        self.backbone = backbone
        self.head = head
        self.workload = workload

    def encode(self, image: Tensor | None, text: Tensor | None, pad: Tensor | None) -> Tensor:
        """(B, D): what the head reads of one pass (the first token, or the mean of the patch tokens)."""
        cls = self.workload.pool == "cls"
        if self.impl == "imglish":
            h = self.backbone(image=image, text_ids=text, padding_mask=pad, cls_only=cls).last_hidden_state
        else:
            h = self.backbone(textual_tokens=text, visual_tokens=image, text_padding_position=pad)["encoder_out"]
        return h[:, 0] if cls else h[:, 1:].mean(1)

    def hidden(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, T, D) every token's final hidden state of the (first) pass, vision tokens first."""
        image, text, pad = batch.get("image"), None if self.workload.dual else batch.get("text"), batch.get("pad")
        pad = None if text is None else pad
        if self.impl == "imglish":
            return self.backbone(image=image, text_ids=text, padding_mask=pad).last_hidden_state
        return self.backbone(textual_tokens=text, visual_tokens=image, text_padding_position=pad)["encoder_out"]

    def outputs(self, batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
        """The pooled features of every pass of the workload (two for the dual encoder)."""
        w = self.workload
        if w.dual:
            return self.encode(batch["image"], None, None), self.encode(None, batch["text"], batch["pad"])
        return (self.encode(batch.get("image"), batch.get("text"), batch.get("pad")),)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        if self.workload.dual:
            hv, ht = self.outputs(batch)
            vi = F.normalize(self.head(hv).float(), dim=-1)
            vt = F.normalize(self.head(ht).float(), dim=-1)
            logits = 20.0 * vi @ vt.t()
            target = torch.arange(logits.shape[0], device=logits.device)
            return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        (h,) = self.outputs(batch)
        return F.cross_entropy(self.head(h).float(), batch["labels"])

    def infer(self, batch: dict[str, Tensor]) -> Tensor:
        if self.workload.dual:
            hv, ht = self.outputs(batch)
            return self.head(hv) @ self.head(ht).t()
        (h,) = self.outputs(batch)
        return self.head(h)


def make_head(settings: Settings, workload: Workload) -> nn.Module:
    dim = model_dims(settings)["embed_dim"]
    out = dim if workload.dual else workload.num_classes
    return nn.Linear(dim, out, bias=not workload.dual)


def make_batch(workload: Workload, batch: int, seed: int, img_size: int | None = None) -> dict[str, Tensor]:
    """Random normalised images, and token ids with BOS/EOS and right padding of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    size = img_size or workload.img_size
    if workload.img_size is not None:
        out["image"] = torch.randn(batch, 3, size, size, generator=gen)
    if workload.text_len:
        n = workload.text_len
        ids = torch.randint(4, 64000, (batch, n), generator=gen)
        pad = torch.zeros(batch, n, dtype=torch.bool)
        for row in range(batch):
            length = n - (row * 17) % (n // 2)  # the first row is unpadded, others lose up to half
            ids[row, 0], ids[row, length - 1] = 0, 2
            ids[row, length:] = 1
            pad[row, length:] = True
        out["text"], out["pad"] = ids, pad
    out["labels"] = torch.randint(0, workload.num_classes, (batch,), generator=gen)
    return out


def build_pair(settings: Settings, workload: Workload) -> dict[str, Side]:
    """Both implementations with identical weights (official init, copied through our loader) and heads."""
    torch.manual_seed(settings.seed)
    img = workload.img_size or 224
    official = build_official(settings, workload, img)
    ours = build_imglish(settings, workload, img, weights=official.state_dict())
    head = make_head(settings, workload)
    return {
        "imglish": Side("imglish", ours, copy.deepcopy(head), workload),
        "official": Side("official", official, copy.deepcopy(head), workload),
    }


def add_config_args(p: argparse.ArgumentParser, workload: str = "image224") -> None:
    """The options that pick one configuration, for the scripts that study one (profile_step, compile_vs_eager)."""
    p.add_argument("--workload", default=workload, choices=sorted(WORKLOADS))
    p.add_argument("--mode", default="train", choices=("forward", "train"))
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", default="base")
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)


def build_config_pair(args: argparse.Namespace) -> tuple[Settings, Workload, dict[str, Side], dict[str, Tensor]]:
    """Settings, workload, both implementations and the batch of the configuration `add_config_args` parsed."""
    torch.set_num_threads(args.threads)
    settings = Settings(size=args.size, depth=args.depth, threads=args.threads)
    workload = WORKLOADS[args.workload]
    pair = build_pair(settings, workload)
    return settings, workload, pair, make_batch(workload, args.batch, settings.seed)


# ---------------------------------------------------------------------------------------------------- steps
def autocast(dtype: str, device: str = "cpu"):
    """Autocast to `dtype` on the device type of `device` ("cpu", "cuda", "cuda:1", ...); off for fp32."""
    device_type = torch.device(device).type
    if DTYPES[dtype] is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=DTYPES[dtype])


def make_step(
    side: Side, mode: str, dtype: str, batch: dict[str, Tensor], fused: bool, adamw: str = "after",
    device: str = "cpu",
) -> Callable[[], None]:
    """A closure running one inference pass or one training step of `side`.

    `adamw="in_backward"` (imglish only) updates each parameter inside backward as soon as its gradient is complete
    and frees the gradient (`imglish.training.optim.OptimizerInBackward`); the step is otherwise the same.
    `device` is where `side` and `batch` live (it picks the autocast device type); nothing is moved.
    """
    if mode == "forward":
        side.eval()

        def step() -> None:
            with torch.no_grad(), autocast(dtype, device):
                side.infer(batch)

        return step
    side.train()
    params = [p for p in side.parameters() if p.requires_grad]
    if adamw == "in_backward":
        from imglish.training.optim import OptimizerInBackward

        opt = OptimizerInBackward(params, lr=1e-5, weight_decay=0.05, fused=fused)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05, fused=fused)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(dtype, device):
            loss = side.loss(batch)
        loss.backward()
        opt.step()

    step.optimizer = opt
    return step


def adamw_for(settings: Settings, impl: str) -> str:
    """How `impl`'s training step runs AdamW: the official side always steps after backward."""
    return settings.imglish_adamw if impl == "imglish" else "after"


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------- measurements
def matmul_peak(dtype: str, quick: bool) -> dict:
    """Best GFLOP/s of a square `torch.mm` over a few sizes (the practical peak the MFU is measured against)."""
    dt = DTYPES[dtype] or torch.float32
    native_bf16 = dtype == "fp32" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    sizes = (1024, 2048) if quick else (1024, 2048, 3072, 4096)
    if not native_bf16:
        sizes = (256, 512)  # the fallback kernel is ~50x slower: keep it short
    best: dict[int, float] = {}
    for n in sizes:
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        torch.mm(a, b)
        times = [timed(lambda: torch.mm(a, b)) for _ in range(3 if quick or not native_bf16 else 10)]
        best[n] = 2 * n**3 / min(times) / 1e9
    return {"gflops": max(best.values()), "by_size": best, "native": native_bf16}


def count_flops(settings: Settings, workload: Workload, batch: int) -> dict[str, float]:
    """Matmul/conv FLOPs of the official model for one inference pass and one training step (meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    img = workload.img_size or 224
    with torch.device("meta"):
        model = build_official(settings, workload, img)
        side = Side("official", model, make_head(settings, workload), workload)
    data = {k: v.to("meta") for k, v in make_batch(workload, batch, 0).items()}
    counts = {}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        side.eval().infer(data)
    counts["forward"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        side.train().loss(data).backward()
    counts["train"] = counter.get_total_flops()
    return counts


def check_agreement(pair: dict[str, Side], workload: Workload, batch: dict[str, Tensor]) -> dict:
    """Max |imglish - official| of the pooled features every head reads and of every token's final hidden state
    (first pass), float32, eval mode."""
    diffs = []
    with torch.no_grad():
        a = pair["imglish"].eval().outputs(batch)
        b = pair["official"].eval().outputs(batch)
        full = float((pair["imglish"].hidden(batch) - pair["official"].hidden(batch)).abs().max())
    for x, y in zip(a, b):
        diffs.append(float((x - y).abs().max()))
    scale = max(float(y.abs().max()) for y in b)
    return {"max_abs_diff": max(diffs), "output_max_abs": scale, "hidden_max_abs_diff": full}


def check_bf16(settings: Settings, quick: bool) -> dict:
    """bf16 autocast against float32 for both implementations on image+text at 224 (2 layers: cheap anywhere)."""
    small = Settings(**{**asdict(settings), "depth": 2})
    workload = Workload("vqa224", "image+text, 224 + 64 tokens", 224, 64, normalize_output=False)
    pair = build_pair(small, workload)
    data = make_batch(workload, 2, settings.seed)
    result = {}
    for impl, side in pair.items():
        side.eval()
        with torch.no_grad():
            ref = side.hidden(data)
            with autocast("bf16"):
                low = side.hidden(data).float()
        err = (low - ref).abs()
        result[impl] = {
            "max_abs_diff": float(err.max()),
            "mean_abs_diff": float(err.mean()),
            "rel_rms": float(err.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()),
        }
    return result


def abba_times(steps: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds of every timed call of `steps[impl]` for each implementation in IMPLS: `warmup` untimed calls of
    each first, then `repeats` timed rounds alternating the order (ABBA), so a drift of the machine's load hits
    both sides alike."""
    for _ in range(warmup):
        for impl in IMPLS:
            steps[impl]()
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for rep in range(repeats):
        order = IMPLS if rep % 2 == 0 else IMPLS[::-1]
        for impl in order:
            times[impl].append(timed(steps[impl]))
    return times


def run_timings(settings: Settings, log: Callable[[str], None]) -> tuple[list[dict], dict]:
    rows, agreement = [], {}
    for name in settings.workloads:
        workload = WORKLOADS[name]
        pair = build_pair(settings, workload)
        batch_size = settings.batch[name]
        data = make_batch(workload, batch_size, settings.seed)
        agreement[name] = check_agreement(pair, workload, data)
        log(f"[{name}] agreement: max |imglish - official| = {agreement[name]['max_abs_diff']:.2e}")
        if settings.imglish_compile:  # compiled during each configuration's warm-up, never timed
            side = pair["imglish"]
            side.loss, side.infer = torch.compile(side.loss), torch.compile(side.infer)
        flops = count_flops(settings, workload, batch_size)
        for mode in settings.modes:
            for dtype in settings.dtypes:
                steps = {impl: make_step(pair[impl], mode, dtype, data, settings.fused_adamw, adamw_for(settings, impl))
                         for impl in IMPLS}
                times = abba_times(steps, settings.warmup, settings.repeats)
                row = {"workload": name, "mode": mode, "dtype": dtype, "batch": batch_size,
                       "flops": flops[mode], "times": times}
                for impl in IMPLS:
                    med = statistics.median(times[impl])
                    row[impl] = {"median_s": med, "best_s": min(times[impl]), "samples_per_s": batch_size / med,
                                 "gflops": flops[mode] / med / 1e9}
                row["speedup"] = row["official"]["median_s"] / row["imglish"]["median_s"]
                row["speedup_best"] = row["official"]["best_s"] / row["imglish"]["best_s"]
                rows.append(row)
                log(f"[{name}] {mode:7s} {dtype}: imglish {row['imglish']['median_s']:.3f}s, official "
                    f"{row['official']['median_s']:.3f}s, speedup {row['speedup']:.2f}x (load {os.getloadavg()[0]:.1f})")
                for step in steps.values():  # OptimizerInBackward hooks must not outlive their step
                    getattr(getattr(step, "optimizer", None), "remove_hooks", lambda: None)()
                del steps
        del pair
    return rows, agreement


# ---------------------------------------------------------------------------------------------------- memory probes
def _peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux `clear_refs` 5); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def memory_probe(settings: Settings, impl: str, workload_name: str, mode: str, dtype: str) -> dict:
    """Run in a fresh process: build one model (random weights), run two steps, report peak RSS in MiB.

    `build_mib` is the RSS once the model and inputs exist; `peak_mib` the highest RSS during the steps (the
    counter is reset after building, so construction transients do not count; falls back to the process peak).
    """
    torch.set_num_threads(settings.threads)
    workload = WORKLOADS[workload_name]
    torch.manual_seed(settings.seed)
    img = workload.img_size or 224
    backbone = (build_imglish if impl == "imglish" else build_official)(settings, workload, img)
    side = Side(impl, backbone, make_head(settings, workload), workload)
    data = make_batch(workload, settings.batch[workload_name], settings.seed)
    step = make_step(side, mode, dtype, data, settings.fused_adamw, adamw_for(settings, impl))
    build = _status_kib("VmRSS") / 1024
    reset = _peak_rss_reset()
    for _ in range(2):  # the second training step has the optimizer state as well as activations
        step()
    if reset:
        peak = _status_kib("VmHWM") / 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"build_mib": build, "peak_mib": peak, "peak_reset": reset}


def run_memory(settings: Settings, log: Callable[[str], None]) -> list[dict]:
    rows = []
    for name in settings.workloads:
        for mode in settings.modes:
            for dtype in settings.dtypes:
                row = {"workload": name, "mode": mode, "dtype": dtype, "batch": settings.batch[name]}
                for impl in IMPLS:
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe-memory",
                           json.dumps({"settings": asdict(settings), "impl": impl, "workload": name,
                                       "mode": mode, "dtype": dtype})]
                    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if proc.returncode != 0:
                        raise RuntimeError(f"memory probe failed: {' '.join(cmd[:3])}\n{proc.stderr[-3000:]}")
                    row[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
                row["ratio"] = row["imglish"]["peak_mib"] / row["official"]["peak_mib"]
                rows.append(row)
                log(f"[{name}] memory {mode:7s} {dtype}: imglish {row['imglish']['peak_mib']:.0f} MiB, official "
                    f"{row['official']['peak_mib']:.0f} MiB ({row['ratio']:.2f}x)")
    return rows


# ---------------------------------------------------------------------------------------------------- generation
class _ReencodeCache:
    """Stands in for `KVCache` in `beam_search`: keeps the token history instead of keys and values."""

    def __init__(self) -> None:
        self.image: Tensor | None = None
        self.tokens: Tensor | None = None

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    def reorder(self, index: Tensor) -> None:
        self.tokens = self.tokens.index_select(0, index)
        self.image = self.image.index_select(0, index)

    def truncate(self, length: int) -> None:
        self.tokens = self.tokens[:, :length]


class ReencodingCaptioner:
    """A captioning model that answers incremental calls by re-encoding image and all tokens from scratch."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    def new_cache(self) -> _ReencodeCache:
        return _ReencodeCache()

    def __call__(self, image, words, padding_mask, masked_pos, incremental_state):
        state = incremental_state
        if image is not None:
            state.image, state.tokens = image, words
        else:
            state.tokens = torch.cat([state.tokens, words], dim=1)
        logits, _ = self.model(state.image, state.tokens)
        return logits[:, -words.shape[1]:], state


def run_generation(settings: Settings, log: Callable[[str], None]) -> list[dict]:
    """Tokens/s of `imglish.generation.beam_search` with the KV cache and with full re-encoding."""
    from imglish.generation import GenerationConfig, beam_search
    from imglish.model import BEiT3Config, BEiT3ForCaptioning

    torch.manual_seed(settings.seed)
    dims = model_dims(settings)
    model = BEiT3ForCaptioning(BEiT3Config(**dims, img_size=settings.gen_img_size)).eval()
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    image = torch.randn(settings.gen_batch, 3, settings.gen_img_size, settings.gen_img_size)
    # EOS suppressed so every run decodes exactly max_len - 1 steps.
    cfg = GenerationConfig(max_len=settings.gen_max_len, num_beams=settings.gen_beams, suppress_ids=(2,))
    rows = []
    for dtype in settings.dtypes:
        result = {"dtype": dtype, "img_size": settings.gen_img_size, "beams": settings.gen_beams,
                  "batch": settings.gen_batch, "max_len": settings.gen_max_len}
        tokens = {}
        for variant, runner in (("kv_cache", model), ("reencode", ReencodingCaptioner(model))):
            with autocast(dtype):
                beam_search(runner, image, cfg)  # warm-up
                calls[0] = 0
                start = time.perf_counter()
                tokens[variant] = beam_search(runner, image, cfg)
                elapsed = time.perf_counter() - start
            steps = calls[0]
            result[variant] = {"seconds": elapsed, "steps": steps,
                               "tokens_per_s": settings.gen_batch * steps / elapsed}
        result["same_tokens"] = bool(torch.equal(tokens["kv_cache"], tokens["reencode"]))
        result["speedup"] = result["kv_cache"]["tokens_per_s"] / result["reencode"]["tokens_per_s"]
        rows.append(result)
        log(f"[generation] {dtype}: cache {result['kv_cache']['tokens_per_s']:.2f} tok/s, re-encode "
            f"{result['reencode']['tokens_per_s']:.2f} tok/s ({result['speedup']:.1f}x), same tokens: "
            f"{result['same_tokens']}")
    return rows


# ---------------------------------------------------------------------------------------------------- reporting
def machine_info(settings: Settings) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        from importlib.metadata import version

        versions["torchscale"] = version("torchscale")
    except Exception:  # noqa: BLE001 - only for the report
        versions["torchscale"] = "missing"
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": settings.threads,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "versions": versions,
            "platform": platform.platform()}


def _fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if x >= 0.1 or x == 0 else f"{x:.3g}"


def render_markdown(results: dict) -> str:
    s, m = results["settings"], results["machine"]
    peak = results["peak"]
    depth = "" if s["depth"] is None else f" (depth {s['depth']})"
    lines = [
        f"Measured {results['date']} on {m['cpu']} ({m['logical_cpus']} logical CPUs, {m['threads']} threads, "
        f"`{m['cpu_capability']}` kernels, oneDNN bf16: {'yes' if m['mkldnn_bf16'] else 'no'}), torch "
        f"{m['versions']['torch']}, torchscale {m['versions']['torchscale']}. Load average "
        f"{results['load_before']:.1f} before and {results['load_after']:.1f} after the run. Model: "
        f"{s['size']}{depth}; {s['warmup']} warm-up and "
        f"{s['repeats']} timed repeats per configuration, imglish and official alternating; medians. "
        f"Optimizer: AdamW(fused={s['fused_adamw']}) on both sides. imglish training: activation recomputation "
        f"`{s.get('imglish_recompute', 'none')}`, AdamW "
        f"{'inside backward' if s.get('imglish_adamw') == 'in_backward' else 'after backward'}"
        f"{'' if s.get('imglish_recompute', 'none') == 'none' and s.get('imglish_adamw', 'after') == 'after' else ' (the memory-lean settings)'}"
        f"{'; imglish holds only the experts a workload uses (an image-only or text-only model)' if s.get('imglish_modalities') == 'used' else ''}"
        f"{'; imglish runs `torch.compile`d (inductor; compiled in the warm-up)' if s.get('imglish_compile') else ''}"
        f"; the official side recomputes nothing and steps after backward.",
        "",
        "Matrix-multiply peak (square `torch.mm`, best of sizes "
        + ", ".join(str(k) for k in peak["fp32"]["by_size"]) + "): "
        + "; ".join(f"{d} **{_fmt(p['gflops'], 1)} GFLOP/s**" for d, p in peak.items()) + ".",
    ]
    if results["timings"]:
        lines += [
            "",
            "| workload | batch | mode | dtype | imglish samples/s | official samples/s | speedup (medians) | "
            "speedup (best runs) | imglish MFU | official MFU |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    for r in results["timings"]:
        p = peak[r["dtype"]]["gflops"]
        lines.append(
            f"| {WORKLOADS[r['workload']].title} | {r['batch']} | {r['mode']} | {r['dtype']} | "
            f"{_fmt(r['imglish']['samples_per_s'])} | {_fmt(r['official']['samples_per_s'])} | "
            f"**{r['speedup']:.2f}x** | {r['speedup_best']:.2f}x | {100 * r['imglish']['gflops'] / p:.0f}% | "
            f"{100 * r['official']['gflops'] / p:.0f}% |"
        )
    if results["agreement"]:
        lines += ["", "Agreement (float32, same weights), max |imglish - official| of the pooled features the heads "
                  "read and, in brackets, of every token's final hidden state: "
                  + ", ".join(f"{k} {v['max_abs_diff']:.1e} [{v.get('hidden_max_abs_diff', float('nan')):.1e}] "
                              f"(features up to {v['output_max_abs']:.1f})"
                              for k, v in results["agreement"].items()) + "."]
    if results.get("bf16_check"):
        lines += ["", "bfloat16 autocast against float32 (same weights, image 224 + 64 tokens, batch 2, first 2 layers of the model): "
                  + "; ".join(f"{k} max {v['max_abs_diff']:.3f}, relative RMS {v['rel_rms']:.4f}"
                              for k, v in results["bf16_check"].items()) + "."]
    if results.get("memory"):
        lines += ["", "Peak resident set size (MiB; fresh process per configuration, two steps, weights, "
                  "gradients and optimizer state included):", "",
                  "| workload | batch | mode | dtype | imglish | official | ratio | imglish above model | "
                  "official above model | ratio above model |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["memory"]:
            above = {i: r[i]["peak_mib"] - r[i]["build_mib"] for i in IMPLS}
            lines.append(f"| {WORKLOADS[r['workload']].title} | {r['batch']} | {r['mode']} | {r['dtype']} | "
                         f"{r['imglish']['peak_mib']:.0f} | {r['official']['peak_mib']:.0f} | **{r['ratio']:.2f}x** | "
                         f"{above['imglish']:.0f} | {above['official']:.0f} | "
                         f"{above['imglish'] / max(above['official'], 1.0):.2f}x |")
        lines += ["", "\"Above model\" is the peak minus the RSS once the model and inputs exist: activations, "
                  "gradients and AdamW state (AdamW state is the same size on both sides; so are the gradients, "
                  "unless imglish's AdamW runs inside backward and frees each gradient as soon as it is used)."]
    if results.get("generation"):
        lines += ["", "Captioning beam search (imglish, random weights, EOS suppressed so every run decodes the "
                  "same number of steps):", "",
                  "| dtype | image | beams | steps | KV cache tokens/s | re-encode tokens/s | speedup | same tokens |",
                  "|---|---|---|---|---|---|---|---|"]
        for g in results["generation"]:
            lines.append(f"| {g['dtype']} | {g['img_size']} | {g['beams']} | {g['kv_cache']['steps']} | "
                         f"{_fmt(g['kv_cache']['tokens_per_s'])} | {_fmt(g['reencode']['tokens_per_s'])} | "
                         f"**{g['speedup']:.1f}x** | {g['same_tokens']} |")
    for note in results.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def render_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["timings"]
    if not rows:
        return
    labels = [f"{r['workload']}\n{r['mode']} {r['dtype']}" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(rows) + 4), 4.2))
    x = range(len(rows))
    ax1.bar(x, [r["speedup"] for r in rows], color="tab:blue")
    ax1.axhline(1.0, color="black", linewidth=0.8)
    ax1.set_xticks(list(x), labels, fontsize=7)
    ax1.set_ylabel("speedup over official (x)")
    ax1.set_title("imglish vs official BEiT-3, same weights")
    peak = results["peak"]
    width = 0.4
    for offset, impl, color in ((-width / 2, "imglish", "tab:blue"), (width / 2, "official", "tab:gray")):
        ax2.bar([i + offset for i in x], [100 * r[impl]["gflops"] / peak[r["dtype"]]["gflops"] for r in rows],
                width, label=impl, color=color)
    ax2.set_xticks(list(x), labels, fontsize=7)
    ax2.set_ylabel("MFU (% of measured matmul peak)")
    ax2.legend()
    ax2.set_title(f"{results['machine']['threads']} threads, {results['machine']['cpu']}", fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def update_doc(doc: Path, block: str, begin: str = DOC_BEGIN, end: str = DOC_END) -> None:
    """Replace the text between the `begin` and `end` markers of `doc` (which must contain both; by default the
    bench markers)."""
    text = doc.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{doc} has no {begin} ... {end} block to replace")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    _atomic_write(doc, f"{head}{begin}\n{block}{end}{tail}")


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="batch 1 (text 2), two repeats, memory of the image 224 / image+text 480 training steps only, "
                        "short generation")
    p.add_argument("--size", default="base", help="model size (imglish SIZES name); default base")
    p.add_argument("--depth", type=int, default=None, help="override the number of layers (for development)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {sorted(WORKLOADS)}")
    p.add_argument("--modes", default="forward,train")
    p.add_argument("--dtypes", default="auto",
                   help="fp32,bf16; 'auto' drops bf16 when the CPU has no native bf16 matmul (oneDNN)")
    p.add_argument("--batch", default=None, help="per-workload batch sizes, e.g. image224=8,vqa480=2")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-only", action="store_true", help="only the peak-memory probes (no timings)")
    p.add_argument("--no-generation", action="store_true")
    p.add_argument("--no-fused-adamw", action="store_true", help="use the for-each AdamW on both sides")
    p.add_argument("--imglish-recompute", default="none", choices=("none", "selective", "full"),
                   help="imglish's activation recomputation in training (BEiT3.set_grad_checkpointing)")
    p.add_argument("--imglish-adamw", default="after", choices=("after", "in_backward"),
                   help="imglish's AdamW: a step after backward, or each parameter's update inside backward")
    p.add_argument("--imglish-modalities", default="all", choices=("all", "used"),
                   help="imglish's model holds both modalities' weights, or only those the workload uses "
                        "(BEiT3Config.modalities: an image-only or text-only model)")
    p.add_argument("--imglish-compile", action="store_true",
                   help="time imglish's loss and inference under torch.compile (inductor), compiled in the warm-up")
    p.add_argument("--lean", action="store_true",
                   help="imglish's memory-lean training: --imglish-recompute selective --imglish-adamw in_backward "
                        "--imglish-modalities used")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--update-doc", type=Path, default=None, help="Markdown file whose bench block is replaced")
    p.add_argument("--from-json", type=Path, default=None,
                   help="re-render results.md, speedup.png (and --update-doc) from an earlier results.json")
    p.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> tuple[Settings, list[str]]:
    s = Settings(size=args.size, depth=args.depth, threads=args.threads, fused_adamw=not args.no_fused_adamw,
                 imglish_recompute="selective" if args.lean else args.imglish_recompute,
                 imglish_adamw="in_backward" if args.lean else args.imglish_adamw,
                 imglish_modalities="used" if args.lean else args.imglish_modalities,
                 imglish_compile=args.imglish_compile)
    notes: list[str] = []
    if args.quick:
        s.batch = {"image224": 1, "vqa480": 1, "text64": 2, "retrieval384": 1}
        s.repeats, s.warmup = 2, 1
        s.gen_img_size, s.gen_max_len = 224, 6
    if args.repeats is not None:
        s.repeats = args.repeats
    if args.warmup is not None:
        s.warmup = args.warmup
    if args.batch:
        for item in args.batch.split(","):
            key, _, value = item.partition("=")
            if key not in WORKLOADS or not value.isdigit():
                raise SystemExit(f"--batch expects workload=N items with workloads {sorted(WORKLOADS)}, got {item!r}")
            s.batch[key] = int(value)
    s.workloads = tuple(w for w in args.workloads.split(",") if w)
    unknown = [w for w in s.workloads if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; expected some of {sorted(WORKLOADS)}")
    s.modes = tuple(args.modes.split(","))
    if args.dtypes == "auto":
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            s.dtypes = ("fp32", "bf16")
        else:
            s.dtypes = ("fp32",)
            notes.append("bfloat16 timings were not run: this CPU has no native bf16 matrix multiply (oneDNN reports "
                         "no bf16 support, so bf16 `torch.mm` falls back to a reference kernel; see the measured "
                         "bf16 peak above). Pass `--dtypes fp32,bf16` to force them.")
    else:
        s.dtypes = tuple(args.dtypes.split(","))
        bad = [d for d in s.dtypes if d not in DTYPES]
        if bad:
            raise SystemExit(f"unknown dtypes {bad}; expected fp32 and/or bf16")
    s.memory = not args.no_memory
    return s, notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe_memory:
        spec = json.loads(args.probe_memory)
        settings = Settings(**spec["settings"])
        print(json.dumps(memory_probe(settings, spec["impl"], spec["workload"], spec["mode"], spec["dtype"])))
        return 0
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        write_outputs(results, args.out, args.update_doc)
        return 0
    settings, notes = settings_from_args(args)
    torch.set_num_threads(settings.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "settings": asdict(settings),
                     "machine": machine_info(settings), "load_before": os.getloadavg()[0], "notes": notes,
                     "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}
    results["peak"] = {d: matmul_peak(d, args.quick) for d in ("fp32", "bf16")}
    log("matmul peak: " + ", ".join(f"{d} {p['gflops']:.1f} GFLOP/s" for d, p in results["peak"].items()))
    results["timings"], results["agreement"] = [], {}
    if not args.memory_only:
        results["bf16_check"] = check_bf16(settings, args.quick)
        log(f"bf16 vs fp32: {results['bf16_check']}")
        results["timings"], results["agreement"] = run_timings(settings, log)
    if settings.memory:
        mem = settings
        if args.quick:  # the two workloads with memory targets, training step only
            keep = tuple(w for w in settings.workloads if w in ("image224", "vqa480")) or settings.workloads
            mem = Settings(**{**asdict(settings), "modes": ("train",), "workloads": keep})
        results["memory"] = run_memory(mem, log)
    if not args.no_generation and not args.memory_only:
        results["generation"] = run_generation(settings, log)
    results["load_after"] = os.getloadavg()[0]
    # The peak is measured again at the end and the better figure kept: a busy machine only ever lowers it.
    for dtype, again in ((d, matmul_peak(d, args.quick)) for d in ("fp32", "bf16")):
        if again["gflops"] > results["peak"][dtype]["gflops"]:
            results["peak"][dtype] = again

    args.out.mkdir(parents=True, exist_ok=True)
    _atomic_write(args.out / "results.json", json.dumps(results, indent=1, default=str))
    write_outputs(results, args.out, args.update_doc)
    log(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'speedup.png'}")
    return 0


def write_outputs(results: dict, out: Path, doc: Path | None) -> None:
    """results.md and speedup.png under `out`; the bench block of `doc` when given."""
    out.mkdir(parents=True, exist_ok=True)
    block = render_markdown(results)
    _atomic_write(out / "results.md", block)
    render_chart(results, out / "speedup.png")
    if doc is not None:
        update_doc(doc, block)


if __name__ == "__main__":
    raise SystemExit(main())
