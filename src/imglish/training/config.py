"""Typed configuration of a pretraining run: a tree of dataclasses built from a preset, a JSON file and flags.

The precedence is fixed: a named preset gives every default, a JSON config file overrides it, and command-line
flags of the form ``--section.key value`` override both. The resolved tree is written into the run folder
(``OUT/config.json``) and into every checkpoint, so a run can always be reproduced from its own output.

Example:
    >>> cfg = build_config("tiny", overrides={"schedule.max_steps": "20", "optim.lr": "1e-3"})
    >>> cfg.schedule.max_steps
    20
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tempfile
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "PRESETS",
    "CheckpointConfig",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "ParallelConfig",
    "ScheduleConfig",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "build_config",
    "config_from_dict",
    "config_to_dict",
    "get_preset",
    "list_presets",
    "resolve_preset",
    "load_config_file",
    "save_config",
]


@dataclass
class ModelConfig:
    """Which model to pretrain.

    Attributes:
        name: registered model name (``imglish.list_models("*pretraining")``).
        img_size: input image side in pixels.
        patch_size: patch side in pixels; the model sees ``(img_size // patch_size) ** 2`` patches.
        drop_path_rate: stochastic depth rate of the deepest block.
        init_from: optional ``model.safetensors`` to start from instead of a fresh initialisation.
        init_std: standard deviation of the backbone's Linear weights of a random start (normal, cut at two
            standard deviations); ``None`` keeps the official trunc-normal(0.02) cut at one (an effective 0.011),
            from which a small model trained from scratch barely mixes its tokens for hundreds of steps.
        pos_init_std: standard deviation of the two positional tables of a random start; ``None`` keeps the
            official N(0, 1), which swamps the text embeddings (std D^-0.5) and patch embeddings of a small model
            trained from scratch (ViT and BEiT v1/v2 start them at 0.02). Neither touches weights loaded from a
            checkpoint (see :meth:`imglish.model.backbone.BEiT3.init_for_scratch`).
        modalities: ``all`` (the released layout) or ``vision``: fine-tune a model that holds only the vision
            weights (no text embedding, no language experts; ``imglish.model.BEiT3Config.modalities``). For the
            tasks that read no text (``imagenet``, ``ade20k``, ``coco_detection``): the same outputs and training
            with 39% of a base model's parameters, less memory and files 2.6x smaller. A full checkpoint given as
            ``--init`` loads its vision weights and skips the rest.
    """

    name: str = "beit3_tiny_patch16_224_pretraining"
    img_size: int = 64
    patch_size: int = 8
    drop_path_rate: float = 0.0
    init_from: str | None = None
    init_std: float | None = None
    pos_init_std: float | None = None
    modalities: str = "all"


@dataclass
class DataConfig:
    """Where the three streams come from and how their samples are prepared.

    Attributes:
        path: a folder written by ``imglish data shapes`` (or laid out the same way).
        image_batch: global number of image-only samples per optimizer step (all ranks, all micro-steps).
        text_batch: global number of text-only samples per step.
        pair_batch: global number of image-text pairs per step.
        max_text_len: text length in tokens, BOS and EOS included.
        text_tokenizer: SentencePiece model file; ``None`` trains one into ``OUT/tokenizers/`` (or reuses it).
        text_vocab_size: vocabulary size used when the text tokenizer is trained here.
        text_tokenizer_type: SentencePiece model type used when the text tokenizer is trained here: ``bpe``
            (default) or ``unigram`` (the XLM-R kind of ``beit3.spm``). On a small-vocabulary corpus such as the
            synthetic world's, SentencePiece's unigram trainer keeps no whole word as a piece (its seed pieces are
            substrings shared by at least two distinct words), so ``right`` becomes ``▁r ig h t``; BPE merges by
            word frequency and keeps every frequent word whole (docs/tokenizers.md).
        visual_tokenizer: visual tokenizer file (VQ-KD, or a k-means tokenizer); ``None`` trains one into
            ``OUT/tokenizers/`` (or reuses it).
        visual_tokenizer_kind: what is trained here when ``visual_tokenizer`` is ``None``: ``vqkd`` (default; a
            tiny VQ-KD on the image stream, reconstructing ``visual_tokenizer_teacher``) or ``kmeans`` (a small conv
            CLIP trained contrastively on the pair stream, its patch features quantised by k-means:
            :mod:`imglish.tokenizers.kmeans`, a semantic tokenizer without a downloaded teacher).
        visual_tokenizer_codes: codebook size used when the visual tokenizer is trained here.
        visual_tokenizer_steps: training steps used when the visual tokenizer is trained here (for ``kmeans``: of
            the conv CLIP, batches of ``visual_tokenizer_batch``).
        visual_tokenizer_batch: the conv CLIP's contrastive batch (``kmeans`` only).
        visual_tokenizer_teacher: what the VQ-KD decoder reconstructs when the visual tokenizer is trained here
            (``imglish.tokenizers.teachers``): ``pixels+hog`` (default, no weights), ``clip:DIR``, ``dino:DIR``
            or ``beit3:FILE`` (an imglish retrieval model).
        visual_targets: ``online`` runs the visual tokenizer on each batch (on the tokenizer's view of the same
            crop the model sees); ``precomputed`` looks the image stream's codes up in a token file instead, which
            needs ``augment = false`` (the file holds the codes of the un-augmented, resized image).
        visual_tokens: the token file for ``precomputed`` (``imglish tokenizer precompute`` over the image-only
            folder); ``None`` writes ``OUT/tokenizers/visual_tokens.safetensors`` (or reuses it).
        format: ``files`` reads the folder's datasets through the index-addressable readers (exact, independent of
            the number of processes); ``wds`` streams webdataset shards (for web-scale data; see
            :class:`imglish.training.streams.WdsStepBatches`).
        wds_images, wds_texts, wds_pairs: shards of each stream for ``wds`` (brace pattern, ``::`` list or folder);
            ``None``: ``DIR/wds/{images,text,pairs}-train-*.tar``.
        wds_shuffle_buffer: samples in each stream's shuffle buffer for ``wds``.
        augment: random resized crop and flip on the image streams; off gives a plain resize.
        num_workers: DataLoader worker processes (each builds whole micro-batches).
        heldout_fraction: share of each stream kept apart for the held-out masked-token accuracy.
        heldout_batches: number of held-out batches per stream in the final evaluation.
        strict: raise on a bad record instead of skipping and counting it.
    """

    path: str | None = None
    image_batch: int = 32
    text_batch: int = 32
    pair_batch: int = 32
    max_text_len: int = 32
    text_tokenizer: str | None = None
    text_vocab_size: int = 256
    text_tokenizer_type: str = "bpe"
    visual_tokenizer: str | None = None
    visual_tokenizer_kind: str = "vqkd"
    visual_tokenizer_codes: int = 64
    visual_tokenizer_steps: int = 300
    visual_tokenizer_batch: int = 128
    visual_tokenizer_teacher: str = "pixels+hog"
    visual_targets: str = "online"
    visual_tokens: str | None = None
    format: str = "files"
    wds_images: str | None = None
    wds_texts: str | None = None
    wds_pairs: str | None = None
    wds_shuffle_buffer: int = 1000
    augment: bool = True
    num_workers: int = 0
    heldout_fraction: float = 0.1
    heldout_batches: int = 4
    strict: bool = False


@dataclass
class ObjectiveConfig:
    """Masked data modeling: what is masked in each stream and how the stream losses are weighted.

    Attributes:
        image_mask_ratio: share of patches masked block-wise in the image stream (paper: 0.4).
        text_mask_prob: share of text tokens masked in the text stream (paper: 0.15).
        pair_text_mask_prob: share of text tokens masked in the pair stream (paper: 0.5).
        pair_image_mask_ratio: share of patches also masked in the pair stream (0 keeps the image whole).
        replace_80_10_10: BERT's replacement (80% mask, 10% random, 10% kept) instead of always the mask id.
        min_block_patches: smallest block of the block-wise masking (BEiT: 16 at 14x14; scaled here).
        image_weight: weight of the image stream loss in the total.
        text_weight: weight of the text stream loss.
        pair_weight: weight of the pair stream loss.
        cls_head_layers: layers of a [CLS] head in the manner of BEiT v2 (0: none, BEiT-3 as published). It
            predicts every stream's masked targets again from the last layer's first tokens (the vision CLS and
            the text BOS, which VQA, NLVR2 and retrieval pool) and layer ``cls_head_from``'s other tokens, so that
            pretraining trains the pooled tokens too (``imglish.model.heads.BEiT3ForPretraining``).
        cls_head_from: the layer whose tokens the [CLS] head reads (0: the embeddings; -1: half the depth).
        cls_head_weight: weight of the [CLS] head's terms, relative to their stream's weight.
        cls_head_pairs: where the [CLS] head takes a pair's first tokens from: ``fused`` (the pair's own forward)
            or ``unimodal`` (an image-only and a text-only forward of the pair, as retrieval's towers compute them;
            two extra forwards per pair batch).
    """

    image_mask_ratio: float = 0.4
    text_mask_prob: float = 0.15
    pair_text_mask_prob: float = 0.5
    pair_image_mask_ratio: float = 0.0
    replace_80_10_10: bool = False
    min_block_patches: int = 4
    image_weight: float = 1.0
    text_weight: float = 1.0
    pair_weight: float = 1.0
    cls_head_layers: int = 0
    cls_head_from: int = -1
    cls_head_weight: float = 1.0
    cls_head_pairs: str = "fused"


@dataclass
class OptimConfig:
    """AdamW with the official no-decay groups (spec §7).

    Attributes:
        lr: peak learning rate.
        weight_decay: decoupled weight decay of the decayed group.
        betas: Adam betas.
        eps: Adam epsilon.
        layer_decay: layer-wise lr decay (1.0 disables it).
        clip_grad: max global gradient norm (``None`` or 0 disables clipping).
        accum_steps: micro-steps per optimizer step on each rank.
        fused: use the fused AdamW kernel where this build supports it.
        max_bad_steps: consecutive non-finite losses after which the run stops.
        in_backward: run each parameter's AdamW update inside the backward pass and free its gradient at once
            (:class:`imglish.training.optim.OptimizerInBackward`), which lowers the peak memory by about one copy
            of the weights. Needs ``clip_grad`` None/0 (no global gradient norm exists before the update),
            ``accum_steps = 1`` (every backward is an update) and a single process (DDP and FSDP reduce the
            gradients after the update would already have run). A non-finite loss is still caught before backward
            and the step skipped, but non-finite gradients with a finite loss are not, and ``grad_norm`` is logged
            as NaN.
    """

    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    layer_decay: float = 1.0
    clip_grad: float | None = 3.0
    accum_steps: int = 1
    fused: bool = True
    max_bad_steps: int = 5
    in_backward: bool = False


@dataclass
class ScheduleConfig:
    """Linear warmup from 0, then cosine decay to ``min_lr``.

    Attributes:
        max_steps: optimizer steps of the run.
        warmup_steps: steps of the linear warmup.
        min_lr: learning rate at the end of the cosine.
        time_limit_s: stop the loop after this many seconds (0: no limit), as a safety net for runs that must end
            by a deadline; the run then ends early at a checkpoint and ``PretrainSummary.stopped_early`` says so.
        epochs: fine-tuning: when > 0, ``max_steps`` becomes ``ceil(epochs * steps_per_epoch)`` once the training
            set is known, with ``steps_per_epoch = len(train) // task.batch_size`` (at least 1), as the official
            scripts count it (spec §7).
        warmup_epochs: fine-tuning: when > 0 (and ``epochs`` > 0), ``warmup_steps`` becomes
            ``round(warmup_epochs * steps_per_epoch)``.
    """

    max_steps: int = 1000
    warmup_steps: int = 50
    min_lr: float = 1e-5
    time_limit_s: float = 0.0
    epochs: float = 0.0
    warmup_epochs: float = 0.0


@dataclass
class CheckpointConfig:
    """Checkpoints in ``OUT/checkpoints/step-XXXXXXXX.pt``.

    Attributes:
        save_every: steps between checkpoints (0 saves only at the end).
        keep_last: number of newest checkpoints kept.
        resume: continue from the newest checkpoint in ``OUT`` when there is one.
        export_official: also write ``OUT/model_official.pth`` in the official key layout.
    """

    save_every: int = 100
    keep_last: int = 2
    resume: bool = False
    export_official: bool = False


@dataclass
class ParallelConfig:
    """How the run is executed.

    Attributes:
        precision: ``fp32`` or ``bf16`` (autocast; master weights stay fp32).
        strategy: ``auto`` (DDP when several processes, else none), ``none``, ``ddp`` or ``fsdp``.
        activation_checkpointing: activation recomputation in backward: ``false``/``none`` (off), ``true``/``full``
            (recompute each transformer block) or ``selective`` (keep matrix-product and attention outputs,
            recompute norms, GELU and adds: about half the activation memory for a few percent of time).
        compile: ``torch.compile`` each transformer block.
        compile_backend: the ``torch.compile`` backend (``inductor`` generates kernels; ``aot_eager`` only traces,
            which is quick to start and useful to check that a model compiles).
        backend: process-group backend; ``None`` picks nccl on GPU and gloo on CPU.
        device: ``auto``, ``cpu`` or ``cuda``.
        threads: torch intra-op threads (0 keeps torch's default).
        timeout_s: how long a rank waits in a collective or at a barrier for the others before it stops with an
            error naming what it waited for (a rank that died or hangs stops the rest after this long at most;
            under torchrun the agent also stops them as soon as it sees a worker exit).
        prepare_timeout_s: how long the other ranks wait for rank 0 to train the tokenizers or precompute the
            visual targets of a run folder (work only rank 0 does, and that may take long).
    """

    precision: str = "fp32"
    strategy: str = "auto"
    activation_checkpointing: bool | str = False
    compile: bool = False
    compile_backend: str = "inductor"
    backend: str | None = None
    device: str = "auto"
    threads: int = 0
    timeout_s: float = 1800.0
    prepare_timeout_s: float = 7200.0


@dataclass
class LoggingConfig:
    """What is reported while training.

    Attributes:
        log_every: steps between TensorBoard scalar writes and log lines.
        tensorboard: write TensorBoard scalars into ``OUT/tensorboard``.
        progress: show a tqdm progress bar (rank 0 only).
    """

    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True


@dataclass
class TaskConfig:
    """Which task a run trains, and the task's own knobs (fine-tuning; ``pretraining`` uses ``data``/``objective``).

    Attributes:
        name: ``pretraining`` or a fine-tuning task (``imglish.tasks.list_tasks()``: ``imagenet``, ``vqav2``,
            ``nlvr2``, ``coco_retrieval``, ``flickr30k``, ``coco_captioning``, ``nocaps``, ``ade20k``,
            ``coco_detection``).
        batch_size: global training examples per optimizer step (all ranks and micro-steps).
        eval_batch_size: examples per forward in evaluation, per process.
        eval_every: steps between evaluations on ``eval_split`` during training (0: only the final one).
        eval_split: the split of the evaluation after training (and of the periodic ones).
        max_train_examples: use only this many training records, a seeded subset (0: all); the low-label regime.
        max_eval_examples: evaluate on only this many records of the split, its first ones (0: all).
        label_smoothing: label smoothing of classification (imagenet) and captioning losses.
        mixup: mixup alpha (imagenet; 0 disables it).
        cutmix: cutmix alpha (imagenet; 0 disables it). With both on, each batch uses one of the two at random.
        randaug: RandAugment in the training transform; ``None`` follows the recipe (on for imagenet, vqav2 and
            the captioning tasks, off for nlvr2 and retrieval).
        crop_scale: smallest area share of the training RandomResizedCrop; ``None`` follows the recipe (imagenet
            0.08, the vision-language tasks 0.5).
        random_erasing: RandomErasing probability of the imagenet training transform; ``None``: the recipe's 0.25.
        head_lr_weight: learning-rate factor of parameters whose name starts with ``head`` (VQA recipe: 20).
        answer_min_count: VQA: answers of the training split kept in the vocabulary (official: 9).
        head_bias_prior: VQA: start the answer logits' bias at the log-odds of each answer's mean training target
            instead of the official 0 (when the head is new), so that the summed binary cross-entropy does not
            spend its first steps pushing every logit down together.
        mask_prob: captioning: share of caption tokens masked in training (recipes: 0.7).
        drop_worst_ratio: captioning: share of the largest per-token losses dropped (recipes: 0.2) ...
        drop_worst_after: ... after this many optimizer steps (recipes: 12000).
        num_beams: captioning: beam size of the evaluation decoding (official: 3).
        max_gen_len: captioning: longest generated caption in tokens, BOS included (official eval: 64).
        length_penalty: captioning: beam-search length penalty (official: 0.6).
        caption_backend: captioning metrics: ``auto`` (pycocoevalcap when Java is present, else pure Python),
            ``coco`` or ``python``.
        head_channels: dense tasks: width of the UperNet head (ade20k; 0: the embedding size) or of the feature
            pyramid and RPN/RoI heads (coco_detection; 0: 256).
        aux_weight: ade20k: weight of the FCN auxiliary head's loss (BEiT recipe: 0.4; 0 drops the head).
        scale_range: dense tasks: the random rescaling of training images, as factors of ``model.img_size``
            (ade20k: the shorter side becomes ``img_size * U(lo, hi)`` before the crop, recipe 0.5-2; coco_detection:
            large-scale jitter of the ``img_size`` square, recipe 0.1-2).
        slide_stride: ade20k: stride of the sliding-window evaluation in pixels (0: two thirds of the crop, as
            341 for 512).
        photometric: ade20k: random brightness, contrast, saturation and hue in training.
        anchor_sizes: coco_detection: one anchor size per pyramid level (5 values; empty: 32..512 scaled by
            ``img_size / 1024``).
        box_score_thresh: coco_detection: detections scoring below this are dropped at test time.
        rpn_proposals: coco_detection: RPN proposals kept in training, half at test time (recipe: 2000).
        roi_batch: coco_detection: RoIs sampled per image for the box and mask losses (recipe: 512).
    """

    name: str = "pretraining"
    batch_size: int = 32
    eval_batch_size: int = 32
    eval_every: int = 0
    eval_split: str = "val"
    max_train_examples: int = 0
    max_eval_examples: int = 0
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    randaug: bool | None = None
    crop_scale: float | None = None
    random_erasing: float | None = None
    head_lr_weight: float = 1.0
    answer_min_count: int = 9
    head_bias_prior: bool = False
    mask_prob: float = 0.7
    drop_worst_ratio: float = 0.2
    drop_worst_after: int = 12000
    num_beams: int = 3
    max_gen_len: int = 64
    length_penalty: float = 0.6
    caption_backend: str = "auto"
    head_channels: int = 0
    aux_weight: float = 0.4
    scale_range: tuple[float, float] = (0.5, 2.0)
    slide_stride: int = 0
    photometric: bool = True
    anchor_sizes: tuple[int, ...] = ()
    box_score_thresh: float = 0.05
    rpn_proposals: int = 2000
    roi_batch: int = 512


@dataclass
class TrainConfig:
    """The whole configuration of one pretraining run.

    Attributes:
        preset: name of the preset this tree started from.
        out: run folder (checkpoints, logs, final model).
        seed: seed of every random choice (data order, masks, augmentation, initialisation).
    """

    preset: str = "tiny"
    out: str = "runs/pretrain"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def validate(self) -> TrainConfig:
        """Check the values that cannot be checked by type alone; returns ``self``.

        Raises:
            ValueError: naming the field and what was expected.
        """
        d, o, s, t = self.data, self.optim, self.schedule, self.task
        pretraining = t.name == "pretraining"
        if not pretraining:
            self._validate_task()
        for name in ("image_batch", "text_batch", "pair_batch"):
            if getattr(d, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(d, name)}")
        if pretraining and d.image_batch + d.text_batch + d.pair_batch == 0:
            raise ValueError(
                "data.image_batch, data.text_batch and data.pair_batch are all 0; nothing to train on"
            )
        if d.max_text_len < 3:
            raise ValueError(f"data.max_text_len must be >= 3 (BOS, one token, EOS), got {d.max_text_len}")
        if d.text_tokenizer_type not in ("bpe", "unigram"):
            raise ValueError(f"data.text_tokenizer_type must be 'bpe' or 'unigram', got {d.text_tokenizer_type!r}")
        if d.visual_tokenizer_kind not in ("vqkd", "kmeans"):
            raise ValueError(
                f"data.visual_tokenizer_kind must be 'vqkd' or 'kmeans', got {d.visual_tokenizer_kind!r}"
            )
        if d.visual_tokenizer_batch < 2:
            raise ValueError(f"data.visual_tokenizer_batch must be >= 2, got {d.visual_tokenizer_batch}")
        if d.visual_targets not in ("online", "precomputed"):
            raise ValueError(
                f"data.visual_targets must be 'online' or 'precomputed', got {d.visual_targets!r}"
            )
        if d.visual_targets == "precomputed" and d.augment:
            raise ValueError(
                "data.visual_targets='precomputed' needs data.augment=false: precomputed codes belong to the "
                "un-augmented (resized) image, not to random crops"
            )
        if d.format not in ("files", "wds"):
            raise ValueError(f"data.format must be 'files' or 'wds', got {d.format!r}")
        if d.format == "wds" and d.visual_targets == "precomputed":
            raise ValueError(
                "data.visual_targets='precomputed' works with data.format='files' (codes are looked up "
                "by image path)"
            )
        if not 0.0 <= d.heldout_fraction < 1.0:
            raise ValueError(f"data.heldout_fraction must be in [0, 1), got {d.heldout_fraction}")
        if self.model.modalities not in ("all", "vision"):
            raise ValueError(f"model.modalities must be 'all' or 'vision', got {self.model.modalities!r}")
        if self.model.modalities == "vision" and pretraining:
            raise ValueError("model.modalities='vision' is for fine-tuning; pretraining trains both modalities")
        for name in ("init_std", "pos_init_std"):
            value = getattr(self.model, name)
            if value is not None and not value > 0:
                raise ValueError(f"model.{name} must be > 0 (or null for the official initialisation), got {value}")
        if self.model.img_size % self.model.patch_size:
            raise ValueError(
                f"model.img_size ({self.model.img_size}) must be a multiple of model.patch_size "
                f"({self.model.patch_size})"
            )
        for name in ("image_mask_ratio", "pair_image_mask_ratio"):
            if not 0.0 <= getattr(self.objective, name) < 1.0:
                raise ValueError(f"objective.{name} must be in [0, 1), got {getattr(self.objective, name)}")
        for name in ("text_mask_prob", "pair_text_mask_prob"):
            if not 0.0 < getattr(self.objective, name) <= 1.0:
                raise ValueError(f"objective.{name} must be in (0, 1], got {getattr(self.objective, name)}")
        if self.objective.cls_head_layers < 0:
            raise ValueError(f"objective.cls_head_layers must be >= 0, got {self.objective.cls_head_layers}")
        if self.objective.cls_head_from < -1:
            raise ValueError(
                f"objective.cls_head_from must be a layer (0 for the embeddings) or -1 (half the depth), got "
                f"{self.objective.cls_head_from}"
            )
        if self.objective.cls_head_pairs not in ("fused", "unimodal"):
            raise ValueError(
                f"objective.cls_head_pairs must be 'fused' or 'unimodal', got {self.objective.cls_head_pairs!r}"
            )
        if self.objective.cls_head_layers and not self.objective.cls_head_weight > 0:
            raise ValueError(
                f"objective.cls_head_weight must be > 0 with a [CLS] head, got {self.objective.cls_head_weight}"
            )
        if o.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {o.lr}")
        if o.accum_steps < 1:
            raise ValueError(f"optim.accum_steps must be >= 1, got {o.accum_steps}")
        if o.max_bad_steps < 1:
            raise ValueError(f"optim.max_bad_steps must be >= 1, got {o.max_bad_steps}")
        if o.in_backward:
            if o.clip_grad:
                raise ValueError(
                    f"optim.in_backward=true needs optim.clip_grad none or 0, got {o.clip_grad}: each parameter is "
                    "updated as soon as its own gradient is ready, so no global gradient norm exists to clip by"
                )
            if o.accum_steps != 1:
                raise ValueError(
                    f"optim.in_backward=true needs optim.accum_steps=1, got {o.accum_steps}: every backward pass "
                    "updates the weights, so gradients cannot be accumulated over micro-steps"
                )
            if self.parallel.strategy not in ("auto", "none"):
                raise ValueError(
                    f"optim.in_backward=true needs a single process (parallel.strategy auto or none), got "
                    f"parallel.strategy={self.parallel.strategy!r}: DDP and FSDP reduce the gradients across "
                    "processes after the per-parameter update would already have run"
                )
        if s.max_steps < 1:
            raise ValueError(f"schedule.max_steps must be >= 1, got {s.max_steps}")
        if s.epochs < 0 or s.warmup_epochs < 0:
            raise ValueError(
                f"schedule.epochs and schedule.warmup_epochs must be >= 0, got {s.epochs} and {s.warmup_epochs}"
            )
        if s.time_limit_s < 0:
            raise ValueError(f"schedule.time_limit_s must be >= 0, got {s.time_limit_s}")
        if s.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps must be >= 0, got {s.warmup_steps}")
        if self.parallel.precision not in ("fp32", "bf16"):
            raise ValueError(f"parallel.precision must be 'fp32' or 'bf16', got {self.parallel.precision!r}")
        if self.parallel.strategy not in ("auto", "none", "ddp", "fsdp"):
            raise ValueError(
                f"parallel.strategy must be one of auto, none, ddp, fsdp; got {self.parallel.strategy!r}"
            )
        if self.parallel.activation_checkpointing not in (False, True, "none", "full", "selective"):
            raise ValueError(
                "parallel.activation_checkpointing must be true/false or one of none, full, selective; got "
                f"{self.parallel.activation_checkpointing!r}"
            )
        if self.parallel.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"parallel.device must be auto, cpu or cuda; got {self.parallel.device!r}")
        for name in ("timeout_s", "prepare_timeout_s"):
            if not getattr(self.parallel, name) > 0:
                raise ValueError(f"parallel.{name} must be a positive number of seconds, got "
                                 f"{getattr(self.parallel, name)!r}")
        if self.checkpoint.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.checkpoint.keep_last}")
        if self.checkpoint.save_every < 0:
            raise ValueError(f"checkpoint.save_every must be >= 0, got {self.checkpoint.save_every}")
        return self

    def _validate_task(self) -> None:
        from imglish.training.recipes import TASK_NAMES

        t = self.task
        if t.name not in TASK_NAMES:
            raise ValueError(f"unknown task {t.name!r}; expected one of pretraining, {', '.join(TASK_NAMES)}")
        for name in ("batch_size", "eval_batch_size", "num_beams", "answer_min_count"):
            if getattr(t, name) < 1:
                raise ValueError(f"task.{name} must be >= 1, got {getattr(t, name)}")
        parts = self.parallel_parts()
        if t.batch_size % parts:
            raise ValueError(
                f"task.batch_size ({t.batch_size}) must be divisible by processes x optim.accum_steps ({parts})"
            )
        for name in ("max_train_examples", "max_eval_examples", "eval_every", "drop_worst_after"):
            if getattr(t, name) < 0:
                raise ValueError(f"task.{name} must be >= 0, got {getattr(t, name)}")
        for name in ("label_smoothing", "drop_worst_ratio"):
            if not 0.0 <= getattr(t, name) < 1.0:
                raise ValueError(f"task.{name} must be in [0, 1), got {getattr(t, name)}")
        if not 0.0 < t.mask_prob <= 1.0:
            raise ValueError(f"task.mask_prob must be in (0, 1], got {t.mask_prob}")
        if t.mixup < 0 or t.cutmix < 0:
            raise ValueError(f"task.mixup and task.cutmix must be >= 0, got {t.mixup} and {t.cutmix}")
        if t.crop_scale is not None and not 0.0 < t.crop_scale <= 1.0:
            raise ValueError(f"task.crop_scale must be in (0, 1], got {t.crop_scale}")
        if t.random_erasing is not None and not 0.0 <= t.random_erasing <= 1.0:
            raise ValueError(f"task.random_erasing must be in [0, 1], got {t.random_erasing}")
        if t.head_lr_weight <= 0:
            raise ValueError(f"task.head_lr_weight must be > 0, got {t.head_lr_weight}")
        if t.max_gen_len < 3:
            raise ValueError(f"task.max_gen_len must be >= 3, got {t.max_gen_len}")
        if t.eval_split not in ("train", "val", "test"):
            raise ValueError(f"task.eval_split must be train, val or test; got {t.eval_split!r}")
        if t.caption_backend not in ("auto", "coco", "python"):
            raise ValueError(f"task.caption_backend must be auto, coco or python; got {t.caption_backend!r}")
        if t.head_channels < 0 or t.slide_stride < 0 or t.aux_weight < 0:
            raise ValueError("task.head_channels, task.slide_stride and task.aux_weight must be >= 0")
        lo, hi = tuple(t.scale_range) if len(t.scale_range) == 2 else (0.0, -1.0)
        if not 0.0 < lo <= hi:
            raise ValueError(f"task.scale_range must be two factors 0 < lo <= hi, got {list(t.scale_range)}")
        if t.anchor_sizes and (len(t.anchor_sizes) != 5 or min(t.anchor_sizes) < 1):
            raise ValueError(f"task.anchor_sizes needs 5 positive sizes (one per level), got {list(t.anchor_sizes)}")
        if t.rpn_proposals < 1 or t.roi_batch < 1:
            raise ValueError(f"task.rpn_proposals and task.roi_batch must be >= 1, got {t.rpn_proposals}, {t.roi_batch}")
        if not 0.0 <= t.box_score_thresh < 1.0:
            raise ValueError(f"task.box_score_thresh must be in [0, 1), got {t.box_score_thresh}")

    def parallel_parts(self) -> int:
        """Processes (``WORLD_SIZE``) times micro-steps: what a global batch is split into."""
        return int(os.environ.get("WORLD_SIZE", "1")) * self.optim.accum_steps


def _tiny() -> TrainConfig:
    """A tiny BEiT-3 on 64x64 synthetic images: the CI and quickstart configuration."""
    return TrainConfig(preset="tiny")


def _base() -> TrainConfig:
    """BEiT-3 base at 224 with the paper's recalled recipe (spec §9.5): 2048 samples per stream per step."""
    return TrainConfig(
        preset="base",
        model=ModelConfig(
            name="beit3_base_patch16_224_pretraining", img_size=224, patch_size=16, drop_path_rate=0.1
        ),
        data=DataConfig(
            image_batch=2048,
            text_batch=2048,
            pair_batch=2048,
            max_text_len=64,
            text_vocab_size=64002,
            visual_tokenizer_codes=8192,
            num_workers=8,
        ),
        objective=ObjectiveConfig(min_block_patches=16),
        optim=OptimConfig(lr=1e-3, weight_decay=0.05, betas=(0.9, 0.98), eps=1e-6, clip_grad=3.0),
        schedule=ScheduleConfig(max_steps=1_000_000, warmup_steps=10_000, min_lr=1e-5),
        checkpoint=CheckpointConfig(save_every=5000, keep_last=3),
        parallel=ParallelConfig(precision="bf16", activation_checkpointing=True),
    )


PRESETS: dict[str, typing.Callable[[], TrainConfig]] = {"tiny": _tiny, "base": _base}


def _register_task_presets() -> None:
    from imglish.training.recipes import task_presets

    for name, fn in task_presets().items():
        PRESETS[name] = fn


_register_task_presets()


def resolve_preset(name: str | None, task: str | None) -> str:
    """The preset name a command means: for a fine-tuning ``task``, ``tiny``/``base``/``large`` stand for
    ``<task>_tiny`` etc.; a full name must belong to that task.

    Raises:
        ValueError: for an unknown name (listing the valid ones) or a preset of another task.
    """
    if task is None or task == "pretraining":
        return name or "tiny"
    name = name or "tiny"
    full = name if name.startswith(f"{task}_") else f"{task}_{name}"
    if full not in PRESETS:
        valid = sorted(p for p in PRESETS if p.startswith(f"{task}_"))
        raise ValueError(f"unknown preset {name!r} for task {task!r}; expected one of {', '.join(valid)}")
    return full


def list_presets() -> list[str]:
    """Names of the built-in presets."""
    return sorted(PRESETS)


def get_preset(name: str) -> TrainConfig:
    """A fresh config tree for a built-in preset.

    Raises:
        ValueError: if ``name`` is not a preset (the message lists the presets).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(list_presets())}")
    return PRESETS[name]()


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (a string from the command line, or a JSON value) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        for option in non_none[:-1]:  # e.g. bool | str: a boolean word is a bool, anything else a string
            try:
                return _coerce(value, option, key)
            except ValueError:
                pass
        return _coerce(value, non_none[-1], key)
    if origin is tuple:
        if isinstance(value, str):
            parts = [p for p in value.replace("(", "").replace(")", "").split(",") if p.strip()]
        else:
            parts = list(value)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
            return tuple(_coerce(p, args[0], key) for p in parts)
        if len(parts) != len(args):
            raise ValueError(f"{key} expects {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(p, a, key) for p, a in zip(parts, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} expects a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{key} expects an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} expects an integer, got {value!r}") from None
        if f != int(f):
            raise ValueError(f"{key} expects an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} expects a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} expects a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover


def _all_keys(cfg: TrainConfig) -> list[str]:
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(f"{f.name}.{g.name}" for g in dataclasses.fields(value))
        else:
            keys.append(f.name)
    return keys


def apply_overrides(cfg: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """Set ``section.key`` (or a top-level ``key``) values in place, converting each to its field's type.

    Args:
        cfg: the tree to modify.
        overrides: dotted keys to values (strings from the command line, or JSON values).

    Returns:
        ``cfg`` itself.

    Raises:
        ValueError: for an unknown key (with close matches) or a value of the wrong type.
    """
    known = _all_keys(cfg)
    for key, value in overrides.items():
        parts = key.split(".")
        if key not in known or len(parts) > 2:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown config key {key!r}{hint}")
        target = cfg if len(parts) == 1 else getattr(cfg, parts[0])
        tp = _field_types(type(target))[parts[-1]]
        setattr(target, parts[-1], _coerce(value, tp, key))
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The tree as plain JSON-ready nested dicts (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def config_from_dict(d: Mapping[str, Any]) -> TrainConfig:
    """Rebuild a tree from :func:`config_to_dict` output (unknown keys raise)."""
    cfg = get_preset(d.get("preset", "tiny"))
    return apply_overrides(cfg, _flatten(d))


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON config file (nested sections or dotted keys) into a flat ``{dotted_key: value}`` dict.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it is not a JSON object.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"config file {str(p)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r} must hold a JSON object, got {type(data).__name__}")  # noqa: TRY004
    return _flatten(data)


def build_config(
    preset: str | None = "tiny",
    config_file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    task: str | None = None,
) -> TrainConfig:
    """Preset, then config file, then overrides; validated.

    With ``task`` (a fine-tuning task name), ``preset`` may be the short ``tiny``/``base``/``large`` (see
    :func:`resolve_preset`), and the preset's ``task.name`` is that task.

    Args:
        preset: built-in preset name; when ``None`` the file's ``preset`` key (or ``tiny``) is used.
        config_file: optional JSON file.
        overrides: optional dotted-key overrides (highest precedence).
    """
    file_values = load_config_file(config_file) if config_file is not None else {}
    name = preset if preset is not None else file_values.get("preset", "tiny")
    if task is not None:
        name = resolve_preset(name, task)
    cfg = get_preset(name)
    file_values = {k: v for k, v in file_values.items() if k != "preset"}
    apply_overrides(cfg, file_values)
    apply_overrides(cfg, dict(overrides or {}))
    cfg.preset = name
    return cfg.validate()


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved tree as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(config_to_dict(cfg), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
