"""imglish: BEiT-3 ("Image as a Foreign Language") in PyTorch."""

__version__ = "0.1.0"

from imglish.model import (  # noqa: E402
    BEiT3Config,
    KVCache,
    load_checkpoint,
    save_model,
)
from imglish.registry import create_model, create_model_and_processor, get_model_info, list_models  # noqa: E402
from imglish.tokenizers import ImageLoadError, Processor, TextTokenizer, build_transform, load_image  # noqa: E402
from imglish.data import BadRecordCounter, WorldConfig, generate_world  # noqa: E402

# The trainer sits on top of the library (it imports TensorBoard and friends), so it is loaded on first use.
_LAZY = {
    "pretrain": ("imglish.training.pretrain", "pretrain"),
    "build_config": ("imglish.training.config", "build_config"),
    "TrainConfig": ("imglish.training.config", "TrainConfig"),
    "quickstart": ("imglish.training.quickstart", "quickstart"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'imglish' has no attribute {name!r}")


__all__ = [
    "BadRecordCounter",
    "BEiT3Config",
    "KVCache",
    "build_transform",
    "create_model",
    "create_model_and_processor",
    "generate_world",
    "ImageLoadError",
    "load_image",
    "Processor",
    "TextTokenizer",
    "get_model_info",
    "list_models",
    "load_checkpoint",
    "save_model",
    "WorldConfig",
    *_LAZY,
]
