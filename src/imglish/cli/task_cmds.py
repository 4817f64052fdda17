"""``imglish finetune``, ``imglish evaluate`` and ``imglish score``: argument parsing only; the work is in
``imglish.training.finetune`` and ``imglish.training.evaluate``."""

from __future__ import annotations

import argparse
import json

from imglish.cli.train_cmds import _config_keys, _overrides

__all__ = ["register"]

_TASKS = ("imagenet", "vqav2", "nlvr2", "coco_retrieval", "flickr30k", "coco_captioning", "nocaps", "ade20k",
          "coco_detection")
_ORDER = "The configuration is a preset, then --config FILE (JSON), then these flags, then any --section.key VALUE."


def _add_config_keys(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("config keys", "every field of the configuration tree, as --section.key VALUE")
    for key in _config_keys():
        group.add_argument(f"--{key}", dest="cfg__" + key.replace(".", "__"), metavar="VALUE", default=argparse.SUPPRESS)


def _is_main_rank() -> bool:
    from imglish.training.parallel import launched_rank

    return launched_rank() == 0


def _print_metrics(doc: dict) -> None:
    print(json.dumps(doc, indent=1))


def _task_overrides(args: argparse.Namespace) -> dict[str, str]:
    ov = _overrides(args)
    if getattr(args, "strict", False):
        ov["data.strict"] = "true"
    return ov


def _finetune(args: argparse.Namespace) -> int:
    from imglish.training.config import build_config
    from imglish.training.finetune import finetune

    ov = _task_overrides(args)
    if args.init is not None:
        ov["model.init_from"] = args.init
    ov["task.name"] = args.task
    cfg = build_config(args.preset if args.preset or not args.config else None, args.config, ov, task=args.task)
    summary = finetune(cfg)
    if not _is_main_rank():  # under torchrun rank 0 reports
        return 0
    print(f"wrote {summary.model_path}")
    shown = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.metrics.items())
    print(f"{summary.task} {summary.split}: {shown}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from imglish.training.evaluate import evaluate, metrics_document

    ov = _task_overrides(args)
    ov.pop("out", None)
    ov.pop("data.path", None)
    result = evaluate(args.task, args.data, args.checkpoint, args.out, split=args.split, model=args.model,
                      preset=args.preset, overrides=ov)
    if _is_main_rank():
        _print_metrics(metrics_document(result))
    return 0


def _score(args: argparse.Namespace) -> int:
    from imglish.training.evaluate import score

    ov = _overrides(args)
    ov.pop("out", None)
    ov.pop("data.path", None)
    doc = score(args.task, args.data, args.predictions, split=args.split, out=args.out, preset=args.preset, overrides=ov)
    _print_metrics(doc)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune on a downstream task (imagenet, vqav2, nlvr2, retrieval, captioning)",
        description=(
            "Fine-tune BEiT-3 on TASK with the official recipe of a preset (tiny, base, large or <task>_<size>). "
            f"{_ORDER} Run under torchrun for DDP/FSDP. Writes OUT/model.safetensors (with its processor), "
            "OUT/metrics.json (the final evaluation), OUT/history.jsonl and checkpoints."
        ),
    )
    p.add_argument("task", choices=_TASKS, help="the task, by its official name")
    p.add_argument("--data", required=True, help="a world from `imglish data shapes` or the dataset's folder")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--preset", default=None, help="tiny (default), base, large, or <task>_<size>")
    p.add_argument("--config", default=None, help="JSON config file (nested sections or dotted keys)")
    p.add_argument("--init", default=None, help="weights to start from (model.safetensors or an official .pth); "
                                                "default: random weights")
    p.add_argument("--max-steps", dest="max_steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--save-every", dest="save_every", type=int, default=None, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="fp32 or bf16 autocast")
    p.add_argument("--seed", type=int, default=None, help="seed of every random choice")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    _add_config_keys(p)
    p.set_defaults(func=_finetune)

    e = subparsers.add_parser(
        "evaluate",
        help="evaluate a checkpoint on a task's split: metrics.json and predictions.json",
        description=(
            "Evaluate an imglish checkpoint (made by finetune) or an official .pth (with --model) on a split. "
            "Writes OUT/metrics.json and OUT/predictions.json (the task's submission format) and prints the metrics."
        ),
    )
    e.add_argument("task", choices=_TASKS)
    e.add_argument("--data", required=True, help="the data folder")
    e.add_argument("--checkpoint", required=True, help="model.safetensors or an official .pth")
    e.add_argument("--out", required=True, help="folder for metrics.json and predictions.json")
    e.add_argument("--split", default="val", choices=("train", "val", "test"))
    e.add_argument("--model", default=None, help="registered model name for an official checkpoint")
    e.add_argument("--preset", default=None, help="task preset whose evaluation knobs apply (default tiny)")
    e.add_argument("--precision", choices=("fp32", "bf16"), default=None)
    e.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    _add_config_keys(e)
    e.set_defaults(func=_evaluate)

    s = subparsers.add_parser(
        "score",
        help="score a predictions file (from any code) against the ground truth",
        description="Score a predictions file in the task's submission format; prints the metrics.json document.",
    )
    s.add_argument("task", choices=_TASKS)
    s.add_argument("--data", required=True, help="the data folder")
    s.add_argument("--predictions", required=True, help="the predictions JSON file")
    s.add_argument("--split", default="val", choices=("train", "val", "test"))
    s.add_argument("--out", default=None, help="also write OUT/metrics.json")
    s.add_argument("--preset", default=None)
    _add_config_keys(s)
    s.set_defaults(func=_score)
