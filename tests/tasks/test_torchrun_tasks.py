"""Every task command under ``torchrun --nproc_per_node 2`` (gloo) from an empty output folder, as a user would run
it: ``finetune`` trains its own text tokenizer on rank 0, trains on both ranks and evaluates on both; its metrics
and predictions equal a single-process ``evaluate`` of the checkpoint it wrote, with an evaluation set that does not
split evenly over the ranks and batches (no record duplicated or dropped). ``evaluate`` itself runs under torchrun
in tests/tasks/test_retrieval.py and here for captioning (the test split)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imglish.training.evaluate import evaluate

REPO = Path(__file__).resolve().parents[2]
#: 13 records over 2 ranks and batches of 4: ranks hold 7 and 6, each with a short last batch
EVAL = {"task.max_eval_examples": "13", "task.eval_batch_size": "4", "task.max_gen_len": "8",
        "task.caption_backend": "python", "parallel.threads": "1"}
QUICK = {"model.img_size": "32", "task.batch_size": "4", "schedule.max_steps": "2", "schedule.warmup_steps": "1",
         "checkpoint.save_every": "0", "logging.progress": "false", "logging.tensorboard": "false",
         "parallel.backend": "gloo", "parallel.device": "cpu", **EVAL}


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "imglish.cli.main", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)


def _flags(options: dict[str, str]) -> list[str]:
    return [x for k, v in options.items() for x in (f"--{k}", v)]


def _records(predictions: dict | list) -> list:
    """The prediction records of a predictions.json, whatever the task's layout."""
    if isinstance(predictions, dict):
        return [r for key in sorted(predictions) for r in _records(predictions[key])]
    return predictions


@pytest.mark.parametrize("task", ["imagenet", "vqav2", "coco_captioning"])
def test_finetune_under_torchrun_from_nothing_evaluates_like_one_process(task_world, tmp_path, task):
    run = tmp_path / "run"
    done = _torchrun("finetune", task, "--data", str(task_world), "--out", str(run), *_flags(QUICK))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 reports, once
    if task != "imagenet":  # the tasks with text train their tokenizer themselves, on rank 0
        assert (run / "tokenizers" / "text.model").is_file()
    two = json.loads((run / "metrics.json").read_text())
    one = evaluate(task, task_world, run / "model.safetensors", tmp_path / "one", split="val", progress=False,
                   overrides=dict(EVAL))
    assert two["metrics"] == pytest.approx(one.metrics, abs=1e-6)
    assert two["skipped"] == 0
    a = _records(json.loads((tmp_path / "one" / "predictions.json").read_text()))
    b = _records(json.loads((run / "predictions.json").read_text()))
    assert len(a) == 13 and a == b  # every record once, in record order

    if task != "coco_captioning":
        return
    # `evaluate` under torchrun too (captioning: beam search on padded batches), on another split
    two = _torchrun("evaluate", task, "--data", str(task_world), "--checkpoint", str(run / "model.safetensors"),
                    "--out", str(tmp_path / "two"), "--split", "test", "--parallel.backend", "gloo",
                    "--parallel.device", "cpu", *_flags(EVAL))
    assert two.returncode == 0, two.stderr[-3000:]
    one = evaluate(task, task_world, run / "model.safetensors", tmp_path / "one-test", split="test",
                   progress=False, overrides=dict(EVAL))
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["metrics"] == pytest.approx(one.metrics,
                                                                                                   abs=1e-6)
    assert _records(json.loads((tmp_path / "two" / "predictions.json").read_text())) == _records(
        json.loads((tmp_path / "one-test" / "predictions.json").read_text()))
