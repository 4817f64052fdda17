"""``imglish serve``: the HTTP server (needs the ``serve`` extra); argument parsing only, the work is
:mod:`imglish.inference.server`."""

from __future__ import annotations

import argparse
import logging

__all__ = ["register"]


def _serve(args: argparse.Namespace) -> int:
    from imglish.inference.server import ServeConfig, create_app, load_pipelines, serve

    try:  # before the models load: a missing extra is the first thing to say
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart: FastAPI's form parser)
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ValueError(f"imglish serve needs the serve extra ({err.name} is missing): "
                         "pip install 'imglish[serve]'") from None
    config = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                         timeout_s=args.timeout, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                         max_pixels=int(args.max_megapixels * 1_000_000), max_text_chars=args.max_text_chars)
    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("imglish").setLevel(level)
    pipes = load_pipelines(args.checkpoint, model=args.model, tokenizer=args.tokenizer, device=args.device,
                           precision=args.precision, max_pixels=config.max_pixels)
    for name, pipe in sorted(pipes.items()):
        logging.getLogger("imglish.serve").info("%s: %r", name, pipe)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("imglish.serve").warning(
            "listening on %s: the server has no authentication; anyone who can reach the port can use it", args.host)
    serve(create_app(pipes, config), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    d = _defaults()
    p = subparsers.add_parser(
        "serve",
        help="serve the pipelines over HTTP (FastAPI; pip install 'imglish[serve]')",
        description=(
            "Serve checkpoints over HTTP: GET /health, POST /v1/classify, /v1/vqa, /v1/caption, /v1/nlvr2, "
            "/v1/zeroshot, /v1/embed/image, /v1/embed/text (multipart forms), OpenAPI docs at /docs and a page to "
            "try each task at /. Each --checkpoint serves the endpoints of its task (a retrieval checkpoint serves "
            "zeroshot and embed). Requests are batched dynamically; limits on upload size, pixels, queue and time "
            "answer with a JSON 413/422/503 naming the problem."
        ),
    )
    p.add_argument("--checkpoint", action="append", required=True, metavar="C",
                   help="model.safetensors made by `imglish finetune` (repeat for several tasks), or an official "
                        ".pth with --model")
    p.add_argument("--model", default=None, help="registered model name of an official .pth (one --checkpoint)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model for checkpoints without one beside them")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--max-batch", dest="max_batch", type=int, default=d.max_batch,
                   help=f"requests per forward at most (default {d.max_batch})")
    p.add_argument("--max-wait-ms", dest="max_wait_ms", type=float, default=d.max_wait_ms,
                   help=f"how long a request may wait for others to join its batch (default {d.max_wait_ms:g})")
    p.add_argument("--max-queue", dest="max_queue", type=int, default=d.max_queue,
                   help=f"waiting requests at most; more get 503 (default {d.max_queue})")
    p.add_argument("--timeout", type=float, default=d.timeout_s,
                   help=f"seconds until an unanswered request gets 503 (default {d.timeout_s:g})")
    p.add_argument("--max-upload-mb", dest="max_upload_mb", type=float, default=d.max_upload_bytes / 2**20,
                   help=f"request body limit in MiB (default {d.max_upload_bytes / 2**20:g})")
    p.add_argument("--max-megapixels", dest="max_megapixels", type=float, default=d.max_pixels / 1e6,
                   help=f"image size limit in megapixels, checked before decoding (default {d.max_pixels / 1e6:g})")
    p.add_argument("--max-text-chars", dest="max_text_chars", type=int, default=d.max_text_chars,
                   help=f"question/text length limit in characters (default {d.max_text_chars})")
    p.add_argument("--log-level", dest="log_level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=_serve)


def _defaults():
    from imglish.inference.server import ServeConfig

    return ServeConfig()
