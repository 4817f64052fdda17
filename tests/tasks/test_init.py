"""The start of a fine-tune: the small positional tables of a random start (model.pos_init_std) and the VQA answer
prior in the head's bias (task.head_bias_prior) apply to new weights only, never to weights loaded from a file."""

from __future__ import annotations

import pytest
import torch

from imglish.model.loading import save_model
from imglish.tasks import get_task
from imglish.tokenizers.text import TextTokenizer
from imglish.training.config import build_config
from imglish.training.finetune import build_task_model
from tests.tasks.conftest import tiny_overrides


def _vqa(world, tmp, tokenizer, **extra):
    cfg = build_config("tiny", None, tiny_overrides(world, tmp, tokenizer, **extra), task="vqav2")
    tok = TextTokenizer(tokenizer)
    return cfg, get_task("vqav2")(cfg, world, tok), tok.vocab_size


def test_tiny_random_start_has_small_positions_and_the_answer_prior(task_world, task_tokenizer, tmp_path):
    cfg, task, vocab = _vqa(task_world, tmp_path, task_tokenizer)
    assert cfg.model.pos_init_std == 0.02 and cfg.task.head_bias_prior
    model = build_task_model(cfg, task, vocab)
    for table in (model.beit3.vision_pos_embed, model.beit3.text_pos_embed):
        assert table.std().item() == pytest.approx(0.02, rel=0.15)
    prior = task.answer_prior()
    assert prior.shape == (task.num_classes,) and 0 < prior.sum() and (prior < 1).all()
    p = prior.clamp(1e-4, 1 - 1e-4)
    torch.testing.assert_close(model.head[-1].bias.detach(), torch.log(p / (1 - p)))
    # the most frequent answer of the training split gets the largest bias
    assert model.head[-1].bias.argmax().item() == prior.argmax().item()


def test_official_start_is_kept_when_asked(task_world, task_tokenizer, tmp_path):
    cfg, task, vocab = _vqa(task_world, tmp_path, task_tokenizer,
                            **{"model.pos_init_std": None, "task.head_bias_prior": False})
    model = build_task_model(cfg, task, vocab)
    assert model.beit3.vision_pos_embed.std().item() == pytest.approx(1.0, rel=0.1)
    assert (model.head[-1].bias == 0).all()


def test_loaded_weights_are_not_reinitialised(task_world, task_tokenizer, tmp_path):
    cfg, task, vocab = _vqa(task_world, tmp_path, task_tokenizer, **{"model.pos_init_std": None,
                                                                    "task.head_bias_prior": False})
    trained = build_task_model(cfg, task, vocab)
    with torch.no_grad():
        trained.head[-1].bias.fill_(0.5)
    path = save_model(trained, tmp_path / "ft" / "model.safetensors")
    cfg2, task2, _ = _vqa(task_world, tmp_path, task_tokenizer)  # tiny: small positions and the prior
    loaded = build_task_model(cfg2, task2, vocab, init=str(path))
    torch.testing.assert_close(loaded.beit3.vision_pos_embed, trained.beit3.vision_pos_embed)
    assert (loaded.head[-1].bias == 0.5).all()  # a loaded head keeps its weights
    with pytest.raises(ValueError, match="pos_init_std"):
        build_config("tiny", None, {"model.pos_init_std": 0.0}, task="vqav2")
