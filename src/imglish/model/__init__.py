"""The BEiT-3 model: configuration, backbone, task heads, checkpoint conversion and loading."""

from imglish.model.backbone import BEiT3, BEiT3Output
from imglish.model.config import SIZES, BEiT3Config, size_config
from imglish.model.heads import (
    TASK_MODELS,
    BEiT3ForCaptioning,
    BEiT3ForImageClassification,
    BEiT3ForPretraining,
    BEiT3ForRetrieval,
    BEiT3ForVisualQuestionAnswering,
    BEiT3ForVisualReasoning,
    BEiT3Model,
    PretrainingOutput,
)
from imglish.model.dense import BEiT3ForDetection, BEiT3ForSemanticSegmentation
from imglish.model.layers import KVCache
from imglish.model.loading import LoadReport, load_checkpoint, read_checkpoint, save_model

__all__ = [
    "BEiT3", "BEiT3Config", "BEiT3ForCaptioning", "BEiT3ForDetection", "BEiT3ForSemanticSegmentation", "BEiT3ForImageClassification", "BEiT3ForPretraining",
    "BEiT3ForRetrieval", "BEiT3ForVisualQuestionAnswering", "BEiT3ForVisualReasoning", "BEiT3Model", "BEiT3Output",
    "KVCache", "LoadReport", "PretrainingOutput", "SIZES", "TASK_MODELS", "load_checkpoint", "read_checkpoint",
    "save_model", "size_config",
]
