"""The `imglish` command: one argparse parser whose subcommands call the public Python API.

Each concern registers its own subcommands from a module of this package (``model_cmds``, ``tokenizer_cmds``,
``data_cmds``, ``train_cmds``); nothing but argument parsing lives here. ``main(argv)`` returns an exit code so
tests can run the CLI in-process.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["build_parser", "main"]

# Modules that contribute subcommands; each defines ``register(subparsers) -> None`` and sets
# ``func`` on its parsers via ``set_defaults(func=...)`` where ``func(args) -> int``.
_COMMAND_MODULES = (
    "model_cmds", "tokenizer_cmds", "data_cmds", "train_cmds", "task_cmds", "predict_cmds", "embed_cmds", "serve_cmds",
    "export_cmds",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imglish",
        description=("BEiT-3 in PyTorch: models, tokenizers, data, pretraining, fine-tuning and evaluation, "
                     "inference and serving, ONNX export, parity checks."),
    )
    from imglish import __version__

    parser.add_argument("--version", action="version", version=f"imglish {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"imglish.cli.{name}")
        except ModuleNotFoundError as err:  # a concern not built yet
            if err.name == f"imglish.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"imglish {args.command}: error: {err}", file=sys.stderr)
        return 2
    except TimeoutError as err:  # parallel.DistributedTimeout: a rank waited too long for the others
        print(f"imglish {args.command}: error: {err}", file=sys.stderr)
        return 1
    # A command run under torchrun leaves its process group before the interpreter tears down: a group still alive
    # at exit can abort a rank after all its work is done ("terminate called without an active exception"). A
    # failing rank skips this, so torchrun stops the others as before.
    from imglish.training.parallel import destroy_distributed

    destroy_distributed()
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
