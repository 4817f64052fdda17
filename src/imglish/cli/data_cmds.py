"""``imglish data ...``: generate the embedded synthetic world, check a dataset folder, write official index files."""

from __future__ import annotations

import argparse
import json

__all__ = ["register"]


def _shapes(args: argparse.Namespace) -> int:
    from imglish.data.synthetic import FORMATS, WorldConfig, generate_world

    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip()) if args.formats else FORMATS
    cfg = WorldConfig(
        num_images=args.num_images, image_size=args.image_size, seed=args.seed, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, min_objects=args.min_objects, max_objects=args.max_objects,
        captions_per_image=args.captions_per_image, questions_per_image=args.questions_per_image,
        nlvr2_per_image=args.nlvr2_per_image, texts_per_image=args.texts_per_image, shard_size=args.shard_size,
        formats=formats, workers=args.workers,
    )
    summary = generate_world(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    if not args.quiet:
        print(json.dumps(summary.counts, indent=1))
        print(f"wrote {summary.root} in {summary.seconds:.1f} s")
    return 0


def _check(args: argparse.Namespace) -> int:
    from imglish.data.check import check_world
    from imglish.data.skip import BadRecordError

    try:
        report = check_world(args.root, strict=args.strict, load_images=not args.index_only)
    except BadRecordError as err:
        print(f"imglish data check: {err}")
        return 1
    total_skipped = 0
    for name, r in report.items():
        skipped = sum(r["skipped"].values())
        total_skipped += skipped
        extra = f", skipped {r['skipped']}" if skipped else ""
        print(f"{name}: {r['records']} records{extra}")
    return 0


def _official_index(args: argparse.Namespace) -> int:
    from imglish.data.official import OFFICIAL_TASKS, write_official_index
    from imglish.data.skip import BadRecordCounter

    tasks = OFFICIAL_TASKS if args.task == "all" else tuple(t.strip() for t in args.task.split(",") if t.strip())
    bad = [t for t in tasks if t not in OFFICIAL_TASKS]
    if bad or not tasks:
        raise ValueError(f"unknown task(s) {bad or [args.task]}; expected 'all' or some of {', '.join(OFFICIAL_TASKS)}")
    if not args.tokenizer:
        raise ValueError(
            "--tokenizer SPM is required: official index files hold token ids, and no tokenizer is trained here. "
            "Pass a SentencePiece .model (e.g. beit3.spm), or train one first with `imglish tokenizer train-text "
            "--input WORLD/text/train.txt --vocab-size 64 --output spm.model` (the shapes world has a small language)")
    from imglish.tokenizers.text import TextTokenizer

    tokenizer = TextTokenizer(args.tokenizer)
    skip = BadRecordCounter()
    for task in tasks:
        files = write_official_index(args.world, args.out, task, tokenizer, vqa_min_count=args.vqa_min_count,
                                     vqa_rest_val=args.vqa_rest_val, seed=args.seed, skip=skip)
        if not args.quiet:
            for f in files:
                with open(f, encoding="utf-8") as fh:
                    n = sum(1 for _ in fh)
                print(f"{task}: {f} ({n} lines)")
    if not args.quiet:
        print(skip.summary())
    return 0


def _count_or_fraction(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command group."""
    data = subparsers.add_parser("data", help="synthetic world generation and dataset checks")
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")

    p = sub.add_parser("shapes", help="write the seeded synthetic shapes world in the real dataset formats")
    p.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    p.add_argument("--num-images", type=int, default=2000, help="scenes over all splits (default 2000)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of images in val (default 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="share of images in test (default 0.1)")
    p.add_argument("--min-objects", type=int, default=1, help="fewest objects per scene (default 1)")
    p.add_argument("--max-objects", type=int, default=4, help="most objects per scene (default 4)")
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--questions-per-image", type=int, default=4)
    p.add_argument("--nlvr2-per-image", type=float, default=4.0, help="NLVR2 examples per image of a split (default 4)")
    p.add_argument("--texts-per-image", type=int, default=5, help="text-corpus lines per image of a split")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per webdataset shard")
    p.add_argument("--formats", default=None,
                   help="comma-separated subset of coco,flickr30k,vqav2,nlvr2,imagenet,text,wds,ade20k,"
                        "coco_instances (default: all)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_shapes)

    c = sub.add_parser("check", help="read every dataset of a world folder and report records and skipped records")
    c.add_argument("root", help="folder in the layout written by `imglish data shapes`")
    c.add_argument("--strict", action="store_true", help="stop with an error naming the first bad record")
    c.add_argument("--index-only", action="store_true", help="build the indexes without decoding images")
    c.set_defaults(func=_check)

    o = sub.add_parser("official-index",
                       help="write the official BEiT-3 *.jsonl index files of a task from a world folder")
    o.add_argument("--world", required=True, help="folder written by `imglish data shapes`")
    o.add_argument("--out", required=True,
                   help="output folder: index files plus links to the world's image folders (the --data_path)")
    o.add_argument("--task", required=True,
                   help="imagenet, vqav2, nlvr2, coco_retrieval, flickr30k, coco_captioning, nocaps; "
                        "several comma-separated, or 'all'")
    o.add_argument("--tokenizer", default=None, metavar="SPM", help="SentencePiece .model for text_segment (required)")
    o.add_argument("--vqa-min-count", type=int, default=9,
                   help="least count of a training answer in answer2label.txt (official 9; lower for small worlds)")
    o.add_argument("--vqa-rest-val", type=_count_or_fraction, default=0.5,
                   help="images of the val split in vqa.rest_val.jsonl: a count (official 1000) or a fraction "
                        "(default 0.5)")
    o.add_argument("--seed", type=int, default=0, help="seed of the rest_val/trainable_val draw (default 0)")
    o.add_argument("--quiet", action="store_true", help="print nothing")
    o.set_defaults(func=_official_index)

    def _no_sub(args: argparse.Namespace) -> int:
        data.print_help()
        return 2

    data.set_defaults(func=_no_sub)
