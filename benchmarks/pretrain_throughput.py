"""Training throughput of masked data modeling pretraining: samples/s per stream and tokens/s.

One optimizer step is what ``imglish.training.trainer.Trainer.train_step`` does: the ``MaskedDataModeling`` loss
over the three streams (images with 40% of patches masked, texts with 15% of tokens masked, image-text pairs with
50% of the text masked), backward, gradient clipping, fused AdamW over the official parameter groups, under bf16
autocast when asked. Inputs are random tensors of the right shapes and the visual targets are random codes, so the
figures are those of the model and optimizer alone (no data loading, no visual tokenizer).

For each configuration it times the combined step (all three streams) and each stream on its own, after warmup
steps, and prints one Markdown table row per measurement (and JSON lines with ``--json FILE``).

Example:
    python benchmarks/pretrain_throughput.py --preset tiny --precision fp32 bf16 --threads 1
    python benchmarks/pretrain_throughput.py --preset base --batch 2 --steps 2 --warmup 1 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from typing import Any

import torch

STREAMS = ("image", "text", "pair")


def make_batch(
    stream: str, b: int, side: int, img: int, t: int, vocab: int, codes: int, cfg: Any, g: torch.Generator
) -> dict[str, torch.Tensor]:
    """A random micro-batch of one stream in the layout of ``imglish.training.streams.SampleMaker``."""
    n = side * side
    out: dict[str, torch.Tensor] = {}
    if stream in ("image", "pair"):
        out["image"] = torch.randn(b, 3, img, img, generator=g)
        out["visual_targets"] = torch.randint(0, codes, (b, n), generator=g)
        ratio = cfg.objective.image_mask_ratio if stream == "image" else cfg.objective.pair_image_mask_ratio
        if ratio > 0:
            k = round(ratio * n)
            mask = torch.zeros(b, n, dtype=torch.bool)
            for i in range(b):
                mask[i, torch.randperm(n, generator=g)[:k]] = True
            out["image_mask"] = mask
    if stream in ("text", "pair"):
        ids = torch.randint(4, vocab - 1, (b, t), generator=g)
        prob = cfg.objective.text_mask_prob if stream == "text" else cfg.objective.pair_text_mask_prob
        tmask = torch.rand(b, t, generator=g) < prob
        tmask[:, 0] = False
        tmask[torch.arange(b), 1] = True  # at least one target per row
        out["text_targets"] = ids.clone()
        ids[tmask] = vocab - 1
        out["text_ids"] = ids
        out["padding_mask"] = torch.zeros(b, t, dtype=torch.long)
        out["text_mask"] = tmask
    return out


def tokens_of(batch: dict[str, dict[str, torch.Tensor]]) -> int:
    """Input tokens the model processes for a batch (image patches plus text positions)."""
    n = 0
    for part in batch.values():
        if "visual_targets" in part:
            n += part["visual_targets"].numel()
        if "text_ids" in part:
            n += part["text_ids"].numel()
    return n


def measure(
    preset: str,
    precision: str,
    batch: int,
    steps: int,
    warmup: int,
    vocab: int,
    codes: int,
    streams: tuple[str, ...],
) -> dict[str, Any]:
    """Time ``steps`` optimizer steps over ``streams`` (``batch`` samples each); returns the figures."""
    import imglish
    from imglish.tasks.pretraining import MaskedDataModeling
    from imglish.training.config import get_preset
    from imglish.training.optim import build_optimizer

    cfg = get_preset(preset)
    torch.manual_seed(0)
    model = imglish.create_model(
        cfg.model.name,
        img_size=cfg.model.img_size,
        patch_size=cfg.model.patch_size,
        vocab_size=vocab,
        num_visual_tokens=codes,
        drop_path_rate=cfg.model.drop_path_rate,
    )
    if cfg.parallel.activation_checkpointing:
        model.beit3.set_grad_checkpointing(True)
    mdm = MaskedDataModeling(model).train()
    opt = build_optimizer(
        model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas, cfg.optim.eps, fused=True
    )
    side = cfg.model.img_size // cfg.model.patch_size
    g = torch.Generator().manual_seed(0)
    data = {
        s: make_batch(s, batch, side, cfg.model.img_size, cfg.data.max_text_len, vocab, codes, cfg, g)
        for s in streams
    }
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )

    def step() -> None:
        with autocast:
            loss = mdm(data).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t0) / steps
    return {
        "preset": preset,
        "model": cfg.model.name,
        "img_size": cfg.model.img_size,
        "patch_size": cfg.model.patch_size,
        "text_len": cfg.data.max_text_len,
        "precision": precision,
        "streams": "+".join(streams),
        "batch_per_stream": batch,
        "s_per_step": dt,
        "samples_per_s_per_stream": batch / dt,
        "samples_per_s": batch * len(streams) / dt,
        "tokens_per_s": tokens_of(data) / dt,
        "threads": torch.get_num_threads(),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["tiny"], help="training presets (tiny, base)")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    p.add_argument("--batch", type=int, default=16, help="samples per stream per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--vocab", type=int, default=None, help="text vocabulary (default: the preset's)")
    p.add_argument("--codes", type=int, default=None, help="visual codebook size (default: the preset's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--per-stream", action="store_true", help="also time each stream on its own")
    p.add_argument("--json", default=None, help="append one JSON line per measurement to this file")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from imglish.training.config import get_preset

    print(
        f"# {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(
        "| preset | precision | streams | batch/stream | s/step | samples/s per stream | samples/s | tokens/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.preset:
        pc = get_preset(preset)
        vocab = args.vocab or pc.data.text_vocab_size
        codes = args.codes or pc.data.visual_tokenizer_codes
        groups = [STREAMS] + ([(s,) for s in STREAMS] if args.per_stream else [])
        for precision in args.precision:
            for streams in groups:
                r = measure(preset, precision, args.batch, args.steps, args.warmup, vocab, codes, streams)
                print(
                    f"| {preset} ({r['params_m']:.1f}M, {r['img_size']}px/p{r['patch_size']}, text {r['text_len']}) "
                    f"| {precision} | {r['streams']} | {args.batch} | {r['s_per_step']:.3f} | "
                    f"{r['samples_per_s_per_stream']:.2f} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} |",
                    flush=True,
                )
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
