"""``imglish predict <task>``: answers for a few inputs from a checkpoint; argument parsing and printing only, the
work is :func:`imglish.pipeline`.

Human-readable output by default; ``--json`` prints one JSON object per input (one line each) on stdout. A bad input
among several is reported on stderr, counted, and the rest are answered (with ``--json`` it gets an object with an
``error``); when no input can be answered the exit status is 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]

_CHECKPOINT_HELP = "model.safetensors made by `imglish finetune` (or an official .pth with --model)"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    p.add_argument("--model", default=None, help="registered model name of an official .pth "
                                                 "(e.g. beit3_base_patch16_480_vqav2)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model for a checkpoint without one beside it "
                                                     "(the official checkpoints use beit3.spm)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="inputs per forward")
    p.add_argument("--json", action="store_true", help="one JSON object per input on stdout")


def _pipe(args: argparse.Namespace, task: str, labels: Any = None) -> Any:
    import imglish

    return imglish.pipeline(task, args.checkpoint, model=args.model, tokenizer=args.tokenizer, labels=labels,
                            device=args.device, precision=args.precision, batch_size=args.batch_size)


def _emit(args: argparse.Namespace, rows: list[tuple[dict[str, Any], Any]], show: Any) -> int:
    """Print each ``(fields, answer or InputError)``; bad ones go to stderr. Returns the exit status."""
    from imglish.inference import InputError

    bad = [(f, a) for f, a in rows if isinstance(a, InputError)]
    for fields, answer in rows:
        if isinstance(answer, InputError):
            if args.json:
                print(json.dumps({**fields, "error": str(answer)}))
            if len(rows) > 1:
                print(f"imglish predict: skipped: {answer}", file=sys.stderr)
        elif args.json:
            print(json.dumps({**fields, "result": answer}))
        else:
            show(fields, answer)
    if bad:
        if len(bad) == len(rows):
            if len(rows) > 1:
                print(f"imglish predict: error: none of the {len(rows)} inputs could be used", file=sys.stderr)
            else:
                print(f"imglish predict: error: {bad[0][1]}", file=sys.stderr)
            return 2
        print(f"imglish predict: skipped {len(bad)} of {len(rows)} inputs", file=sys.stderr)
    return 0


def _scores(items: list[dict[str, Any]], key: str) -> None:
    width = max((len(str(it[key])) for it in items), default=0)
    for it in items:
        print(f"  {str(it[key]):<{width}}  {it['score']:.4f}")


# ============================================================================================= subcommands
def _classify(args: argparse.Namespace) -> int:
    pipe = _pipe(args, "classify", labels=args.labels)
    answers = pipe.run([{"image": p} for p in args.images], skip_errors=True, top_k=args.top_k)

    def show(fields: dict[str, Any], answer: Any) -> None:
        print(fields["image"])
        _scores(answer, "label")

    return _emit(args, [({"image": p}, a) for p, a in zip(args.images, answers)], show)


def _vqa(args: argparse.Namespace) -> int:
    pipe = _pipe(args, "vqa", labels=args.labels)
    questions = args.question
    answers = pipe.run([{"image": args.image, "question": q} for q in questions], skip_errors=True,
                       top_k=args.top_k)

    def show(fields: dict[str, Any], answer: Any) -> None:
        print(f"{fields['image']}: {fields['question']}")
        _scores(answer, "answer")

    return _emit(args, [({"image": args.image, "question": q}, a) for q, a in zip(questions, answers)], show)


def _caption(args: argparse.Namespace) -> int:
    pipe = _pipe(args, "caption")
    answers = pipe.run([{"image": p} for p in args.images], skip_errors=True, num_beams=args.beams,
                       max_length=args.max_length)

    def show(fields: dict[str, Any], answer: Any) -> None:
        print(f"{fields['image']}: {answer[0]['generated_text']}")

    return _emit(args, [({"image": p}, a) for p, a in zip(args.images, answers)], show)


def _nlvr2(args: argparse.Namespace) -> int:
    pipe = _pipe(args, "nlvr2")
    answers = pipe.run([{"left": args.left, "right": args.right, "text": args.text}], skip_errors=True)

    def show(fields: dict[str, Any], answer: Any) -> None:
        print(f"{fields['text']!r} about {fields['left']} | {fields['right']}: {answer['label']} "
              f"({answer['score']:.4f})")

    return _emit(args, [({"left": args.left, "right": args.right, "text": args.text}, answers[0])], show)


def _labels_arg(value: str) -> Any:
    """``--labels``: a file of labels (one per line) when such a file exists, else a comma-separated list."""
    if Path(value).is_file():
        from imglish.inference import load_labels

        return load_labels(value)
    labels = [s.strip() for s in value.split(",")]
    if not all(labels):
        raise ValueError(f"--labels {value!r}: expected comma-separated class names (no empty one) or a file")
    return labels


def _zeroshot(args: argparse.Namespace) -> int:
    from imglish.inference.templates import load_templates

    pipe = _pipe(args, "zeroshot")
    templates = load_templates(args.templates) if args.templates else None
    answers = pipe.run([{"image": p} for p in args.images], skip_errors=True, labels=_labels_arg(args.labels),
                       templates=templates, top_k=args.top_k)

    def show(fields: dict[str, Any], answer: Any) -> None:
        print(fields["image"])
        _scores(answer, "label")

    return _emit(args, [({"image": p}, a) for p, a in zip(args.images, answers)], show)


def _rank(args: argparse.Namespace) -> int:
    from imglish.inference import InputError

    pipe = _pipe(args, "rank")
    img_rows = pipe.forward_all([{"image": p} for p in args.images], skip_errors=True)
    txt_rows = pipe.forward_all([{"text": t} for t in args.texts], skip_errors=True)
    good_i = [k for k, r in enumerate(img_rows) if not isinstance(r, InputError)]
    good_t = [k for k, r in enumerate(txt_rows) if not isinstance(r, InputError)]
    rows: list[tuple[dict[str, Any], Any]] = []
    if good_i and good_t:
        import torch

        scores = torch.stack([img_rows[k] for k in good_i]) @ torch.stack([txt_rows[k] for k in good_t]).t()
        for a, i in enumerate(good_i):
            order = scores[a].argsort(descending=True).tolist()
            img_rows[i] = [{"text": args.texts[good_t[b]], "score": float(scores[a, b])} for b in order]
        for b, t in enumerate(good_t):
            order = scores[:, b].argsort(descending=True).tolist()
            txt_rows[t] = [{"image": args.images[good_i[a]], "score": float(scores[a, b])} for a in order]
    else:  # nothing to rank against: every usable input of the other side is missing
        for rowset in (img_rows, txt_rows):
            for k, r in enumerate(rowset):
                if not isinstance(r, InputError):
                    rowset[k] = InputError("nothing to rank against (no usable input on the other side)")
    rows += [({"image": p}, r) for p, r in zip(args.images, img_rows)]
    rows += [({"text": t}, r) for t, r in zip(args.texts, txt_rows)]

    def show(fields: dict[str, Any], answer: Any) -> None:
        if "image" in fields:
            print(f"image {fields['image']}:")
            _scores(answer, "text")
        else:
            print(f"text {fields['text']!r}:")
            _scores(answer, "image")

    return _emit(args, rows, show)


def _overlay_paths(args: argparse.Namespace) -> list[Path | None]:
    """Where each image's overlay goes: ``--out FILE`` for one image, ``--out DIR/`` (one PNG per image) for
    several."""
    if args.out is None:
        return [None] * len(args.images)
    out = Path(args.out)
    if len(args.images) == 1 and out.suffix:
        return [out]
    if out.suffix and not out.is_dir():
        raise ValueError(f"--out {args.out!r}: with {len(args.images)} images --out must be a folder")
    return [out / f"{Path(p).stem}.png" for p in args.images]


def _save_overlay(path: Path | None, image: Any, draw: Any) -> None:
    if path is None:
        return
    from imglish.inference import to_image

    path.parent.mkdir(parents=True, exist_ok=True)
    draw(to_image(image)).save(path)
    print(f"wrote {path}", file=sys.stderr)


def _segment(args: argparse.Namespace) -> int:
    from imglish.inference.dense import segmentation_overlay

    outs = _overlay_paths(args)
    pipe = _pipe(args, "segment")
    answers = pipe.run([{"image": p} for p in args.images], skip_errors=True)
    rows = []
    for p, a, out in zip(args.images, answers, outs):
        if isinstance(a, dict):
            _save_overlay(out, p, lambda img, a=a: segmentation_overlay(img, a["label_map"], alpha=args.alpha))
            a = {"segments": a["segments"], "size": list(a["label_map"].shape)}
        rows.append(({"image": p}, a))

    def show(fields: dict[str, Any], answer: Any) -> None:
        print(fields["image"])
        for seg in answer["segments"]:
            print(f"  {seg['label']:<16} {100 * seg['fraction']:6.2f}%")

    return _emit(args, rows, show)


def _detect(args: argparse.Namespace) -> int:
    from imglish.inference.dense import detection_overlay

    outs = _overlay_paths(args)
    pipe = _pipe(args, "detect")
    answers = pipe.run([{"image": p} for p in args.images], skip_errors=True, threshold=args.threshold)
    rows = []
    for p, a, out in zip(args.images, answers, outs):
        if isinstance(a, list):
            _save_overlay(out, p, lambda img, a=a: detection_overlay(img, a))
            a = [{k: v for k, v in d.items() if k != "mask"} for d in a]
        rows.append(({"image": p}, a))

    def show(fields: dict[str, Any], answer: Any) -> None:
        print(f"{fields['image']}: {len(answer)} detections")
        for d in answer:
            b = d["box"]
            print(f"  {d['label']:<16} {d['score']:.3f}  [{b['xmin']:.1f}, {b['ymin']:.1f}, {b['xmax']:.1f}, "
                  f"{b['ymax']:.1f}]")

    return _emit(args, rows, show)


def _predict_help(parser: argparse.ArgumentParser) -> Any:
    def run(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="answers for a few images/texts from a checkpoint (classify, vqa, caption, nlvr2, zeroshot, rank, "
             "segment, detect)",
        description=(
            "Run a fine-tuned checkpoint on a few inputs. Human-readable output by default, --json for one JSON "
            "object per input. A bad input among several is skipped (stderr says why); exit status 2 when none "
            "can be used."
        ),
    )
    p.set_defaults(func=_predict_help(p))
    sub = p.add_subparsers(dest="predict_task", metavar="TASK")

    c = sub.add_parser("classify", help="image classification (an imagenet fine-tune)")
    c.add_argument("images", nargs="+", metavar="IMAGE")
    c.add_argument("--top-k", dest="top_k", type=int, default=5)
    c.add_argument("--labels", default=None, help="class names file (one per line) when task.json has none")
    _common(c)
    c.set_defaults(func=_classify)

    v = sub.add_parser("vqa", help="visual question answering (a vqav2 fine-tune)")
    v.add_argument("image", metavar="IMAGE")
    v.add_argument("--question", required=True, action="append", help="the question (repeat for several)")
    v.add_argument("--top-k", dest="top_k", type=int, default=1)
    v.add_argument("--labels", default=None, help="answer vocabulary (answer2label.txt or one per line) when "
                                                  "task.json has none")
    _common(v)
    v.set_defaults(func=_vqa)

    k = sub.add_parser("caption", help="image captioning (a coco_captioning fine-tune)")
    k.add_argument("images", nargs="+", metavar="IMAGE")
    k.add_argument("--beams", type=int, default=3, help="beam size (1: greedy)")
    k.add_argument("--max-length", dest="max_length", type=int, default=None,
                   help="longest caption in tokens, BOS included (default 64)")
    _common(k)
    k.set_defaults(func=_caption)

    n = sub.add_parser("nlvr2", help="is a statement true of two images (an nlvr2 fine-tune)")
    n.add_argument("left", metavar="LEFT")
    n.add_argument("right", metavar="RIGHT")
    n.add_argument("--text", required=True, help="the statement")
    _common(n)
    n.set_defaults(func=_nlvr2)

    z = sub.add_parser("zeroshot", help="zero-shot classification with a retrieval (dual encoder) checkpoint")
    z.add_argument("images", nargs="+", metavar="IMAGE")
    z.add_argument("--labels", required=True, help="class names, comma-separated (a,b,c), or a file, one per line")
    z.add_argument("--templates", default=None, help="prompt templates file, one per line with {} for the name "
                                                     "(default: the bundled set)")
    z.add_argument("--top-k", dest="top_k", type=int, default=None, help="show the best K (default: all)")
    _common(z)
    z.set_defaults(func=_zeroshot)

    g = sub.add_parser("segment", help="semantic segmentation (an ade20k fine-tune)")
    g.add_argument("images", nargs="+", metavar="IMAGE")
    g.add_argument("--out", default=None, help="overlay PNG (one image) or folder of overlays (several)")
    g.add_argument("--alpha", type=float, default=0.5, help="opacity of the class colours in the overlay")
    _common(g)
    g.set_defaults(func=_segment)

    d = sub.add_parser("detect", help="object detection and instance masks (a coco_detection fine-tune)")
    d.add_argument("images", nargs="+", metavar="IMAGE")
    d.add_argument("--threshold", type=float, default=0.5, help="smallest score shown")
    d.add_argument("--out", default=None, help="overlay PNG (one image) or folder of overlays (several)")
    _common(d)
    d.set_defaults(func=_detect)

    r = sub.add_parser("rank", help="image-text retrieval scores both ways with a retrieval checkpoint")
    r.add_argument("--images", nargs="+", required=True, metavar="IMAGE")
    r.add_argument("--texts", nargs="+", required=True, metavar="TEXT")
    _common(r)
    r.set_defaults(func=_rank)
