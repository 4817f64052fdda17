"""`imglish models`, `imglish parity` and `imglish convert`."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def _models(args: argparse.Namespace) -> int:
    from imglish.registry import get_model_info, list_models

    names = list_models(args.pattern)
    for name in names:
        info = get_model_info(name)
        tag = "official" if info.official else ""
        print(f"{name:<44} {info.task:<20} {info.img_size:>4}  {tag}")
    if not names:
        print(f"no model matches {args.pattern!r}")
        return 1
    return 0


def _parity(args: argparse.Namespace) -> int:
    from imglish.evaluation.parity import run_parity_file, summarize

    results = run_parity_file(args.file, atol=args.atol)
    for result in results:
        print(result.line(), flush=True)
    passed, failed = summarize(results)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 and passed > 0 else 1


def _convert(args: argparse.Namespace) -> int:
    from imglish.model.loading import convert_checkpoint

    out = convert_checkpoint(args.src, args.dst, num_heads=args.num_heads)
    print(f"wrote {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered model names")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. '*vqav2' (default: all)")
    p.set_defaults(func=_models)

    p = sub.add_parser("parity", help="replay outputs of the official code (beit3-parity/1, vqkd-parity/1 files)")
    p.add_argument("file", help="a parity file, e.g. tests/fixtures/official-tiny.pt")
    p.add_argument("--atol", type=float, default=1e-4, help="maximum absolute difference allowed (default 1e-4)")
    p.set_defaults(func=_parity)

    p = sub.add_parser(
        "convert",
        help="convert an official .pth into an imglish .safetensors, or back (decided by DST's extension)",
    )
    p.add_argument("src", help="source checkpoint (.pth official, or .safetensors imglish)")
    p.add_argument("dst", help="destination: .safetensors (imglish) or .pth (official)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads, when converting an official file whose head size is not 64")
    p.set_defaults(func=_convert)
