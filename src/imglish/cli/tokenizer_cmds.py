"""``imglish tokenizer ...``: train text and visual tokenizers, precompute visual tokens, inspect tokenization.

Only argument parsing lives here; each subcommand calls a public function of :mod:`imglish.tokenizers`.
"""

from __future__ import annotations

import argparse
import json

from imglish.cli import parse_key_values

__all__ = ["register"]


def _train_text(args: argparse.Namespace) -> int:
    from imglish.tokenizers.text import TextTokenizer, train_sentencepiece

    path = train_sentencepiece(
        args.input, args.vocab_size, args.output, model_type=args.model_type,
        character_coverage=args.character_coverage, seed=args.seed, num_threads=args.threads,
    )
    tok = TextTokenizer(path)
    print(f"wrote {path} ({tok.num_pieces} pieces; vocab_size {tok.vocab_size}, <mask> = {tok.mask_token_id})")
    return 0


def _train_visual(args: argparse.Namespace) -> int:
    from imglish.tokenizers.vqkd_train import VisualTokenizerTrainConfig, train_visual_tokenizer

    overrides = parse_key_values(args.set or [], "--set")
    for key in ("img_size", "n_code", "code_dim"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    cfg = VisualTokenizerTrainConfig(
        images=args.images, out=args.out, model=args.model, model_overrides=overrides, teacher=args.teacher,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
        warmup_steps=args.warmup_steps, seed=args.seed, num_workers=0, save_every=args.save_every,
        resume=not args.no_resume, device=args.device, progress=not args.no_progress,
        restart_every=args.restart_every,
    )
    result = train_visual_tokenizer(cfg)
    last = result.history[-1] if result.history else {}
    print(
        f"wrote {result.tokenizer_path}: {result.step} steps, reconstruction loss {last.get('rec_loss', float('nan')):.4f}, "
        f"codebook usage {result.usage:.1%} ({result.codes_used} codes)"
    )
    return 0


def _train_kmeans(args: argparse.Namespace) -> int:
    from pathlib import Path

    from imglish.data import KarpathyCaptions
    from imglish.tokenizers.kmeans import KMeansTrainConfig, caption_encoder, train_kmeans_tokenizer
    from imglish.tokenizers.text import TextTokenizer

    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    pairs = KarpathyCaptions(Path(args.captions), image_root=args.image_root, splits=splits)
    if not len(pairs):
        raise ValueError(f"{args.captions} has no caption in the split(s) {', '.join(splits)}")
    tok = TextTokenizer(args.text_tokenizer)
    cfg = KMeansTrainConfig(
        out=args.out, img_size=args.img_size, patch_size=args.patch_size, width=args.width, n_code=args.n_code,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=not args.no_progress,
    )
    result = train_kmeans_tokenizer(pairs, caption_encoder(tok, args.max_text_len), tok.vocab_size, cfg)
    print(
        f"wrote {result.tokenizer_path} (and the conv CLIP {result.teacher_path}): contrastive loss "
        f"{result.losses[0]:.3f} -> {result.losses[-1]:.3f} in {result.steps} steps, {result.codes_used} of "
        f"{args.n_code} codes used, {result.skipped} bad records skipped, {result.elapsed_s:.0f} s"
    )
    return 0


def _precompute(args: argparse.Namespace) -> int:
    from imglish.tokenizers.vqkd_train import precompute_visual_tokens

    out = precompute_visual_tokens(args.tokenizer, args.images, args.output, batch_size=args.batch_size,
                                   device=args.device, progress=not args.no_progress)
    print(f"wrote {out}")
    return 0


def _encode(args: argparse.Namespace) -> int:
    from imglish.tokenizers.text import TextTokenizer

    tok = TextTokenizer(args.model)
    for text in args.text:
        ids = tok.encode(text)
        print(json.dumps({"text": text, "tokens": tok.convert_ids_to_tokens(ids), "ids": ids}, ensure_ascii=False))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``imglish tokenizer`` and its subcommands."""
    parser = subparsers.add_parser("tokenizer", help="train text/visual tokenizers, precompute visual tokens")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda a: (parser.print_help(), 2)[1])

    p = sub.add_parser("train-text", help="train a SentencePiece (unigram) model with the XLM-R id convention")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text files, one sentence per line")
    p.add_argument("--vocab-size", type=int, required=True, help="number of pieces (beit3.spm has 64000)")
    p.add_argument("--output", required=True, help="the .model file to write")
    p.add_argument("--model-type", default="unigram", choices=("unigram", "bpe", "char", "word"))
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_train_text)

    p = sub.add_parser("train-visual", help="train a VQ-KD visual tokenizer on a folder of images")
    p.add_argument("--images", required=True, help="folder searched recursively for images")
    p.add_argument("--out", required=True, help="output folder (checkpoint.pt, vqkd.safetensors, metrics.json)")
    p.add_argument("--model", default="vqkd_tiny_patch8_64", help="VQ-KD preset name")
    p.add_argument("--teacher", default="pixels+hog",
                   help="pixels, hog, pixels+hog, clip:DIR, dino:DIR or beit3:FILE")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--n-code", type=int, default=None)
    p.add_argument("--code-dim", type=int, default=None)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other VQKDConfig field")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--restart-every", type=int, default=20, help="dead-code restart period in steps (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/checkpoint.pt exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_train_visual)

    p = sub.add_parser(
        "train-kmeans",
        help="train a k-means visual tokenizer: a conv CLIP on image-caption pairs, k-means of its patch features",
        description="A semantic visual tokenizer without a downloaded teacher (imglish.tokenizers.kmeans): a small "
        "convolutional CLIP is trained contrastively on the pairs of a Karpathy-style caption file, and its patch "
        "features are quantised by k-means. Writes OUT/kmeans.safetensors (the tokenizer: pretraining's "
        "data.visual_tokenizer, or `imglish tokenizer precompute --tokenizer`) and OUT/conv_clip.safetensors.",
    )
    p.add_argument("--captions", required=True, help="a Karpathy-style JSON, e.g. WORLD/coco/dataset_coco.json")
    p.add_argument("--image-root", default=None, help="folder the images are relative to (default: the JSON's)")
    p.add_argument("--splits", default="train,restval", help="comma-separated Karpathy splits (default train,restval)")
    p.add_argument("--text-tokenizer", required=True, help="SentencePiece .model for the captions")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=16, help="a power of two: the conv tower's stride")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--n-code", type=int, default=256)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-text-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_train_kmeans)

    p = sub.add_parser("precompute", help="tokenize every image of a folder with a visual tokenizer (VQ-KD or k-means)")
    p.add_argument("--tokenizer", required=True,
                   help="vqkd.safetensors (or another VQ-KD file with a saved config), or a kmeans.safetensors")
    p.add_argument("--images", required=True, help="folder searched recursively for images")
    p.add_argument("--output", required=True, help=".safetensors file to write")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_precompute)

    p = sub.add_parser("encode", help="show the pieces and ids of texts")
    p.add_argument("--model", required=True, help="SentencePiece .model file")
    p.add_argument("text", nargs="+")
    p.set_defaults(func=_encode)
