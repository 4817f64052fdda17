"""``imglish quickstart``: the whole pipeline on the embedded synthetic world, on a CPU, in minutes.

1. ``imglish.data.synthetic.generate_world`` writes the world into ``OUT/data``;
2. :func:`imglish.training.pretrain.pretrain` trains the text tokenizer (SentencePiece) and a tiny VQ-KD visual
   tokenizer on it, then pretrains a tiny BEiT-3 with masked data modeling;
3. ``OUT/report.md`` states the measured held-out masked-token accuracy of each stream next to a most-frequent-token
   baseline, and ``OUT/loss_curves.png`` plots the per-stream training losses.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

__all__ = ["quickstart", "write_report"]

QUICKSTART_STEPS = 300
QUICKSTART_IMAGES = 2000


def quickstart(
    out: str | os.PathLike = "quickstart",
    max_steps: int | None = None,
    num_images: int | None = None,
    seed: int = 0,
    overrides: dict[str, str] | None = None,
) -> Path:
    """Run the quickstart and return the path of ``report.md``.

    Args:
        out: output folder (data, tokenizers, checkpoints, model, report).
        max_steps: pretraining steps (default :data:`QUICKSTART_STEPS`).
        num_images: images in the synthetic world (default :data:`QUICKSTART_IMAGES`).
        seed: seed of the world and of the run.
        overrides: further ``section.key`` config overrides.
    """
    from imglish.data.synthetic import WorldConfig, generate_world
    from imglish.training.config import build_config
    from imglish.training.pretrain import pretrain

    out = Path(out)
    t0 = time.perf_counter()
    data = out / "data"
    if not (data / "world.json").exists():
        generate_world(WorldConfig(num_images=num_images or QUICKSTART_IMAGES, image_size=64, seed=seed), data)
    t_world = time.perf_counter() - t0
    ov = {
        "out": str(out), "data.path": str(data), "seed": seed,
        "schedule.max_steps": max_steps or QUICKSTART_STEPS, "checkpoint.save_every": 100, "checkpoint.resume": True,
        "data.image_batch": 16, "data.text_batch": 16, "data.pair_batch": 16, "schedule.warmup_steps": 20,
    }
    ov.update(overrides or {})
    cfg = build_config("tiny", overrides=ov)
    summary = pretrain(cfg)
    elapsed = time.perf_counter() - t0
    return write_report(out, summary, cfg, elapsed, t_world)


def _plot(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    keys = sorted({k for row in history for k in row if k.startswith("loss/")})
    for k in keys:
        xs = [r["step"] for r in history if k in r]
        ax.plot(xs, [r[k] for r in history if k in r], label=k[5:])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy at masked tokens")
    ax.set_title("imglish quickstart: masked data modeling losses per stream")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(out: Path, summary, cfg, elapsed_s: float, world_s: float = 0.0) -> Path:
    """Write ``OUT/report.md`` and ``OUT/loss_curves.png`` from a :class:`PretrainSummary` (every figure measured)."""
    _plot(summary.history, out / "loss_curves.png")
    names = {"image.mim": "images (MIM, visual codes)", "text.mlm": "texts (MLM)", "pair.mlm": "image-text pairs (MLM)",
             "pair.mim": "image-text pairs (MIM)"}
    lines = [
        "# imglish quickstart report",
        "",
        f"Tiny BEiT-3 (`{cfg.model.name}`, {cfg.model.img_size}x{cfg.model.img_size} images, patch "
        f"{cfg.model.patch_size}) pretrained with masked data modeling for {summary.steps} steps on the synthetic "
        f"world in `{cfg.data.path}`; batches per step: {cfg.data.image_batch} images, {cfg.data.text_batch} texts, "
        f"{cfg.data.pair_batch} pairs.",
        "",
        "Held-out masked-token accuracy (validation split of the world, never trained on), next to a trivial "
        "baseline that always predicts the most frequent training target of that stream:",
        "",
        "| stream | masked tokens | accuracy | baseline | loss |",
        "|---|---|---|---|---|",
    ]
    for key, m in summary.heldout.items():
        lines.append(
            f"| {names.get(key, key)} | {int(m['tokens'])} | {m['accuracy']:.3f} | "
            f"{m.get('baseline_accuracy', float('nan')):.3f} | {m['loss']:.3f} |"
        )
    first = summary.history[0] if summary.history else {}
    last = summary.history[-1] if summary.history else {}
    lines += [
        "",
        f"Training loss (sum over streams): {first.get('loss', float('nan')):.3f} at step {int(first.get('step', 0))}, "
        f"{last.get('loss', float('nan')):.3f} at step {int(last.get('step', 0))}. Curves: `loss_curves.png`.",
        "",
        f"Skipped steps (non-finite): {summary.skipped_steps}. Bad records skipped: {sum(summary.bad_records.values())}.",
        f"Throughput: {summary.samples_per_s:.1f} samples/s (all streams). Total wall time: {elapsed_s / 60:.1f} min "
        f"(world generation {world_s:.0f} s), on {platform.machine()} with {torch.get_num_threads()} torch threads.",
        "",
        f"Model: `{summary.model_path}`. Configuration: `{out / 'config.json'}`.",
        "",
        "Reproduce: `imglish quickstart --out DIR` (figures vary with the machine's speed only in the timings).",
        "",
    ]
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path
