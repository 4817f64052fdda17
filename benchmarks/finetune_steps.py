"""One fine-tuning optimizer step of every task, imglish against the official code, same weights, same inputs.

For each task at its official resolution (base size by default) the script builds a reconstruction of the official
task model (`beit3/modeling_finetune.py`: torchscale 0.3.0's `BEiT3` plus the task head, forward as the official
code writes it), copies its state dict into the imglish task model through imglish's official-checkpoint loader,
checks that both give the same outputs and hidden states, and then times one training step of each:
zero grads, forward, task loss, backward, `AdamW.step()`. The two implementations alternate (ABBA) after a warm-up,
and the tables give medians.

| task | image | other inputs | official loss (spec §2.2) | imglish loss |
|---|---|---|---|---|
| `imagenet` | 224 | soft targets (mixup + label smoothing) | SoftTargetCrossEntropy | `ImageNetTask.loss_terms` |
| `vqav2` | 480 | 64-token question, 3129 soft scores | BCE-with-logits x 3129 | `VQAv2Task.loss_terms` |
| `nlvr2` | 2 x 224 | 64-token statement | cross-entropy | `NLVR2Task.loss_terms` |
| `coco_retrieval` | 384 | 64-token caption | ClipLoss (logit_scale.exp()) | `RetrievalTask.loss_terms` |
| `coco_captioning` | 480 | 32-token caption, ~70% masked | BertCaptioningLoss (eps 0.1) | `CocoCaptioningTask.loss_terms` |

imglish's loss is computed the way its trainer does it: `task.step_module(model)` (the task's summed loss terms
divided by their target counts), so what is timed is the real training path. The loss of the first step (both
sides still at the same weights) is recorded on each side and compared.

Model building, weight copying, the agreement check, the training step and the ABBA timing loop are those of
`official_vs_imglish.py` (imported, not copied). Run from the repository root (needs the `bench` extra):

    python benchmarks/finetune_steps.py --quick                    # two repeats
    python benchmarks/finetune_steps.py --reps 3 --update-doc docs/benchmarks.md
    python benchmarks/finetune_steps.py --size tiny --depth 1 --quick --out /tmp/ft   # a smoke test

bf16 is timed only where the CPU has AMX (`amx_bf16` in /proc/cpuinfo) unless `--dtypes` asks for it: without
matrix units a bf16 matmul has no fast CPU kernel, and a bf16 step would time that fallback on both sides.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official_vs_imglish as ovi  # noqa: E402

IMPLS = ovi.IMPLS
MASK_ID = 64001  # <mask> of the official XLM-R tokenizer (spec §2.4)
DOC_BEGIN, DOC_END = "<!-- finetune-steps:begin -->", "<!-- finetune-steps:end -->"


# ---------------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class FinetuneTask:
    """One fine-tuning task as benchmarked.

    Attributes:
        name: imglish task name (`imglish.tasks.get_task`), also the `--tasks` key.
        workload: what `official_vs_imglish` builds and feeds (resolution, text length, final LayerNorm, classes).
        imglish_model: class name of the imglish task model in `imglish.model`.
        inputs: a short description for the table.
    """

    name: str
    workload: ovi.Workload
    imglish_model: str
    inputs: str


TASKS = {
    t.name: t
    for t in (
        FinetuneTask("imagenet", ovi.Workload("imagenet", "ImageNet classification", 224, 0, normalize_output=False,
                                              num_classes=1000, pool="mean"),
                     "BEiT3ForImageClassification", "image, 1000 soft targets"),
        FinetuneTask("vqav2", ovi.Workload("vqav2", "VQAv2", 480, 64, normalize_output=False, num_classes=3129),
                     "BEiT3ForVisualQuestionAnswering", "image + 64-token question, 3129 soft scores"),
        FinetuneTask("nlvr2", ovi.Workload("nlvr2", "NLVR2", 224, 64, normalize_output=True, num_classes=2),
                     "BEiT3ForVisualReasoning", "2 images + 64-token statement"),
        FinetuneTask("coco_retrieval", ovi.Workload("coco_retrieval", "COCO retrieval", 384, 64, dual=True,
                                                    normalize_output=True),
                     "BEiT3ForRetrieval", "image + 64-token caption (two passes)"),
        FinetuneTask("coco_captioning", ovi.Workload("coco_captioning", "COCO captioning", 480, 32,
                                                     normalize_output=True, num_classes=64010),
                     "BEiT3ForCaptioning", "image + 32-token caption, ~70% masked"),
    )
}


def make_inputs(task: FinetuneTask, batch: int, seed: int) -> dict[str, Tensor]:
    """Random inputs under the official data loader's key names (spec §2.3), shared by both sides.

    Images are random normalised pixels; texts are `official_vs_imglish.make_batch` ids (BOS ... EOS, right
    padding of different lengths per row) with an int64 padding mask, as the official collate gives.
    """
    w = task.workload
    base = ovi.make_batch(w, batch, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    out: dict[str, Tensor] = {"image": base["image"]}
    if w.text_len:
        out["language_tokens"], out["padding_mask"] = base["text"], base["pad"].long()
    if task.name == "imagenet":
        # What timm's Mixup hands the official loss: a lambda-mix of the one-hot labels with the batch flipped,
        # label-smoothed (0.1); imglish's ImageNetTask.batch_transform makes the same kind of target.
        label = base["labels"]
        lam = 0.7
        one_hot = F.one_hot(label, w.num_classes).float()
        mixed = lam * one_hot + (1 - lam) * one_hot.flip(0)
        out["label"], out["target"] = label, mixed * 0.9 + 0.1 / w.num_classes
    elif task.name == "vqav2":
        scores = torch.zeros(batch, w.num_classes)
        for row in range(batch):
            answers = torch.randperm(w.num_classes, generator=gen)[:3]
            scores[row, answers] = torch.tensor([1.0, 0.6, 0.3])  # VQA soft scores of three annotated answers
        out["labels"] = scores
    elif task.name == "nlvr2":
        out["image2"] = torch.randn(out["image"].shape, generator=gen)
        out["label"] = torch.randint(0, 2, (batch,), generator=gen)
    elif task.name == "coco_captioning":
        from imglish.data.masking import mask_caption

        masked, pos, tokens = mask_caption(out["language_tokens"], out["padding_mask"], 0.7, mask_id=MASK_ID,
                                           generator=gen)
        out["language_tokens"], out["language_masked_pos"], out["masked_tokens"] = masked, pos, tokens
    return out


# ---------------------------------------------------------------------------------------------------- official side
def _init_official_head(module: nn.Module, scale: float = 1.0) -> None:
    """The official `_init_weights` on a head (trunc-normal 0.02 Linear weights, zero bias, unit LayerNorm), with
    the optional extra scaling some heads get."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                m.weight.mul_(scale)
                if m.bias is not None:
                    m.bias.mul_(scale)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class OfficialTaskModel(nn.Module):
    """A reconstruction of the official `beit3/modeling_finetune.py` task model of `task` (spec §2.2).

    Attribute names follow the official ones, so `state_dict()` has the official checkpoint layout. Besides the
    forward the official model has, it exposes what the benchmark needs: `outputs` (what the task predicts),
    `hidden` (every token's final hidden state of the first backbone pass) and `loss` (the official criterion of
    the task, as `engine_for_finetuning.py` applies it), all on a batch in the official key names.
    """

    def __init__(self, task: FinetuneTask, beit3: nn.Module, dim: int) -> None:
        super().__init__()
        self.task = task.name
        self.beit3 = beit3
        w = task.workload
        if task.name == "imagenet":
            self.fc_norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, w.num_classes)
            _init_official_head(self.fc_norm)
            _init_official_head(self.head, scale=0.001)
        elif task.name == "vqav2":
            self.pooler = nn.Module()
            self.pooler.norm = nn.LayerNorm(dim)
            self.pooler.dense = nn.Linear(dim, dim)
            self.head = nn.Sequential(nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.GELU(),
                                      nn.Linear(2 * dim, w.num_classes))
            _init_official_head(self.pooler)
            _init_official_head(self.head)
        elif task.name == "nlvr2":
            self.head = nn.Module()
            self.head.norm1 = nn.LayerNorm(4 * dim)
            self.head.dense1 = nn.Linear(4 * dim, 2 * dim)
            self.head.norm2 = nn.LayerNorm(2 * dim)
            self.head.dense2 = nn.Linear(2 * dim, w.num_classes)
            _init_official_head(self.head)
            _init_official_head(self.head.dense1, scale=0.001)
            _init_official_head(self.head.dense2, scale=0.001)
        elif task.name == "coco_retrieval":
            self.language_head = nn.Linear(dim, dim, bias=False)
            self.vision_head = nn.Linear(dim, dim, bias=False)
            self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
            _init_official_head(self.language_head)
            _init_official_head(self.vision_head)
        elif task.name == "coco_captioning":
            self.mlm_head = nn.Linear(dim, w.num_classes)
            _init_official_head(self.mlm_head)
        else:
            raise ValueError(f"no official reconstruction for task {task.name!r}")

    # ------------------------------------------------------------------ backbone passes
    def _pass(self, text: Tensor | None, image: Tensor | None, pad: Tensor | None,
              attn_mask: Tensor | None = None) -> dict:
        return self.beit3(textual_tokens=text, visual_tokens=image, text_padding_position=pad, attn_mask=attn_mask)

    def _captioning_mask(self, text_len: int, device: torch.device) -> tuple[Tensor, int]:
        image_len = self.beit3.vision_embed.num_position_embeddings()
        max_len = text_len + image_len
        uni_mask = torch.zeros((max_len, max_len), dtype=torch.long, device=device)
        uni_mask[image_len:, image_len:] = torch.tril(torch.ones(text_len, text_len, dtype=torch.long, device=device))
        uni_mask[image_len:, :image_len] = 1
        uni_mask[:image_len, :image_len] = 1
        return 1 - uni_mask, image_len

    def _first_pass(self, b: dict[str, Tensor]) -> dict:
        """The task's (first) backbone pass, exactly as the official forward makes it."""
        if self.task == "imagenet":
            return self._pass(None, b["image"], None)
        if self.task == "vqav2":
            return self._pass(b["language_tokens"], b["image"], b["padding_mask"])
        if self.task == "nlvr2":
            return self._pass(torch.cat([b["language_tokens"]] * 2), torch.cat([b["image"], b["image2"]]),
                              torch.cat([b["padding_mask"]] * 2))
        if self.task == "coco_retrieval":
            return self._pass(None, b["image"], None)
        mask, _ = self._captioning_mask(b["language_tokens"].shape[1], b["language_tokens"].device)
        return self._pass(b["language_tokens"], b["image"], b["padding_mask"], mask)

    def hidden(self, b: dict[str, Tensor]) -> Tensor:
        return self._first_pass(b)["encoder_out"]

    # ------------------------------------------------------------------ task outputs and losses
    def outputs(self, b: dict[str, Tensor]) -> tuple[Tensor, ...]:
        if self.task == "coco_retrieval":
            x = self._pass(None, b["image"], None)["encoder_out"]
            vision_cls = F.normalize(self.vision_head(x[:, 0, :]), dim=-1)
            x = self._pass(b["language_tokens"], None, b["padding_mask"])["encoder_out"]
            language_cls = F.normalize(self.language_head(x[:, 0, :]), dim=-1)
            return vision_cls, language_cls
        out = self._first_pass(b)
        x = out["encoder_out"]
        if self.task == "imagenet":
            return (self.head(self.fc_norm(x[:, 1:, :].mean(1))),)
        if self.task == "vqav2":
            pooled = torch.tanh(self.pooler.dense(self.pooler.norm(x[:, 0, :])))
            return (self.head(pooled),)
        if self.task == "nlvr2":
            bsz = b["language_tokens"].shape[0]
            split = out["multiway_split_position"]
            cls_rep = torch.cat((x[:, 0, :], x[:, split, :]), dim=-1)
            a, c = torch.split(cls_rep, [bsz, bsz], dim=0)
            h = self.head
            return (h.dense2(F.gelu(h.norm2(h.dense1(h.norm1(torch.cat((a, c), dim=-1)))))),)
        _, image_len = self._captioning_mask(b["language_tokens"].shape[1], x.device)
        text_feats = x[:, image_len:][b["language_masked_pos"].bool()]
        return (self.mlm_head(text_feats),)

    def loss(self, b: dict[str, Tensor]) -> Tensor:
        if self.task == "coco_retrieval":  # ClipLoss on one rank, logit_scale.exp() never clamped
            vision_cls, language_cls = self.outputs(b)
            scale = self.logit_scale.exp()
            logits_per_image = scale * vision_cls @ language_cls.t()
            logits_per_text = scale * language_cls @ vision_cls.t()
            labels = torch.arange(vision_cls.shape[0], device=vision_cls.device)
            return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        (logits,) = self.outputs(b)
        if self.task == "imagenet":  # timm SoftTargetCrossEntropy
            return torch.sum(-b["target"] * F.log_softmax(logits, dim=-1), dim=-1).mean()
        if self.task == "vqav2":  # BCEWithLogitsLoss(reduction="mean") * num_classes
            labels = b["labels"]
            return F.binary_cross_entropy_with_logits(logits.float(), labels.float()) * labels.shape[1]
        if self.task == "nlvr2":
            return F.cross_entropy(logits, b["label"])
        # BertCaptioningLoss(label_smoothing=0.1, ...) at iteration 0 (no drop-worst yet)
        target = b["masked_tokens"][b["language_masked_pos"].bool()]
        eps, n_class = 0.1, logits.size(1)
        one_hot = torch.zeros_like(logits).scatter(1, target.view(-1, 1), 1)
        one_hot = one_hot * (1 - eps) + (1 - one_hot) * eps / (n_class - 1)
        return F.kl_div(F.log_softmax(logits, dim=1), one_hot, reduction="none").sum(1).mean()


# ---------------------------------------------------------------------------------------------------- imglish side
IMGLISH_TASK_CLASSES = {
    "imagenet": ("classification", "ImageNetTask"),
    "vqav2": ("vqa", "VQAv2Task"),
    "nlvr2": ("nlvr2", "NLVR2Task"),
    "coco_retrieval": ("retrieval", "RetrievalTask"),
    "coco_captioning": ("captioning", "CocoCaptioningTask"),
}


def imglish_task_class(name: str) -> type:
    """The imglish task class of `name`, imported from its own module (`imglish.tasks.<module>`)."""
    import importlib

    module, cls = IMGLISH_TASK_CLASSES[name]
    return getattr(importlib.import_module(f"imglish.tasks.{module}"), cls)


class ImglishTaskSide(nn.Module):
    """An imglish task model with its task object; same interface as `OfficialTaskModel`.

    `loss` runs the trainer's path: the task's `step_module` (summed loss terms divided by their target counts).
    """

    def __init__(self, task: FinetuneTask, model: nn.Module) -> None:
        super().__init__()
        from imglish.training.config import TaskConfig, TrainConfig

        self.task = task.name
        self.model = model
        task_obj = imglish_task_class(task.name)(TrainConfig(task=TaskConfig(name=task.name)))
        self.step = task_obj.step_module(model)
        self.loss_source = f"{type(task_obj).__module__}.{type(task_obj).__name__}.loss_terms"

    def batch(self, b: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch under the imglish task's key names (same tensors)."""
        if self.task == "imagenet":
            return {"image": b["image"], "label": b["label"], "target": b["target"]}
        if self.task == "vqav2":
            return {"image": b["image"], "question": b["language_tokens"], "padding_mask": b["padding_mask"],
                    "target": b["labels"]}
        if self.task == "nlvr2":
            return {"image": b["image"], "image2": b["image2"], "text": b["language_tokens"],
                    "padding_mask": b["padding_mask"], "label": b["label"]}
        if self.task == "coco_retrieval":
            return {"image": b["image"], "language_tokens": b["language_tokens"], "padding_mask": b["padding_mask"]}
        return {"image": b["image"], "text_ids": b["language_tokens"], "padding_mask": b["padding_mask"],
                "language_masked_pos": b["language_masked_pos"], "masked_tokens": b["masked_tokens"]}

    def hidden(self, b: dict[str, Tensor]) -> Tensor:
        backbone = self.model.beit3
        if self.task in ("imagenet", "coco_retrieval"):
            return backbone(b["image"]).last_hidden_state
        if self.task == "vqav2":
            return backbone(b["image"], b["language_tokens"], b["padding_mask"]).last_hidden_state
        if self.task == "nlvr2":
            return backbone(torch.cat([b["image"], b["image2"]]), torch.cat([b["language_tokens"]] * 2),
                            torch.cat([b["padding_mask"]] * 2)).last_hidden_state
        from imglish.model.heads import captioning_attention_mask

        grid = b["image"].shape[-1] // self.model.config.patch_size
        mask = captioning_attention_mask(1 + grid * grid, b["language_tokens"].shape[1])
        return backbone(b["image"], b["language_tokens"], b["padding_mask"], attn_mask=mask).last_hidden_state

    def outputs(self, b: dict[str, Tensor]) -> tuple[Tensor, ...]:
        m, x = self.model, self.batch(b)
        if self.task == "imagenet":
            return (m(image=x["image"]),)
        if self.task == "vqav2":
            return (m(image=x["image"], question=x["question"], padding_mask=x["padding_mask"]),)
        if self.task == "nlvr2":
            return (m(image_a=x["image"], image_b=x["image2"], text_description=x["text"],
                      padding_mask=x["padding_mask"]),)
        if self.task == "coco_retrieval":
            return m(image=x["image"], text_description=x["language_tokens"], padding_mask=x["padding_mask"],
                     only_infer=True)
        return (m(x["image"], x["text_ids"], x["padding_mask"], x["language_masked_pos"])[0],)

    def loss(self, b: dict[str, Tensor]) -> Tensor:
        from imglish.tasks.base import STREAM

        return self.step({STREAM: self.batch(b)}, None, 0).loss


class _FirstLoss(nn.Module):
    """Wraps a side so that the loss of its first call (before any optimizer step) is kept in `first_loss`."""

    def __init__(self, side: nn.Module) -> None:
        super().__init__()
        self.side = side
        self.first_loss: float | None = None

    def loss(self, b: dict[str, Tensor]) -> Tensor:
        loss = self.side.loss(b)
        if self.first_loss is None:
            self.first_loss = float(loss.detach())
        return loss

    def outputs(self, b: dict[str, Tensor]) -> tuple[Tensor, ...]:
        return self.side.outputs(b)

    def hidden(self, b: dict[str, Tensor]) -> Tensor:
        return self.side.hidden(b)


@contextlib.contextmanager
def _no_random_init():
    """Make `torch.nn.init`'s random initialisers no-ops for a while.

    Used only around the construction of the imglish model, whose every parameter is then overwritten by the
    official weights (`build_imglish` refuses a load that is not clean, so nothing is left uninitialised). It
    saves minutes of `trunc_normal_` on a loaded CPU; nothing timed is affected.
    """
    names = ("trunc_normal_", "normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
             "xavier_normal_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def build_task_pair(settings: ovi.Settings, task: FinetuneTask) -> dict[str, _FirstLoss]:
    """Both task models with identical weights: the official reconstruction (official backbone init, official
    head init) and the imglish task model it is copied into through `imglish.model.load_checkpoint`."""
    import imglish.model as im

    torch.manual_seed(settings.seed)
    w = task.workload
    dim = ovi.model_dims(settings)["embed_dim"]
    official = OfficialTaskModel(task, ovi.build_official(settings, w, w.img_size), dim)
    kwargs = {"num_classes": w.num_classes} if task.name in ("imagenet", "vqav2", "nlvr2") else {}
    with _no_random_init():
        ours = ovi.build_imglish(settings, w, w.img_size, weights=official.state_dict(),
                                 model_cls=getattr(im, task.imglish_model), **kwargs)
    return {"imglish": _FirstLoss(ImglishTaskSide(task, ours)), "official": _FirstLoss(official)}


# ---------------------------------------------------------------------------------------------------- measurement
def has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_task(settings: ovi.Settings, task: FinetuneTask, batch: int, dtypes: tuple[str, ...], warmup: int,
             reps: int, agreement: bool, log: Callable[[str], None]) -> list[dict]:
    start = time.perf_counter()
    pair = build_task_pair(settings, task)
    data = make_inputs(task, batch, settings.seed)
    log(f"[{task.name}] built both models in {time.perf_counter() - start:.0f}s")
    agree = None
    if agreement:  # on the last example only (a padded one when the batch has several): half the cost of all
        agree = ovi.check_agreement(pair, task.workload, {k: v[-1:] for k, v in data.items()})
    if agree:
        log(f"[{task.name}] agreement: outputs max |diff| {agree['max_abs_diff']:.2e} (up to "
            f"{agree['output_max_abs']:.2e}), hidden states {agree['hidden_max_abs_diff']:.2e}")
    rows = []
    for dtype in dtypes:
        if len(dtypes) > 1:
            pair = build_task_pair(settings, task)  # every dtype starts from the same weights
        steps = {impl: ovi.make_step(pair[impl], "train", dtype, data, settings.fused_adamw) for impl in IMPLS}
        load_before = loadavg()
        times = ovi.abba_times(steps, warmup, reps)
        losses = {impl: pair[impl].first_loss for impl in IMPLS}
        row: dict[str, Any] = {
            "task": task.name, "resolution": task.workload.img_size, "inputs": task.inputs, "batch": batch,
            "dtype": dtype, "times": times, "load_before": load_before, "load_after": loadavg(),
            "first_loss": losses, "loss_abs_diff": abs(losses["imglish"] - losses["official"]),
            "imglish_loss": pair["imglish"].side.loss_source, "agreement": agree,
        }
        for impl in IMPLS:
            row[impl] = {"median_s": statistics.median(times[impl]), "best_s": min(times[impl])}
        row["speedup"] = row["official"]["median_s"] / row["imglish"]["median_s"]
        row["speedup_best"] = row["official"]["best_s"] / row["imglish"]["best_s"]
        rows.append(row)
        log(f"[{task.name}] {dtype}: official {row['official']['median_s']:.2f} s/step, imglish "
            f"{row['imglish']['median_s']:.2f} s/step, speed-up {row['speedup']:.2f}x; first loss official "
            f"{losses['official']:.6f}, imglish {losses['imglish']:.6f} (load {row['load_after']})")
        del steps
    del pair
    gc.collect()
    return rows


# ---------------------------------------------------------------------------------------------------- reporting
def render_markdown(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    depth = "" if s["depth"] is None else f", depth {s['depth']}"
    lines = [
        "| task | resolution | inputs | batch | dtype | official s/step | imglish s/step | speed-up (medians) | "
        "speed-up (best runs) | first-step loss, official / imglish | loss agreement (abs. diff.) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        res = f"{r['resolution']}" + (" x 2" if r["task"] == "nlvr2" else "")
        lo = r["first_loss"]
        lines.append(
            f"| `{r['task']}` | {res} | {r['inputs']} | {r['batch']} | {r['dtype']} | "
            f"{r['official']['median_s']:.2f} | {r['imglish']['median_s']:.2f} | **{r['speedup']:.2f}x** | "
            f"{r['speedup_best']:.2f}x | {lo['official']:.5f} / {lo['imglish']:.5f} | {r['loss_abs_diff']:.1e} "
            f"({r['loss_abs_diff'] / max(abs(lo['official']), 1e-30):.0e} relative) |"
        )
    agree = [r for r in results["rows"] if r.get("agreement")]
    if agree:
        lines += ["", "Agreement before timing (float32, eval mode, same weights, the batch's last example), max "
                  "|imglish - official| of the task outputs (logits; normalised features for retrieval) and, in "
                  "brackets, of every token's final hidden state of the first backbone pass: "
                  + ", ".join(f"`{r['task']}` {r['agreement']['max_abs_diff']:.1e} "
                              f"[{r['agreement']['hidden_max_abs_diff']:.1e}] (outputs up to "
                              f"{r['agreement']['output_max_abs']:.2g})"
                              for r in agree if r["dtype"] == agree[0]["dtype"]) + "."]
    lines += [
        "",
        f"Measured {results['date']} on {m['cpu']} ({m['logical_cpus']} logical CPUs, {m['threads']} torch threads, "
        f"`{m['cpu_capability']}` kernels, AMX: {'yes' if results['amx'] else 'no'}), torch "
        f"{m['versions']['torch']}, torchscale {m['versions']['torchscale']}; model {s['size']}{depth}; "
        f"{results['warmup']} warm-up step and {results['reps']} timed steps per side and task, imglish and official "
        f"alternating (ABBA); medians. `OMP_WAIT_POLICY={results.get('omp_wait_policy') or 'unset'}`. Optimizer: AdamW(lr 1e-5, weight decay 0.05, fused={s['fused_adamw']}) over "
        f"all parameters on both sides. `/proc/loadavg` before the run: `{results['load_before']}`; after: "
        f"`{results['load_after']}`.",
        "",
        f"Command: `{results['command']}`",
    ]
    for note in results.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, out: Path, doc: Path | None) -> str:
    out.mkdir(parents=True, exist_ok=True)
    block = render_markdown(results)
    ovi._atomic_write(out / "results.json", json.dumps(results, indent=1, default=str))
    ovi._atomic_write(out / "results.md", block)
    if doc is not None:
        ovi.update_doc(doc, block, DOC_BEGIN, DOC_END)
    return block


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--batch", type=int, default=2, help="examples per step (NLVR2: pairs, i.e. 2x images)")
    p.add_argument("--reps", type=int, default=3, help="timed steps per side and task")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side before timing")
    p.add_argument("--quick", action="store_true", help="two timed steps per side (overrides --reps)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--dtypes", default="auto",
                   help="fp32,bf16; 'auto' is fp32, plus bf16 (autocast) only when the CPU has AMX")
    p.add_argument("--size", default="base", help="model size (imglish SIZES name)")
    p.add_argument("--depth", type=int, default=None, help="override the number of layers (for development)")
    p.add_argument("--no-agreement", action="store_true", help="skip the output/hidden-state check before timing")
    p.add_argument("--no-fused-adamw", action="store_true", help="for-each AdamW on both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "finetune_steps")
    p.add_argument("--update-doc", type=Path, default=None,
                   help=f"Markdown file whose {DOC_BEGIN} ... {DOC_END} block is replaced by the table")
    p.add_argument("--from-json", type=Path, default=None, help="re-render results.md (and --update-doc) only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        print(write_outputs(json.loads(args.from_json.read_text()), args.out, args.update_doc), end="")
        return 0
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; expected some of {', '.join(TASKS)}")
    for name in tasks:  # fail now, not after minutes of timing, if a task module does not import
        imglish_task_class(name)
    reps = 2 if args.quick else args.reps
    if reps < 1 or args.warmup < 0 or args.batch < 1:
        raise SystemExit("--reps and --batch must be >= 1, --warmup >= 0")
    amx = has_amx()
    notes = []
    if args.dtypes == "auto":
        dtypes: tuple[str, ...] = ("fp32", "bf16") if amx else ("fp32",)
        if not amx:
            notes.append("fp32 only: this CPU has no AMX (no `amx_bf16` flag), so a bf16 matmul has no "
                         "fast kernel here and a bf16 step would time the slow fallback on both sides. On a CPU "
                         "with AMX the same command also times bf16 autocast.")
    else:
        dtypes = tuple(d for d in args.dtypes.split(",") if d)
        bad = [d for d in dtypes if d not in ovi.DTYPES]
        if bad:
            raise SystemExit(f"unknown dtypes {bad}; expected fp32 and/or bf16")
    settings = ovi.Settings(size=args.size, depth=args.depth, threads=args.threads, seed=args.seed,
                            fused_adamw=not args.no_fused_adamw)
    torch.set_num_threads(settings.threads)
    omp = os.environ.get("OMP_WAIT_POLICY")

    def log(msg: str) -> None:
        print(msg, flush=True)

    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(([f"OMP_WAIT_POLICY={omp}"] if omp else []) + ["python", Path(sys.argv[0]).as_posix(),
                                                                          *sys.argv[1:]]),
        "omp_wait_policy": omp,
        "settings": asdict(settings), "machine": ovi.machine_info(settings), "amx": amx, "dtypes": list(dtypes),
        "batch": args.batch, "reps": reps, "warmup": args.warmup, "load_before": loadavg(), "notes": notes,
    }
    log(f"load average before: {results['load_before']}")
    started = time.perf_counter()
    results["rows"] = []
    for name in tasks:
        results["rows"] += run_task(settings, TASKS[name], args.batch, dtypes, args.warmup, reps,
                                    not args.no_agreement, log)
    results["load_after"] = loadavg()
    results["wall_s"] = time.perf_counter() - started
    log(f"load average after: {results['load_after']} ({results['wall_s']:.0f} s)")
    block = write_outputs(results, args.out, args.update_doc)
    print(block, end="")
    log(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
