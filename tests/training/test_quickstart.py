"""The quickstart end to end at a toy scale: world, tokenizers, pretraining, every task fine-tuned from the
pretrained model and from scratch, the report and results.json; a second run reuses every stage, ``--init`` skips
pretraining, and ``imglish evaluate`` reproduces a reported number from the files the quickstart leaves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imglish.cli.main import main as cli_main
from imglish.training.quickstart import QUICKSTART_TASKS, SIDES, finetune_config, quickstart

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# a toy scale: every stage runs, none learns much
PRETRAIN = {
    "data.visual_tokenizer_steps": 4,
    "data.visual_tokenizer_codes": 16,
    "data.visual_tokenizer_batch": 8,
    "data.text_vocab_size": 120,
    "data.image_batch": 4,
    "data.text_batch": 4,
    "data.pair_batch": 4,
    "data.heldout_batches": 1,
    "schedule.warmup_steps": 1,
    "checkpoint.save_every": 0,
    "logging.progress": False,
    "logging.tensorboard": False,
}
FINETUNE = {
    "schedule.max_steps": 2,
    "schedule.warmup_steps": 1,
    "task.max_train_examples": 16,
    "task.batch_size": 8,
    "task.eval_batch_size": 16,
    "task.num_beams": 1,
    "task.max_gen_len": 6,
    "checkpoint.save_every": 0,
    "logging.tensorboard": False,
}


def _mtimes(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*.safetensors")}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qs") / "out"
    quickstart(out, max_steps=3, num_images=60, seed=1, overrides=PRETRAIN, budget_s=None,
               finetune_overrides=FINETUNE, jobs=1)
    return out


def test_quickstart_writes_every_task_on_both_sides(run):
    res = json.loads((run / "results.json").read_text())
    assert set(res) >= {"tasks", "pretraining", "elapsed_s"}
    assert list(res["tasks"]) == list(QUICKSTART_TASKS)
    from imglish.tasks import get_task

    for task, r in res["tasks"].items():
        assert r["metric"] == get_task(task).main_metric
        assert r["train_examples"] == 16
        for side in SIDES:
            run_dir = run / "finetune" / task / side
            metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
            assert r[side] == pytest.approx(metrics[r["metric"]])  # as in the task's metrics.json
            assert (run_dir / "model.safetensors").is_file()
            assert not (run_dir / "checkpoints").exists()  # a finished fine-tune keeps its model, not its resume state
            assert (run_dir / "processor.json").is_file() or any(run_dir.glob("*processor*"))
            summary = json.loads((run_dir / "summary.json").read_text())
            assert summary["split"] == "test" and summary["steps"] == 2
            assert (summary["init"] is not None) == (side == "pretrained")
    assert res["pretraining"]["steps"] == 3
    assert set(res["pretraining"]["heldout"]) >= {"image.mim", "text.mlm", "pair.mlm"}
    report = (run / "report.md").read_text()
    assert "| task | metric | pretrained | from scratch | difference | labelled examples | steps |" in report
    for task in QUICKSTART_TASKS:
        assert f"| {task} |" in report
    assert "## Pretraining" in report and "## Wall time" in report
    ahead = [t for t, r in res["tasks"].items() if r["pretrained"] > r["scratch"]]
    behind = [t for t in res["tasks"] if t not in ahead]
    assert (f"ahead on {', '.join(ahead) or 'no task'}, not on {', '.join(behind)}" if behind
            else "ahead on every task") in report
    for png in ("finetune.png", "loss_curves.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_both_sides_share_recipe_architecture_and_tokenizer(run):
    init = run / "model.safetensors"
    a = finetune_config("vqav2", "pretrained", run / "a", run / "data", init, seed=1)
    b = finetune_config("vqav2", "scratch", run / "b", run / "data", init, seed=1)
    assert a.model.init_from == str(init) and b.model.init_from is None
    a.model.init_from = None
    for x in (a, b):
        x.out = "same"
    assert a == b
    assert b.model.patch_size == 16 and b.data.text_tokenizer and Path(b.data.text_tokenizer).is_file()


def test_evaluate_reproduces_the_reported_number(run, tmp_path, capsys):
    res = json.loads((run / "results.json").read_text())["tasks"]["vqav2"]
    ckpt = run / "finetune" / "vqav2" / "pretrained" / "model.safetensors"
    rc = cli_main(["evaluate", "vqav2", "--data", str(run / "data"), "--checkpoint", str(ckpt), "--split", "test",
                   "--out", str(tmp_path / "ev")])
    assert rc == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]
    assert metrics["vqa_accuracy"] == pytest.approx(res["pretrained"])


def test_second_run_reuses_every_stage(run, capsys):
    before = _mtimes(run)
    quickstart(run, max_steps=3, num_images=60, seed=1, overrides=PRETRAIN, budget_s=None,
               finetune_overrides=FINETUNE, jobs=1)
    printed = capsys.readouterr().out
    assert "pretraining: reusing" in printed and "(10 reused)" in printed
    assert _mtimes(run) == before


def test_init_skips_pretraining_and_tasks_choose_a_subset(run, tmp_path, capsys):
    out = tmp_path / "again"
    rc = cli_main(["quickstart", "--out", str(out), "--num-images", "60", "--seed", "1", "--tasks", "imagenet",
                   "--skip-pretraining", "--init", str(run / "model.safetensors"), "--jobs", "1",
                   "--no-time-limit", "--finetune", "schedule.max_steps=2", "--finetune", "task.max_train_examples=16"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["tasks"]) == ["imagenet"] and res["pretraining"] == {}
    assert not (out / "model.safetensors").exists()  # nothing pretrained here
    assert "Skipped: the fine-tunes started from" in (out / "report.md").read_text()


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'vqa'"):
        quickstart(tmp_path / "x", tasks=["vqa"])
    with pytest.raises(FileNotFoundError, match="--init"):
        quickstart(tmp_path / "x", init=tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        quickstart(tmp_path / "x", init=corrupt)
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file
    import torch

    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a model written by imglish"):
        quickstart(tmp_path / "x", init=foreign)
    with pytest.raises(ValueError, match="unknown config key 'nosuch.key'"):
        quickstart(tmp_path / "x", finetune_overrides={"nosuch.key": 3})
    with pytest.raises(ValueError, match="objective.cls_head_pairs must be 'fused' or 'unimodal'"):
        quickstart(tmp_path / "x", overrides={"objective.cls_head_pairs": "towers"})
    assert not (tmp_path / "x").exists()  # refused before anything ran
    with pytest.raises(SystemExit, match="--skip-pretraining needs --init"):
        cli_main(["quickstart", "--out", str(tmp_path / "y"), "--skip-pretraining"])


def test_a_short_budget_stops_stages_early_and_says_so(tmp_path):
    out = tmp_path / "short"
    endless = dict(FINETUNE, **{"schedule.max_steps": 100000})
    quickstart(out, max_steps=100000, num_images=60, seed=1, overrides=PRETRAIN, budget_s=5.0, tasks=["vqav2"],
               finetune_overrides=endless, jobs=1)
    res = json.loads((out / "results.json").read_text())
    assert res["pretraining"]["stopped_early"] and res["pretraining"]["steps"] < 100000
    r = res["tasks"]["vqav2"]
    assert r["stopped_early"] and max(r["steps"].values()) < 100000
    report = (out / "report.md").read_text()
    assert report.count("**Stopped early**") == 2
    assert (out / "finetune" / "vqav2" / "scratch" / "checkpoints").is_dir()  # kept, to be finished
    # a run with no time limit finishes both stages from their checkpoints (two more steps each)
    pre_steps, ft_steps = res["pretraining"]["steps"], r["steps"]
    quickstart(out, max_steps=pre_steps + 2, num_images=60, seed=1, overrides=PRETRAIN, budget_s=None,
               tasks=["vqav2"], finetune_overrides=dict(endless, **{"schedule.max_steps": max(ft_steps.values()) + 2}),
               jobs=1)
    res = json.loads((out / "results.json").read_text())
    assert not res["pretraining"]["stopped_early"] and res["pretraining"]["steps"] == pre_steps + 2
    r2 = res["tasks"]["vqav2"]
    assert not r2["stopped_early"] and set(r2["steps"].values()) == {max(ft_steps.values()) + 2}
    assert "**Stopped early**" not in (out / "report.md").read_text()


def test_pair_stream_is_also_scored_with_other_images(run):
    import torch

    from imglish.training.pretrain import _with_other_images

    pair = {"image": torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 2, 2), "text_ids": torch.arange(6).view(3, 2),
            "image_mask": torch.tensor([[True], [False], [False]]), "visual_targets": torch.tensor([[7], [8], [9]])}
    moved = _with_other_images({"pair": pair, "text": {"text_ids": torch.zeros(1, 2)}})
    assert list(moved) == ["pair"]  # only the pair stream is scored again
    assert moved["pair"]["image"][:, 0, 0, 0].tolist() == [2.0, 0.0, 1.0]
    assert moved["pair"]["visual_targets"].view(-1).tolist() == [9, 7, 8]  # the codes travel with their image
    assert moved["pair"]["image_mask"].view(-1).tolist() == [False, True, False]
    assert torch.equal(moved["pair"]["text_ids"], pair["text_ids"])  # each caption stays where it was
    assert _with_other_images({"pair": {k: v[:1] for k, v in pair.items()}}) is None  # one pair: nothing to swap
    m = json.loads((run / "results.json").read_text())["pretraining"]["heldout"]["pair.mlm"]
    assert 0.0 <= m["other_image_accuracy"] <= 1.0
    assert "accuracy with another image" in (run / "report.md").read_text()


def test_report_says_where_the_pretrained_side_is_ahead(tmp_path):
    from imglish.training.quickstart import write_report

    def row(pre, scr):
        return {"metric": "acc1", "pretrained": pre, "scratch": scr, "train_examples": 10,
                "steps": {"pretrained": 5, "scratch": 5}, "stopped_early": False, "split": "test"}

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    mixed = {"imagenet": row(30.0, 20.0), "vqav2": row(40.0, 45.0), "nlvr2": row(50.0, 50.0)}
    text = write_report(tmp_path / "a", None, None, 1.0, {}, results=mixed, init="m.safetensors").read_text()
    assert "The pretrained side is ahead on imagenet, not on vqav2, nlvr2, in this one-seed run." in text
    both = {"imagenet": row(30.0, 20.0), "vqav2": row(46.0, 45.0)}
    text = write_report(tmp_path / "b", None, None, 1.0, {}, results=both, init="m.safetensors").read_text()
    assert "The pretrained side is ahead on every task (imagenet, vqav2), in this one-seed run." in text
