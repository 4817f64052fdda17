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

QUICKSTART_STEPS = 500
QUICKSTART_IMAGES = 2000
#: The quickstart must end within this many seconds on a 2-core CPU; pretraining gets what is left of it.
QUICKSTART_BUDGET_S = 15 * 60
#: Seconds kept back for the held-out evaluation, the export and the report after pretraining stops.
_RESERVE_S = 75

# The quickstart recipe (measured on 2 CPU cores; docs/pretraining.md has the timings): 16 samples per stream
# per step, a 1.5e-3 peak lr with a short warmup, a 64-code visual tokenizer trained for 200 steps, and one torch
# thread (with two threads, OpenMP's busy-waiting makes every step several times slower as soon as anything else
# runs on the machine; set --threads 0 to let torch choose).
QUICKSTART_OVERRIDES: dict[str, object] = {
    "data.image_batch": 16,
    "data.text_batch": 16,
    "data.pair_batch": 16,
    "data.visual_tokenizer_steps": 200,
    "data.visual_tokenizer_codes": 64,
    "data.text_vocab_size": 256,
    "optim.lr": 1.5e-3,
    "schedule.warmup_steps": 30,
    "checkpoint.save_every": 100,
    "checkpoint.resume": True,
    "data.heldout_batches": 16,
    "parallel.threads": 1,
}


def quickstart(
    out: str | os.PathLike = "quickstart",
    max_steps: int | None = None,
    num_images: int | None = None,
    seed: int = 0,
    overrides: dict[str, object] | None = None,
    budget_s: float | None = QUICKSTART_BUDGET_S,
) -> Path:
    """Run the quickstart and return the path of ``report.md``.

    Args:
        out: output folder (data, tokenizers, checkpoints, model, report).
        max_steps: pretraining steps (default :data:`QUICKSTART_STEPS`).
        num_images: images in the synthetic world (default :data:`QUICKSTART_IMAGES`).
        seed: seed of the world and of the run.
        overrides: further ``section.key`` config overrides.
        budget_s: wall-clock budget of the whole quickstart; pretraining stops early (at a checkpoint, said in the
            report) when it would leave less than about a minute for the evaluation and report. ``None``: no limit.
    """
    from imglish.data.synthetic import WorldConfig, generate_world
    from imglish.training.config import build_config
    from imglish.training.pretrain import pretrain

    out = Path(out)
    t0 = time.perf_counter()
    data = out / "data"
    if not (data / "world.json").exists():
        print(f"[1/4] generating the synthetic world in {data}")
        generate_world(
            WorldConfig(
                num_images=num_images or QUICKSTART_IMAGES,
                image_size=64,
                seed=seed,
                formats=("coco", "imagenet", "text", "wds"),
            ),
            data,
            progress=True,
        )
    t_world = time.perf_counter() - t0
    ov: dict[str, object] = dict(QUICKSTART_OVERRIDES)
    ov.update(
        {
            "out": str(out),
            "data.path": str(data),
            "seed": seed,
            "schedule.max_steps": max_steps or QUICKSTART_STEPS,
        }
    )
    ov.update(overrides or {})
    cfg = build_config("tiny", overrides=ov)
    print(
        "[2/4] text tokenizer, [3/4] visual tokenizer (reused from OUT/tokenizers when present), [4/4] pretraining"
    )
    timings = {"world": t_world}
    summary = pretrain(cfg, before_training=_time_limit_setter(cfg, t0, budget_s, timings))
    timings["pretraining"] = summary.elapsed_s
    elapsed = time.perf_counter() - t0
    return write_report(out, summary, cfg, elapsed, timings)


def _time_limit_setter(cfg, t0: float, budget_s: float | None, timings: dict[str, float]):
    """A hook run just before the training loop: gives pretraining what is left of the budget."""

    def hook() -> None:
        now = time.perf_counter() - t0
        timings["tokenizers"] = now - timings["world"]
        if budget_s:
            left = budget_s - now - _RESERVE_S
            cfg.schedule.time_limit_s = max(left, 1.0)

    return hook


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


def write_report(out: Path, summary, cfg, elapsed_s: float, timings: dict[str, float] | None = None) -> Path:
    """Write ``OUT/report.md`` and ``OUT/loss_curves.png`` from a :class:`PretrainSummary` (every figure measured).

    Args:
        out: the run folder.
        summary: what :func:`imglish.training.pretrain.pretrain` returned.
        cfg: the run's :class:`TrainConfig`.
        elapsed_s: wall time of the whole quickstart.
        timings: seconds per stage (``world``, ``tokenizers``, ``pretraining``).
    """
    timings = timings or {}
    _plot(summary.history, out / "loss_curves.png")
    names = {
        "image.mim": "images (MIM, visual codes)",
        "text.mlm": "texts (MLM)",
        "pair.mlm": "image-text pairs (MLM)",
        "pair.mim": "image-text pairs (MIM)",
    }
    lines = [
        "# imglish quickstart report",
        "",
        (
            f"Tiny BEiT-3 (`{cfg.model.name}`, {cfg.model.img_size}x{cfg.model.img_size} images, patch "
            f"{cfg.model.patch_size}) pretrained with masked data modeling for {summary.steps} steps on the synthetic "
            f"world in `{cfg.data.path}`; batches per step: {cfg.data.image_batch} images, {cfg.data.text_batch} "
            f"texts, {cfg.data.pair_batch} pairs; peak lr {cfg.optim.lr:g}; {cfg.parallel.precision}."
        ),
        "",
    ]
    if summary.stopped_early:
        lines += [
            (
                f"**Stopped early** at step {summary.steps} of {cfg.schedule.max_steps}: the machine was too slow to "
                f"finish every step within the quickstart's time budget (`schedule.time_limit_s` = "
                f"{cfg.schedule.time_limit_s:.0f} s of pretraining). `imglish pretrain --config {out / 'config.json'} "
                "--resume` continues the run."
            ),
            "",
        ]
    lines += [
        (
            "Held-out masked-token accuracy (validation split of the world, never trained on), next to a trivial "
            "baseline that always predicts the most frequent training target of that stream:"
        ),
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
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    lines += [
        "",
        (
            f"Training loss (sum over streams): {first.get('loss', float('nan')):.3f} at step {int(first.get('step', 0))}, "
            f"{last.get('loss', float('nan')):.3f} at step {int(last.get('step', 0))}. Curves: `loss_curves.png`."
        ),
        "",
        f"Skipped steps (non-finite): {summary.skipped_steps}. Bad records skipped: {sum(summary.bad_records.values())}.",
        (
            f"Throughput: {summary.samples_per_s:.1f} samples/s (all streams). Total wall time: {elapsed_s / 60:.1f} min "
            f"({stages}), on {platform.machine()} with {torch.get_num_threads()} torch thread(s)."
        ),
        "",
        f"Model: `{summary.model_path}`. Configuration: `{out / 'config.json'}`.",
        "",
        (
            "Reproduce: `imglish quickstart --out DIR` (the timings depend on the machine and its load; the accuracies "
            "do not, unless the run stops early)."
        ),
        "",
    ]
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path
