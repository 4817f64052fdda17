"""imglish: BEiT-3 ("Image as a Foreign Language") in PyTorch."""

__version__ = "0.1.0"

from imglish.model import (  # noqa: E402
    BEiT3Config,
    KVCache,
    load_checkpoint,
    save_model,
)
from imglish.registry import create_model, get_model_info, list_models  # noqa: E402
from imglish.data import BadRecordCounter, WorldConfig, generate_world  # noqa: E402

__all__ = [
    "BadRecordCounter",
    "BEiT3Config",
    "KVCache",
    "create_model",
    "generate_world",
    "get_model_info",
    "list_models",
    "load_checkpoint",
    "save_model",
    "WorldConfig",
]
