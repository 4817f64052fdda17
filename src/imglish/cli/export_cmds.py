"""``imglish export``: one part of a checkpoint as an ONNX graph, optionally checked with onnxruntime; argument
parsing and printing only, the work is :func:`imglish.export.export_onnx`."""

from __future__ import annotations

import argparse

__all__ = ["register"]

_PARTS_HELP = (
    "image_encoder, text_encoder (retrieval: the two towers, each alone, L2-normalised embeddings); model "
    "(imageclassification, vqav2, nlvr2: the whole model, logits); encoder, decoder_step (captioning: the first "
    "incremental call, and one later step with the key/value cache as input and output)"
)


def _export(args: argparse.Namespace) -> int:
    from imglish.export import export_onnx

    if args.threads is not None:
        import torch

        from imglish.inference.pipeline import _positive_int

        torch.set_num_threads(_positive_int(args.threads, "--threads"))
    result = export_onnx(args.checkpoint, args.part, args.out, model=args.model, verify=args.verify,
                         atol=args.atol, batch=args.batch, text_len=args.text_len,
                         external_data=True if args.external_data else None)
    size = result.path.stat().st_size
    data = result.path.with_name(result.path.name + ".data")
    if result.external_data and data.exists():
        size += data.stat().st_size
    print(f"wrote {result.path} ({size / 2**20:.1f} MiB{', weights in ' + data.name if result.external_data else ''})"
          f": part {result.part}, inputs {', '.join(result.inputs)} -> outputs {', '.join(result.outputs)}, "
          f"exported in {result.seconds:.1f} s")
    if result.max_abs_diff is not None:
        texts = any(name in ("text_ids", "question", "text") for name in result.inputs)
        checked = ", ".join(f"batch {b}" + (f" (text {t})" if texts else "") for b, t in result.checked_batches)
        diffs = ", ".join(f"{name} {diff:.2g}" for name, diff in result.max_abs_diff.items())
        print(f"verified with onnxruntime (CPU) at {checked}: max |onnx - torch| {diffs} (tolerance {args.atol:g})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export part of a checkpoint to ONNX (and check it with onnxruntime)",
        description=(
            "Export one part of a checkpoint as an ONNX graph (dynamo-based torch.onnx.export, opset 18, named "
            "inputs and outputs, dynamic batch and text length; weights over 2 GB go to OUT.data beside it). With "
            "--verify the file runs in onnxruntime on the CPU at batch 1 and 5 and is compared with PyTorch on the "
            "same inputs (float32, within --atol). Needs pip install 'imglish[export]'. See docs/deployment.md."
        ),
    )
    p.add_argument("--checkpoint", required=True,
                   help="model.safetensors of an imglish fine-tune (or an official .pth with --model)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--part", required=True, choices=("image_encoder", "text_encoder", "model", "encoder",
                                                     "decoder_step"), help=_PARTS_HELP)
    p.add_argument("--model", default=None,
                   help="registered model name of an official .pth (e.g. beit3_base_patch16_384_retrieval)")
    p.add_argument("--verify", action="store_true", help="check the file with onnxruntime against PyTorch")
    p.add_argument("--atol", type=float, default=1e-4, help="largest absolute difference --verify accepts "
                                                            "(default 1e-4)")
    p.add_argument("--batch", type=int, default=2, help="batch of the traced example (the graph is dynamic; "
                                                        "default 2)")
    p.add_argument("--text-len", dest="text_len", type=int, default=8,
                   help="text length of the traced example (dynamic in the graph; default 8)")
    p.add_argument("--external-data", dest="external_data", action="store_true",
                   help="write the weights to OUT.data even under 2 GB")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=_export)
