"""Inference: pipelines for people and programs (``imglish.pipeline``), batch embeddings and the server."""

from imglish.inference.inputs import InputError, to_image
from imglish.inference.pipeline import PIPELINES, Pipeline, load_labels, pipeline
from imglish.inference.templates import DEFAULT_TEMPLATES

__all__ = ["DEFAULT_TEMPLATES", "InputError", "PIPELINES", "Pipeline", "load_labels", "pipeline", "to_image"]
