"""``imglish pretrain`` and ``imglish quickstart``: argument parsing only; the work is in ``imglish.training``."""

from __future__ import annotations

import argparse
import dataclasses

from imglish.cli import parse_key_values

__all__ = ["register"]

# Short flags and the config keys they set.
_SHORT = {
    "data": "data.path",
    "out": "out",
    "max_steps": "schedule.max_steps",
    "save_every": "checkpoint.save_every",
    "precision": "parallel.precision",
    "seed": "seed",
}


def _config_keys() -> list[str]:
    from imglish.training.config import TrainConfig

    cfg = TrainConfig()
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(f"{f.name}.{g.name}" for g in dataclasses.fields(value))
    return keys


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    ov: dict[str, str] = {}
    for attr, key in _SHORT.items():
        value = getattr(args, attr, None)
        if value is not None:
            ov[key] = str(value)
    for dest, value in vars(args).items():
        if dest.startswith("cfg__"):
            ov[dest[5:].replace("__", ".")] = value
    if getattr(args, "resume", False):
        ov["checkpoint.resume"] = "true"
    return ov


def _pretrain(args: argparse.Namespace) -> int:
    from imglish.training.config import build_config
    from imglish.training.pretrain import pretrain

    cfg = build_config(args.preset if args.preset or not args.config else None, args.config, _overrides(args))
    summary = pretrain(cfg)
    if summary.heldout:
        print(f"wrote {summary.model_path}")
        for name, m in summary.heldout.items():
            print(
                f"  held-out {name}: masked-token accuracy {m['accuracy']:.3f} "
                f"(most-frequent-token baseline {m.get('baseline_accuracy', float('nan')):.3f}, {int(m['tokens'])} tokens)"
            )
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from imglish.training.quickstart import VISUAL_TOKENIZER_CHOICES, quickstart

    overrides: dict[str, object] = dict(VISUAL_TOKENIZER_CHOICES.get(args.visual_tokenizer, {}))
    overrides.update(parse_key_values(args.pretrain_set, "--pretrain"))  # a key given here wins
    if args.threads is not None:
        overrides["parallel.threads"] = args.threads
    if args.skip_pretraining and not args.init:
        raise SystemExit("imglish quickstart: --skip-pretraining needs --init FILE (a pretrained model.safetensors)")
    if args.init and not args.skip_pretraining:
        raise SystemExit("imglish quickstart: --init FILE replaces pretraining; add --skip-pretraining to say so")
    tasks = None
    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    report = quickstart(
        args.out,
        max_steps=args.max_steps,
        num_images=args.num_images,
        seed=args.seed,
        overrides=overrides,
        budget_s=None if args.no_time_limit else args.budget_minutes * 60,
        tasks=tasks,
        init=args.init,
        jobs=args.jobs,
        finetune_overrides=parse_key_values(args.finetune_set, "--finetune"),
    )
    print(f"report: {report}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="masked data modeling pretraining (images, texts, image-text pairs)",
        description=(
            "Pretrain a BEiT-3 with masked data modeling. The configuration is a preset, then --config FILE "
            "(JSON), then these flags, then any --section.key VALUE flag (listed below). Run under torchrun for "
            "DDP/FSDP. Given a folder made by `imglish data shapes`, the text and visual tokenizers are trained "
            "into OUT/tokenizers (or reused from there). The final model is OUT/model.safetensors."
        ),
    )
    p.add_argument("--preset", default=None, help="built-in preset: tiny or base (default tiny)")
    p.add_argument("--config", default=None, help="JSON config file (nested sections or dotted keys)")
    p.add_argument("--data", default=None, help="data folder (as written by `imglish data shapes`)")
    p.add_argument("--out", default=None, help="run folder: checkpoints, logs, tokenizers, model.safetensors")
    p.add_argument("--max-steps", dest="max_steps", type=int, default=None, help="optimizer steps")
    p.add_argument(
        "--save-every", dest="save_every", type=int, default=None, help="steps between checkpoints"
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="fp32 or bf16 autocast")
    p.add_argument("--seed", type=int, default=None, help="seed of every random choice")
    group = p.add_argument_group(
        "config keys", "every field of the configuration tree, as --section.key VALUE"
    )
    for key in _config_keys():
        group.add_argument(
            f"--{key}", dest="cfg__" + key.replace(".", "__"), metavar="VALUE", default=argparse.SUPPRESS
        )
    p.set_defaults(func=_pretrain)

    q = subparsers.add_parser(
        "quickstart",
        help="the paper in miniature on CPU: world -> tokenizers -> pretraining -> every task pretrained vs scratch",
        description=(
            "Generate the embedded synthetic world, train the text and visual tokenizers on it, pretrain a tiny "
            "BEiT-3 with masked data modeling, then fine-tune every downstream task twice with the same recipe, "
            "data, steps and seed (from the pretrained model and from random weights) on a small labelled subset "
            "and evaluate both on the test split. Writes OUT/report.md (with PNG charts) and OUT/results.json. A "
            "second run on the same OUT reuses every finished stage."
        ),
    )
    q.add_argument("--out", default="quickstart", help="output folder (default ./quickstart)")
    q.add_argument("--max-steps", dest="max_steps", type=int, default=None, help="pretraining steps")
    q.add_argument("--num-images", dest="num_images", type=int, default=None, help="images in the world")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for pretraining (default 0: torch's choice, every core; 1 is more robust on a busy "
        "shared machine, where OpenMP's busy-waiting slows several threads down)",
    )
    q.add_argument(
        "--budget-minutes",
        dest="budget_minutes",
        type=float,
        default=15.0,
        help="wall-clock budget; pretraining stops early (and says so) to stay within it (default 15)",
    )
    q.add_argument(
        "--no-time-limit", dest="no_time_limit", action="store_true", help="run every step whatever the time"
    )
    q.add_argument(
        "--tasks",
        default=None,
        help="comma-separated downstream tasks (default imagenet,vqav2,nlvr2,coco_retrieval,coco_captioning; "
        "an empty string stops after pretraining)",
    )
    q.add_argument(
        "--skip-pretraining", dest="skip_pretraining", action="store_true", help="reuse --init instead of pretraining"
    )
    q.add_argument("--init", default=None, help="a pretrained model.safetensors (with its Processor beside it)")
    q.add_argument(
        "--jobs", type=int, default=None, help="fine-tunes at once, one process and thread each (default 2)"
    )
    q.add_argument(
        "--visual-tokenizer",
        dest="visual_tokenizer",
        choices=("kmeans", "vqkd"),  # imglish.training.quickstart.VISUAL_TOKENIZER_CHOICES
        default=None,
        help="the visual tokenizer trained for pretraining: kmeans (the default: 256 k-means codes of a conv CLIP "
        "trained on the world's pairs, precomputed) or vqkd (the earlier recipe: a tiny VQ-KD reconstructing "
        "pixels and HOG, 64 codes, 200 steps; docs/quickstart.md)",
    )
    q.add_argument(
        "--pretrain",
        dest="pretrain_set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for pretraining (repeatable), e.g. data.visual_tokenizer_codes=128",
    )
    q.add_argument(
        "--finetune",
        dest="finetune_set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every fine-tune, both sides (repeatable), e.g. schedule.max_steps=50",
    )
    q.set_defaults(func=_quickstart)
