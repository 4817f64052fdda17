"""``imglish quickstart``: the paper in miniature on the embedded synthetic world, on a CPU, in minutes.

1. ``imglish.data.synthetic.generate_world`` writes the world into ``OUT/data``;
2. :func:`imglish.training.pretrain.pretrain` trains the text tokenizer (SentencePiece) and a tiny VQ-KD visual
   tokenizer on it, then pretrains a tiny BEiT-3 with masked data modeling (``OUT/model.safetensors``);
3. :func:`imglish.training.finetune.finetune` fine-tunes every downstream task twice, with the same recipe, data,
   steps and seed: from the pretrained model (``OUT/finetune/TASK/pretrained``) and from random weights
   (``OUT/finetune/TASK/scratch``), each on a small labelled subset, and evaluates both on the test split;
4. ``OUT/report.md`` (with ``OUT/finetune.png`` and ``OUT/loss_curves.png``) and ``OUT/results.json`` put the two
   sides next to each other, with the held-out masked-token accuracy of pretraining and the wall time per stage.

Every stage that finished is reused by a second run on the same OUT; an interrupted one resumes from its newest
checkpoint.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "QUICKSTART_FINETUNE",
    "QUICKSTART_TASKS",
    "VISUAL_TOKENIZER_CHOICES",
    "finetune_config",
    "quickstart",
    "write_report",
]

QUICKSTART_STEPS = 1000
QUICKSTART_IMAGES = 2000
#: The quickstart must end within this many seconds on a 2-core CPU; pretraining gets what is left of it.
QUICKSTART_BUDGET_S = 15 * 60
#: Seconds kept back for the held-out evaluation, the export and the report after pretraining stops.
_RESERVE_S = 45
#: The world's formats the quickstart's tasks read.
WORLD_FORMATS = ("coco", "imagenet", "text", "wds", "vqav2", "nlvr2")

# The quickstart recipe (measured on 2 CPU cores; docs/quickstart.md has the timings): 64-pixel images in 16-pixel
# patches, 32 samples per stream per step, a 5e-4 peak lr, no crop/flip/colour jitter (the world's captions name
# colours, sizes and sides), and a semantic visual tokenizer: 256 k-means codes of the patch features of a small
# conv CLIP trained for 300 steps of 128 on the world's pairs (imglish.tokenizers.kmeans), looked up from a
# precomputed file. Pretraining uses every core and bf16 autocast where the CPU has native bf16 kernels
# (resolved when the quickstart starts: see _precision). A one-layer [CLS] head (objective.cls_head_layers) re-predicts
# the masked targets from the last layer's first tokens and the embeddings, so that the pooled tokens are pretrained
# too. See docs/quickstart.md for why the values are what they are.
QUICKSTART_OVERRIDES: dict[str, object] = {
    "model.patch_size": 16,
    "model.init_std": 0.05,
    "model.pos_init_std": 0.02,
    "data.image_batch": 32,
    "data.text_batch": 32,
    "data.pair_batch": 32,
    "data.visual_tokenizer_kind": "kmeans",
    "data.visual_tokenizer_steps": 300,
    "data.visual_tokenizer_batch": 128,
    "data.visual_tokenizer_codes": 256,
    "data.visual_targets": "precomputed",
    "data.text_vocab_size": 256,
    "data.augment": False,
    "optim.lr": 5e-4,
    "schedule.warmup_steps": 30,
    "checkpoint.save_every": 100,
    "checkpoint.resume": True,
    "data.heldout_batches": 16,
    "parallel.threads": 0,
    # BEiT v2's [CLS] head, reading the embeddings: trains the pooled tokens that VQA, NLVR2 and retrieval read
    "objective.cls_head_layers": 1,
    "objective.cls_head_from": 0,
}

#: ``imglish quickstart --visual-tokenizer``: what each choice changes in :data:`QUICKSTART_OVERRIDES`
#: (``vqkd`` is the recipe before 2026-12-06).
VISUAL_TOKENIZER_CHOICES: dict[str, dict[str, object]] = {
    "kmeans": {},
    "vqkd": {"data.visual_tokenizer_kind": "vqkd", "data.visual_tokenizer_codes": 64,
             "data.visual_tokenizer_steps": 200, "data.visual_targets": "online"},
}


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX-512 BF16 or AMX): then bf16 autocast is about 1.5-2x
    faster than float32; elsewhere (AVX2) it is slower."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, c, lambda: False)()) for c in checks)


def _precision() -> str:
    return "bf16" if native_bf16() else "fp32"


#: The downstream tasks of the quickstart: classification, VQA, visual reasoning, retrieval and captioning.
QUICKSTART_TASKS = ("imagenet", "vqav2", "nlvr2", "coco_retrieval", "coco_captioning")

#: What the quickstart changes in each task's ``<task>_tiny`` preset: the low-label regime (a seeded subset of
#: ``task.max_train_examples`` training records) and the steps that fit in the budget. The same values hold for
#: the pretrained and the from-scratch side.
QUICKSTART_FINETUNE: dict[str, dict[str, object]] = {
    "imagenet": {"task.max_train_examples": 300},
    # 300 steps: with the recipe's head lr x20 the pretrained side pulls away after the first 100 (docs/quickstart.md)
    "vqav2": {"task.max_train_examples": 1000, "schedule.max_steps": 300},
    "nlvr2": {"task.max_train_examples": 1000},
    "coco_retrieval": {"task.max_train_examples": 500, "optim.lr": 1e-4},
    "coco_captioning": {"task.max_train_examples": 500, "schedule.max_steps": 300},
}
#: Seconds of one quickstart fine-tune of each task, two at a time on 2 cores of an AMD EPYC (docs/quickstart.md):
#: what pretraining leaves for them (with a 20% margin), and how the fine-tuning budget is shared out.
_FINETUNE_COST = {"imagenet": 20, "vqav2": 40, "nlvr2": 25, "coco_retrieval": 85, "coco_captioning": 96,
                  "flickr30k": 85, "nocaps": 96}
_FINETUNE_MARGIN = 1.2
SIDES = ("pretrained", "scratch")
STATE_FILE = "quickstart.json"


def _load_state(out: Path) -> dict[str, Any]:
    path = out / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_state(out: Path, state: dict[str, Any]) -> None:
    from imglish.training.evaluate import write_json

    write_json(out / STATE_FILE, state)


def quickstart(
    out: str | os.PathLike = "quickstart",
    max_steps: int | None = None,
    num_images: int | None = None,
    seed: int = 0,
    overrides: dict[str, object] | None = None,
    budget_s: float | None = QUICKSTART_BUDGET_S,
    tasks: Sequence[str] | None = None,
    init: str | os.PathLike | None = None,
    finetune_overrides: dict[str, object] | None = None,
    jobs: int | None = None,
) -> Path:
    """Run the quickstart and return the path of ``report.md``.

    Args:
        out: output folder (data, tokenizers, checkpoints, model, fine-tunes, report).
        max_steps: pretraining steps (default :data:`QUICKSTART_STEPS`).
        num_images: images in the synthetic world (default :data:`QUICKSTART_IMAGES`).
        seed: seed of the world, of pretraining and of every fine-tune.
        overrides: further ``section.key`` overrides of the pretraining config.
        budget_s: wall-clock budget of the whole quickstart, shared by pretraining and the fine-tunes; a stage
            that would overrun it stops early at a checkpoint (said in the report). ``None``: no limit.
        tasks: the downstream tasks (default :data:`QUICKSTART_TASKS`; an empty sequence stops after pretraining).
        init: skip pretraining and fine-tune from this pretrained ``model.safetensors`` (with its Processor).
        finetune_overrides: ``section.key`` overrides applied to every fine-tune (both sides).
        jobs: fine-tunes run at once, each in its own process with one torch thread (default: 2 when the
            machine has 2 cores or more); 1 runs them one after the other in this process.
    """
    from imglish.data.synthetic import WorldConfig, generate_world
    from imglish.training.config import build_config
    from imglish.training.recipes import TASK_NAMES

    tasks = tuple(QUICKSTART_TASKS if tasks is None else tasks)
    n_jobs = _jobs(jobs)  # checked before anything runs
    for t in tasks:
        if t not in TASK_NAMES:
            raise ValueError(f"unknown task {t!r} in tasks; expected some of {', '.join(TASK_NAMES)}")
    if init is not None:
        _check_init(init)
    for t in tasks:  # a bad fine-tune override is named now, not after pretraining
        build_config(f"{t}_tiny", overrides=dict(QUICKSTART_FINETUNE.get(t, {}), **(finetune_overrides or {})))
    out = Path(out)
    data = out / "data"
    cfg = None
    if init is None:  # the pretraining config, checked before the world is drawn
        ov: dict[str, object] = dict(QUICKSTART_OVERRIDES, **{"parallel.precision": _precision()})
        ov.update({"out": str(out), "data.path": str(data), "seed": seed,
                   "schedule.max_steps": max_steps or QUICKSTART_STEPS})
        ov.update(overrides or {})
        cfg = build_config("tiny", overrides=ov)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    state = _load_state(out)
    timings: dict[str, float] = dict(state.get("timings", {}))
    if not (data / "world.json").exists():
        print(f"[1/4] generating the synthetic world in {data}")
        generate_world(
            WorldConfig(num_images=num_images or QUICKSTART_IMAGES, image_size=64, seed=seed, formats=WORLD_FORMATS),
            data,
            progress=True,
        )
        timings["world"] = time.perf_counter() - t0
    _check_world(data, tasks)
    finetune_cost = _FINETUNE_MARGIN * sum(_FINETUNE_COST.get(t, 60) for t in tasks) * len(SIDES) / n_jobs

    summary = None
    if cfg is not None:
        summary = _finished_pretraining(out, budget_s)
        if summary is None:
            print("[2/4] text tokenizer, [3/4] visual tokenizer (reused from OUT/tokenizers when present), "
                  "[4/4] pretraining")
            from imglish.training.pretrain import pretrain

            t_start = time.perf_counter()
            hook = _time_limit_setter(cfg, t0, budget_s, timings, finetune_cost, t_start)
            summary = pretrain(cfg, before_training=hook)
            timings["pretraining"] = time.perf_counter() - t_start - timings.get("tokenizers", 0.0)
            state["pretraining_done"] = True
        else:
            print(f"pretraining: reusing {summary.model_path} ({summary.steps} steps)")
        init = summary.model_path
    state["timings"] = timings
    _save_state(out, state)

    results: dict[str, dict[str, Any]] = {}
    if tasks:
        results = _finetune_all(out, data, Path(init), tasks, seed, finetune_overrides or {}, n_jobs, budget_s, t0,
                                timings)
    elapsed = time.perf_counter() - t0 + state.get("elapsed_before_s", 0.0)
    state["elapsed_before_s"] = elapsed
    state["timings"] = timings
    _save_state(out, state)
    return write_report(out, summary, cfg, elapsed, timings, results=results, init=str(init))


def _jobs(jobs: int | None) -> int:
    if jobs is not None:
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}")
        return jobs
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def _check_init(init: str | os.PathLike) -> None:
    """``--init`` must be a model written by imglish (its architecture is in the file), checked before anything runs."""
    from imglish.model.loading import read_checkpoint_metadata

    if not Path(init).is_file():
        raise FileNotFoundError(f"--init {str(init)!r} does not exist (expected a pretrained model.safetensors)")
    meta = read_checkpoint_metadata(init)
    if meta.get("format") != "imglish/1":
        raise ValueError(
            f"--init {str(init)!r} is not a model written by imglish (no imglish/1 metadata): give the "
            "model.safetensors of `imglish pretrain` or of an earlier quickstart"
        )


def _check_world(data: Path, tasks: Sequence[str]) -> None:
    """A world from an earlier quickstart may lack a format a task needs: say which and how to fix it."""
    need = {"imagenet": "imagenet", "vqav2": "vqav2", "nlvr2": "nlvr2", "coco_retrieval": "coco",
            "coco_captioning": "coco", "flickr30k": "flickr30k", "nocaps": "nocaps"}
    missing = sorted({need[t] for t in tasks if not (data / need[t]).is_dir()})
    if missing:
        raise FileNotFoundError(
            f"the world in {data} has no {', '.join(missing)} folder (made by an older quickstart?): delete "
            f"{data} to regenerate it, or write it with `imglish data shapes --out {data} --overwrite`"
        )


def _finished_pretraining(out: Path, budget_s: float | None) -> Any:
    """The :class:`PretrainSummary` of a pretraining that already ended in ``out``, else ``None``; one that the
    budget stopped early counts as unfinished when this run has no budget (it then resumes)."""
    from imglish.training.pretrain import PretrainSummary

    path = out / "summary.json"
    if not (path.is_file() and (out / "model.safetensors").is_file() and _load_state(out).get("pretraining_done")):
        return None
    summary = PretrainSummary(**json.loads(path.read_text()))
    if summary.stopped_early and budget_s is None:
        return None
    return summary


def finetune_config(
    task: str,
    side: str,
    out: str | os.PathLike,
    data: str | os.PathLike,
    init: str | os.PathLike,
    seed: int = 0,
    overrides: dict[str, object] | None = None,
) -> Any:
    """The configuration of one quickstart fine-tune: ``<task>_tiny`` with :data:`QUICKSTART_FINETUNE`.

    Both sides get the same recipe, data, steps, seed, architecture and text tokenizer (the pretrained model's):
    ``side="pretrained"`` starts from ``init``, ``side="scratch"`` from random weights of the same shape.
    """
    from imglish.model.loading import read_checkpoint_metadata
    from imglish.tokenizers.processor import Processor
    from imglish.training.config import build_config

    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    meta = read_checkpoint_metadata(init)
    arch = meta.get("config", {}) if meta.get("format") == "imglish/1" else {}
    ov: dict[str, object] = dict(QUICKSTART_FINETUNE.get(task, {}))
    ov.update({
        "out": str(out),
        "data.path": str(data),
        "seed": seed,
        "task.eval_split": "test",
        "checkpoint.resume": True,
        "parallel.threads": 1,
    })
    patch = arch.get("patch_size")
    if patch is not None:
        ov["model.patch_size"] = int(patch if isinstance(patch, int) else patch[0])
    proc = Processor.find_for(init)
    if proc is not None and proc.tokenizer is not None and proc.tokenizer.path is not None:
        ov["data.text_tokenizer"] = str(proc.tokenizer.path)
    if side == "pretrained":
        ov["model.init_from"] = str(init)
    ov.update(overrides or {})
    return build_config(f"{task}_tiny", overrides=ov)


def _summary_of(run: Path) -> dict[str, Any] | None:
    path = run / "summary.json"
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    d.pop("history", None)
    return d


def _run_one(cfg: Any) -> dict[str, Any]:
    """One fine-tune (in a worker process, or in this one)."""
    from imglish.training.finetune import finetune

    threads = torch.get_num_threads()
    try:
        s = finetune(cfg)
    finally:
        torch.set_num_threads(threads)
    d = asdict(s)
    d.pop("history", None)
    return d


def _finetune_all(out: Path, data: Path, init: Path, tasks: Sequence[str], seed: int, overrides: dict[str, object],
                  n_jobs: int, budget_s: float | None, t0: float,
                  timings: dict[str, float]) -> dict[str, dict[str, Any]]:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    runs = [(t, side) for t in tasks for side in SIDES]
    done: dict[tuple[str, str], dict[str, Any]] = {}
    todo = []
    for t, side in runs:
        run = out / "finetune" / t / side
        s = _summary_of(run)
        if s is not None and not (s.get("stopped_early") and budget_s is None):  # unlimited: finish early stops
            done[(t, side)] = s
        else:
            todo.append((t, side))
    print(f"fine-tuning: {len(runs)} runs ({len(runs) - len(todo)} reused), {n_jobs} at a time")
    t_ft = time.perf_counter()

    def make_cfg(t: str, side: str) -> Any:
        ov = {"logging.progress": n_jobs == 1}
        ov.update(overrides)
        cfg = finetune_config(t, side, out / "finetune" / t / side, data, init, seed, ov)
        if budget_s:
            left = budget_s - (time.perf_counter() - t0) - _RESERVE_S / 3
            remaining = [x for x in todo if x not in done]
            share = _FINETUNE_COST.get(t, 60) / max(sum(_FINETUNE_COST.get(x[0], 60) for x in remaining), 1)
            cfg.schedule.time_limit_s = max(left * share * n_jobs, 5.0)
        return cfg

    def finish(t: str, side: str, s: dict[str, Any]) -> None:
        done[(t, side)] = s
        # a finished fine-tune is reused through its summary.json: its resume checkpoints (about 90 MB each at the
        # tiny size, weights and optimizer state) are dead weight; its model.safetensors stays. One that the budget
        # stopped keeps them, to be finished by a run with no time limit.
        if not s.get("stopped_early"):
            shutil.rmtree(out / "finetune" / t / side / "checkpoints", ignore_errors=True)
        metric = _main_metric(t)
        print(f"  {t} ({side}): {metric} {s['metrics'].get(metric, float('nan')):.1f} "
              f"[{s['train_examples']} examples, {s['steps']} steps, {s['elapsed_s']:.0f} s]")

    if n_jobs == 1:
        for t, side in todo:
            finish(t, side, _run_one(make_cfg(t, side)))
    elif todo:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=n_jobs, mp_context=ctx) as pool:
            pending = list(todo)
            futures: dict[Any, tuple[str, str]] = {}
            while pending or futures:
                while pending and len(futures) < n_jobs:
                    t, side = pending.pop(0)
                    futures[pool.submit(_run_one, make_cfg(t, side))] = (t, side)
                finished, _ = wait(list(futures), return_when=FIRST_COMPLETED)
                for f in finished:
                    t, side = futures.pop(f)
                    finish(t, side, f.result())
    if todo:
        timings["finetuning"] = timings.get("finetuning", 0.0) + time.perf_counter() - t_ft
    results: dict[str, dict[str, Any]] = {}
    for t in tasks:
        metric = _main_metric(t)
        pre, scr = done[(t, "pretrained")], done[(t, "scratch")]
        results[t] = {
            "metric": metric,
            "pretrained": pre["metrics"].get(metric),
            "scratch": scr["metrics"].get(metric),
            "train_examples": pre["train_examples"],
            "steps": {"pretrained": pre["steps"], "scratch": scr["steps"]},
            "stopped_early": bool(pre.get("stopped_early") or scr.get("stopped_early")),
            "split": pre.get("split", "test"),
        }
    return results


def _main_metric(task: str) -> str:
    from imglish.tasks import get_task

    return get_task(task).main_metric


def _time_limit_setter(cfg, t0: float, budget_s: float | None, timings: dict[str, float], finetune_s: float,
                       t_start: float):
    """A hook run just before the training loop: gives pretraining what the budget leaves after the fine-tunes."""

    def hook() -> None:
        now = time.perf_counter()
        timings["tokenizers"] = now - t_start
        if budget_s:
            left = budget_s - (now - t0) - _RESERVE_S - finetune_s
            cfg.schedule.time_limit_s = max(left, 1.0)

    return hook


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    """Write a PNG atomically (tmp file + rename) and free the figure."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _plot(history: list[dict[str, float]], path: Path) -> None:
    plt = _pyplot()
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
    _save_figure(fig, path)


def _plot_comparison(results: dict[str, dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(2.4 * len(names) + 0.6, 3.4), squeeze=False)
    for ax, t in zip(axes[0], names):
        r = results[t]
        vals = [r["pretrained"] or 0.0, r["scratch"] or 0.0]
        bars = ax.bar(["pretrained", "scratch"], vals, color=["tab:blue", "tab:gray"])
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{t}\n({r['train_examples']} labelled)", fontsize=9)
        ax.set_ylabel(r["metric"], fontsize=8)
        ax.set_ylim(0, max(vals + [1.0]) * 1.2)
        ax.tick_params(labelsize=8)
    fig.suptitle("imglish quickstart: fine-tuned from the pretrained model vs from random weights (test split)",
                 fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


_STREAM_NAMES = {
    "image.mim": "images (MIM, visual codes)",
    "text.mlm": "texts (MLM)",
    "pair.mlm": "image-text pairs (MLM)",
    "pair.mim": "image-text pairs (MIM)",
    "image.cls_mim": "images, [CLS] head (MIM)",
    "text.cls_mlm": "texts, [CLS] head (MLM)",
    "pair.cls_mlm": "image-text pairs, [CLS] head (MLM)",
    "pair.cls_mim": "image-text pairs, [CLS] head (MIM)",
}


def _visual_tokenizer_words(cfg) -> str:
    d = cfg.data
    if d.visual_tokenizer:
        return f"`{d.visual_tokenizer}`"
    if d.visual_tokenizer_kind == "kmeans":
        return (f"k-means, {d.visual_tokenizer_codes} codes of the patch features of a conv CLIP trained for "
                f"{d.visual_tokenizer_steps} steps of {d.visual_tokenizer_batch} pairs")
    return (f"VQ-KD, {d.visual_tokenizer_codes} codes, {d.visual_tokenizer_steps} steps, teacher "
            f"`{d.visual_tokenizer_teacher}`")


def _cls_head_words(cfg) -> str:
    o = cfg.objective
    if not o.cls_head_layers:
        return ""
    source = "the embeddings" if o.cls_head_from == 0 else (
        "half the depth" if o.cls_head_from == -1 else f"layer {o.cls_head_from}")
    return (f" A {o.cls_head_layers}-layer [CLS] head re-predicts the masked targets from the last layer's first "
            f"tokens and {source} (weight {o.cls_head_weight:g}).")


def _pretraining_lines(out: Path, summary, cfg) -> list[str]:
    lines = [
        (
            f"Tiny BEiT-3 (`{cfg.model.name}`, {cfg.model.img_size}x{cfg.model.img_size} images, patch "
            f"{cfg.model.patch_size}) pretrained with masked data modeling for {summary.steps} steps on the synthetic "
            f"world in `{cfg.data.path}`; batches per step: {cfg.data.image_batch} images, {cfg.data.text_batch} "
            f"texts, {cfg.data.pair_batch} pairs; peak lr {cfg.optim.lr:g}; {cfg.parallel.precision}. "
            f"Visual tokenizer: {_visual_tokenizer_words(cfg)}.{_cls_head_words(cfg)}"
        ),
        "",
    ]
    if summary.stopped_early:
        lines += [
            (
                f"**Stopped early** at step {summary.steps} of {cfg.schedule.max_steps}: the machine was too slow to "
                f"finish every step within the quickstart's time budget (`schedule.time_limit_s` = "
                f"{cfg.schedule.time_limit_s:.0f} s of pretraining). `imglish quickstart` on the same OUT with "
                "`--no-time-limit` (or `imglish pretrain --config OUT/config.json --resume`) continues the run."
            ),
            "",
        ]
    lines += [
        (
            "Held-out masked-token accuracy (validation split of the world, never trained on), next to a trivial "
            "baseline that always predicts the most frequent training target of that stream:"
        ),
        "",
        "| stream | masked tokens | accuracy | baseline | loss | accuracy with another image |",
        "|---|---|---|---|---|---|",
    ]
    for key, m in summary.heldout.items():
        other = f"{m['other_image_accuracy']:.3f}" if "other_image_accuracy" in m else "-"
        lines.append(
            f"| {_STREAM_NAMES.get(key, key)} | {int(m['tokens'])} | {m['accuracy']:.3f} | "
            f"{m.get('baseline_accuracy', float('nan')):.3f} | {m['loss']:.3f} | {other} |"
        )
    if any("other_image_accuracy" in m for m in summary.heldout.values()):
        lines += [
            "",
            (
                "The last column scores each held-out caption with another pair's image: the gap to the accuracy "
                "with its own image is what the model reads from the image, the rest it guesses from the caption."
            ),
        ]
    first = summary.history[0] if summary.history else {}
    last = summary.history[-1] if summary.history else {}
    lines += [
        "",
        (
            f"Training loss (sum over streams): {first.get('loss', float('nan')):.3f} at step "
            f"{int(first.get('step', 0))}, {last.get('loss', float('nan')):.3f} at step {int(last.get('step', 0))}. "
            "Curves: `loss_curves.png`."
        ),
        "",
        f"Skipped steps (non-finite): {summary.skipped_steps}. Bad records skipped: {sum(summary.bad_records.values())}.",
        f"Throughput: {summary.samples_per_s:.1f} samples/s (all streams). Model: `{summary.model_path}`. "
        f"Configuration: `{out / 'config.json'}`.",
        "",
    ]
    return lines


def write_report(
    out: Path,
    summary,
    cfg,
    elapsed_s: float,
    timings: dict[str, float] | None = None,
    results: dict[str, dict[str, Any]] | None = None,
    init: str | None = None,
) -> Path:
    """Write ``OUT/report.md``, ``OUT/results.json`` and the PNGs (every figure measured).

    Args:
        out: the run folder.
        summary: what :func:`imglish.training.pretrain.pretrain` returned (``None`` when pretraining was skipped).
        cfg: the pretraining :class:`TrainConfig` (``None`` when skipped).
        elapsed_s: wall time of the whole quickstart.
        timings: seconds per stage (``world``, ``tokenizers``, ``pretraining``, ``finetuning``).
        results: per task, what :func:`quickstart` measured on both sides.
        init: the pretrained model the fine-tunes started from.
    """
    out = Path(out)
    timings = timings or {}
    results = results or {}
    lines = ["# imglish quickstart report", ""]
    if results:
        n_runs = 2 * len(results)
        lines += [
            "## Pretrained against from scratch",
            "",
            (
                f"Each task fine-tuned twice with the same recipe (its `<task>_tiny` preset with the quickstart's "
                f"low-label settings), data, steps and seed: once from the pretrained model `{init}`, once from "
                f"random weights of the same architecture ({n_runs} runs). Each side sees only the labelled "
                "training examples in the table (a seeded subset of the world's training split) and is evaluated "
                "on the test split, with the metric of the task's `metrics.json`:"
            ),
            "",
            "| task | metric | pretrained | from scratch | difference | labelled examples | steps |",
            "|---|---|---|---|---|---|---|",
        ]
        better: list[str] = []  # tasks where the pretrained side is ahead
        for t, r in results.items():
            pre, scr = r["pretrained"], r["scratch"]
            diff = (pre - scr) if pre is not None and scr is not None else float("nan")
            if diff > 0:
                better.append(t)
            steps = r["steps"]
            step_txt = str(steps["pretrained"]) if steps["pretrained"] == steps["scratch"] else (
                f"{steps['pretrained']} / {steps['scratch']}")
            lines.append(f"| {t} | {r['metric']} | {pre:.1f} | {scr:.1f} | {diff:+.1f} | {r['train_examples']} | "
                         f"{step_txt} |")
        early = [t for t, r in results.items() if r["stopped_early"]]
        lines += ["", "Chart: `finetune.png`. The models: `finetune/TASK/pretrained/` and `finetune/TASK/scratch/`."]
        worse = [t for t in results if t not in better]
        verdict = (f"ahead on every task ({', '.join(better)})" if not worse else
                   f"ahead on {', '.join(better) or 'no task'}, not on {', '.join(worse)}")
        lines += [
            "",
            (
                f"The pretrained side is {verdict}, in this one-seed run. docs/quickstart.md has the seed-to-seed "
                "spread and, under \"What transfers, what does not, and why\", the measurements of why the tasks "
                "that read pooled features do not transfer yet."
            ),
        ]
        if early:
            lines += [
                "",
                (
                    f"**Stopped early** by the time budget: {', '.join(early)} (see the steps column); a second "
                    "`imglish quickstart` on the same OUT with `--no-time-limit` finishes them from their newest "
                    "checkpoint."
                ),
            ]
        lines += [
            "",
            (
                "Reproduce one number: `imglish evaluate TASK --data "
                f"{out / 'data'} --checkpoint {out / 'finetune'}/TASK/pretrained/model.safetensors --split test`."
            ),
            "",
        ]
        _plot_comparison(results, out / "finetune.png")
    if summary is not None:
        lines += ["## Pretraining", ""] + _pretraining_lines(out, summary, cfg)
        _plot(summary.history, out / "loss_curves.png")
    elif init:
        lines += ["## Pretraining", "", f"Skipped: the fine-tunes started from `{init}`.", ""]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    lines += [
        "## Wall time",
        "",
        (
            f"{elapsed_s / 60:.1f} min in all ({stages}), on {platform.machine()} ({_cpu_name()}) with "
            f"{os.cpu_count()} CPU core(s)."
        ),
        "",
        "## What is reproducible",
        "",
        (
            "Every random choice (world, masks, crops, subsets, initialisation, batch order) is seeded, so the same "
            "command on the same machine, with the same torch build and thread count, gives the same numbers. "
            "Another CPU can give slightly different ones: its matrix kernels (AVX2, AVX-512, AMX) add in another "
            "order, the rounding differences grow over training, and a held-out accuracy or a fine-tuned metric can move "
            "by a fraction of a point to a point. A stage that the time budget stops early "
            "also changes the figures; the timings depend on the machine and its load."
        ),
        "",
    ]
    path = out / "report.md"
    _atomic_text(path, "\n".join(lines))
    payload: dict[str, Any] = {
        "tasks": {
            t: {k: r[k] for k in ("metric", "pretrained", "scratch", "train_examples", "steps", "stopped_early",
                                  "split")}
            for t, r in results.items()
        },
        "pretraining": {},
        "init": init,
        "elapsed_s": elapsed_s,
        "timings": timings,
        "machine": {"arch": platform.machine(), "cpu": _cpu_name(), "cores": os.cpu_count(),
                    "torch": torch.__version__},
    }
    if summary is not None:
        payload["pretraining"] = {
            "steps": summary.steps,
            "max_steps": cfg.schedule.max_steps,
            "stopped_early": summary.stopped_early,
            "heldout": summary.heldout,
            "model": summary.model_path,
        }
    from imglish.training.evaluate import write_json

    write_json(out / "results.json", payload)
    return path


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
