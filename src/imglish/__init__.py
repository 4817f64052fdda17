"""imglish: BEiT-3 ("Image as a Foreign Language") in PyTorch.

The public names below load their module on first use, so `import imglish` is instant and a command such as
`imglish data shapes` does not pay for torchvision or the trainer.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # model
    "BEiT3Config": "imglish.model",
    "KVCache": "imglish.model",
    "load_checkpoint": "imglish.model",
    "save_model": "imglish.model",
    "create_model": "imglish.registry",
    "create_model_and_processor": "imglish.registry",
    "get_model_info": "imglish.registry",
    "list_models": "imglish.registry",
    # tokenizers and processors
    "ImageLoadError": "imglish.tokenizers",
    "Processor": "imglish.tokenizers",
    "TextTokenizer": "imglish.tokenizers",
    "build_transform": "imglish.tokenizers",
    "load_image": "imglish.tokenizers",
    # data
    "BadRecordCounter": "imglish.data",
    "WorldConfig": "imglish.data",
    "generate_world": "imglish.data",
    # training
    "pretrain": "imglish.training.pretrain",
    "build_config": "imglish.training.config",
    "TrainConfig": "imglish.training.config",
    "quickstart": "imglish.training.quickstart",
    # fine-tuning and evaluation
    "finetune": "imglish.training.finetune",
    "evaluate": "imglish.training.evaluate",
    "score": "imglish.training.evaluate",
    "list_tasks": "imglish.tasks",
    # inference
    "pipeline": "imglish.inference",
    # export
    "export_onnx": "imglish.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'imglish' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
