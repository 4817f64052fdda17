"""The export tests reuse the inference tests' tiny checkpoints (``make_checkpoint``) and their tokenizer."""

from tests.inference.conftest import infer_tokenizer  # noqa: F401 (a fixture)
