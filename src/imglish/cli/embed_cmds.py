"""``imglish embed``: embeddings of an image folder, webdataset shards or a text file into one safetensors file;
argument parsing and printing only, the work is :func:`imglish.inference.embed.embed`."""

from __future__ import annotations

import argparse
import sys

__all__ = ["register"]


def _embed(args: argparse.Namespace) -> int:
    from imglish.inference.embed import DEFAULT_PART_BATCHES, embed

    summary = embed(
        args.checkpoint, images=args.images, texts=args.texts, out=args.out, model=args.model,
        tokenizer=args.tokenizer, batch_size=args.batch_size, num_workers=args.workers, device=args.device,
        precision=args.precision, resume=args.resume, strict=args.strict,
        part_batches=args.part_batches or DEFAULT_PART_BATCHES, progress=not args.quiet,
    )
    from imglish.training.parallel import launched_rank

    if launched_rank() != 0:  # under torchrun rank 0 reports for all
        return 0
    if summary.skipped:
        print(f"imglish embed: {summary.skipped_line()}", file=sys.stderr)
    rate = ""
    if summary.seconds > 0 and summary.count > summary.resumed_records:
        rate = f" ({(summary.count - summary.resumed_records) / summary.seconds:.1f}/s this run)"
    print(f"wrote {summary.out}: {summary.count} {summary.kind} embeddings of dim {summary.dim}{rate}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "embed",
        help="embed an image folder, webdataset shards or a text file into one safetensors file",
        description=(
            "Embed every image of a folder (recursively, sorted; id = path relative to it) or of local webdataset "
            "shards (id = __key__), or every text of a .txt (one per line; id = line number from 0) or .jsonl "
            '({"id": ..., "text": ...} per line), with a retrieval, backbone or pretraining checkpoint. Writes OUT '
            "(safetensors: tensor 'embeddings' (N, D) float32, L2-normalised; the ids and the skipped inputs in its "
            "metadata). Work is saved in OUT.parts/ as it goes; --resume continues an interrupted run. Bad files are "
            "skipped and counted (with --strict the first one stops the run)."
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR|SHARDS", default=None,
                     help="an image folder, or webdataset .tar shards: a brace pattern, a folder of .tar files, or "
                          "a '::'-separated list")
    src.add_argument("--texts", metavar="FILE", default=None, help="a .txt (one text per line) or a .jsonl file")
    p.add_argument("--checkpoint", required=True,
                   help="model.safetensors of a retrieval fine-tune, a backbone or pretraining checkpoint (or an "
                        "official .pth with --model)")
    p.add_argument("--out", required=True, help="the output .safetensors file")
    p.add_argument("--model", default=None, help="registered model name of an official .pth "
                                                 "(e.g. beit3_base_patch16_384_retrieval)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model for a checkpoint without one beside it "
                                                     "(the official checkpoints use beit3.spm)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=32, help="inputs per forward (default 32)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes that decode and transform "
                                                          "(0: in the main process; default 2)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: the weights are cast to bfloat16 once (embeddings are stored as float32 either way)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.parts/ (same "
                                                         "inputs, checkpoint, batch size and precision)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    p.add_argument("--part-batches", dest="part_batches", type=int, default=None,
                   help="batches per saved part (at most this much work is lost to an interruption; default 20)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_embed)
