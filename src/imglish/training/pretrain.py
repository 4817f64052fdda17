"""``pretrain(cfg)``: everything between a data folder and ``OUT/model.safetensors``.

Steps, each reusing what an earlier run left in ``OUT`` when it is there:

1. the text tokenizer: ``data.text_tokenizer``, else ``OUT/tokenizers/text.model`` (trained here on the world's text
   corpus and captions if missing);
2. the visual tokenizer: ``data.visual_tokenizer``, else ``OUT/tokenizers/vqkd.pt`` (trained here on the world's
   images if missing);
3. the three streams (image-only set, text corpus, caption pairs) from the data folder, and their held-out parts;
4. the model (``imglish.create_model``), the :class:`Trainer` (resuming the newest checkpoint with
   ``checkpoint.resume``), the loop;
5. the final model as ``OUT/model.safetensors`` (plus ``OUT/model_official.pth`` when asked), and the held-out
   masked-token accuracy of each loss term next to a most-frequent-token baseline in ``OUT/summary.json``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imglish.tasks.pretraining import TERMS, MaskedDataModeling, attach_visual_targets
from imglish.training import parallel
from imglish.training.checkpoint import atomic_torch_save
from imglish.training.config import TrainConfig, save_config
from imglish.training.streams import (
    PrecomputedTargets,
    SampleMaker,
    StepBatches,
    StreamSources,
    WdsStepBatches,
    pop_skipped,
    split_heldout,
)
from imglish.training.trainer import Trainer, TrainResult, to_device

__all__ = [
    "PretrainSummary",
    "build_image_transform",
    "evaluate_heldout",
    "export_model",
    "load_world_sources",
    "prepare_precomputed_targets",
    "prepare_text_tokenizer",
    "prepare_visual_tokenizer",
    "pretrain",
    "tokenizer_corpus",
    "wds_streams",
]


@dataclass
class PretrainSummary:
    """What a pretraining run produced and measured.

    Attributes:
        out: the run folder.
        model_path: ``OUT/model.safetensors``.
        steps: optimizer steps done; skipped_steps: of which skipped (non-finite).
        samples_per_s: mean training throughput of this process's run (all streams).
        heldout: per loss term ``"stream.kind"``: ``accuracy``, ``baseline_accuracy`` (most frequent training
            token), ``loss`` and ``tokens`` on held-out data.
        history: the logged training rows.
        stopped_early: the run ended before ``schedule.max_steps`` because of ``schedule.time_limit_s``.
        elapsed_s: wall time of the training loop of this call.
        bad_records: distinct bad records skipped by the readers and the sampler over the run (all ranks), by
            reason (``imglish.data.BadRecordCounter.counts``).
    """

    out: str
    model_path: str
    steps: int
    skipped_steps: int
    samples_per_s: float
    heldout: dict[str, dict[str, float]] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    bad_records: dict[str, int] = field(default_factory=dict)
    stopped_early: bool = False
    elapsed_s: float = 0.0


# --------------------------------------------------------------------------------------------- tokenizers
def prepare_text_tokenizer(
    cfg: TrainConfig, corpus_files: list[Path] | Callable[[], list[Path]], is_main: bool = True
) -> Any:
    """Load ``data.text_tokenizer``, or train (rank 0) / reuse ``OUT/tokenizers/text.model``.

    Args:
        corpus_files: the text files to train on, or a callable giving them (called only when training is needed).
    """
    from imglish.tokenizers.text import TextTokenizer, train_sentencepiece

    if cfg.data.text_tokenizer:
        return TextTokenizer(cfg.data.text_tokenizer)
    path = Path(cfg.out) / "tokenizers" / "text.model"
    if is_main and not path.exists():
        files = corpus_files() if callable(corpus_files) else corpus_files
        if not files:
            raise ValueError(
                "no text tokenizer given (data.text_tokenizer) and no text files in the data folder to train one"
            )
        # a soft limit: a small corpus (the synthetic world) may support fewer pieces than asked
        train_sentencepiece(
            files,
            cfg.data.text_vocab_size - 2,
            path,
            model_type=cfg.data.text_tokenizer_type,
            seed=cfg.seed,
            extra_options={"hard_vocab_limit": False},
        )
    parallel.barrier("rank 0 to train the text tokenizer", cfg.parallel.prepare_timeout_s)
    return TextTokenizer(path)


def prepare_visual_tokenizer(
    cfg: TrainConfig,
    image_dir: Path | None,
    is_main: bool = True,
    pairs: Any = None,
    text_tokenizer: Any = None,
) -> nn.Module:
    """Load ``data.visual_tokenizer``, or train (rank 0) / reuse one in ``OUT/tokenizers/``.

    ``data.visual_tokenizer_kind`` says what is trained: ``vqkd`` gives ``OUT/tokenizers/vqkd/vqkd.safetensors``,
    the ``vqkd_tiny_patch8_64`` architecture at the model's image and patch size with ``data.visual_tokenizer_codes``
    codes, trained for ``data.visual_tokenizer_steps`` steps on ``image_dir``; ``kmeans`` gives
    ``OUT/tokenizers/kmeans/kmeans.safetensors`` (:func:`imglish.tokenizers.kmeans.train_kmeans_tokenizer`), a conv
    CLIP trained on ``pairs`` (captions encoded with ``text_tokenizer``) with k-means codes of its patches.
    """
    from imglish.tokenizers.kmeans import load_visual_tokenizer

    kind = cfg.data.visual_tokenizer_kind
    if cfg.data.visual_tokenizer:
        path = Path(cfg.data.visual_tokenizer)
        if not path.exists():
            raise FileNotFoundError(f"data.visual_tokenizer {str(path)!r} does not exist")
    elif kind == "kmeans":
        folder = Path(cfg.out) / "tokenizers" / "kmeans"
        path = folder / "kmeans.safetensors"
        if is_main and not path.exists():
            if pairs is None or text_tokenizer is None:
                raise ValueError(
                    "data.visual_tokenizer_kind='kmeans' trains its conv CLIP on the pair stream with the text "
                    "tokenizer; this run has " + ("no image-text pairs" if pairs is None else "no text tokenizer")
                )
            _train_kmeans(cfg, pairs, text_tokenizer, folder)
        parallel.barrier("rank 0 to train the k-means visual tokenizer", cfg.parallel.prepare_timeout_s)
    else:
        folder = Path(cfg.out) / "tokenizers" / "vqkd"
        path = folder / "vqkd.safetensors"
        if is_main and not path.exists():
            if image_dir is None or not image_dir.is_dir():
                raise ValueError(
                    "no visual tokenizer given (data.visual_tokenizer) and no image folder to train one"
                )
            from imglish.tokenizers.vqkd import local_training

            with local_training():  # rank 0 alone: no collective the waiting ranks would never enter
                _train_visual(cfg, image_dir, folder)
        parallel.barrier("rank 0 to train the VQ-KD visual tokenizer", cfg.parallel.prepare_timeout_s)
    model = load_visual_tokenizer(path)
    grid = model.config.img_size // model.config.patch_size
    if grid != cfg.model.img_size // cfg.model.patch_size:
        raise ValueError(
            f"the visual tokenizer {str(path)!r} gives a {grid}x{grid} token grid but the model has "
            f"{cfg.model.img_size // cfg.model.patch_size} patches per side"
        )
    return model


def _train_kmeans(cfg: TrainConfig, pairs: Any, text_tokenizer: Any, folder: Path) -> None:
    from imglish.tokenizers.kmeans import KMeansTrainConfig, caption_encoder, train_kmeans_tokenizer

    result = train_kmeans_tokenizer(
        pairs,
        caption_encoder(text_tokenizer, cfg.data.max_text_len),
        text_tokenizer.vocab_size,
        KMeansTrainConfig(
            out=str(folder),
            img_size=cfg.model.img_size,
            patch_size=cfg.model.patch_size,
            n_code=cfg.data.visual_tokenizer_codes,
            steps=cfg.data.visual_tokenizer_steps,
            batch_size=cfg.data.visual_tokenizer_batch,
            precision=cfg.parallel.precision,
            seed=cfg.seed,
            progress=cfg.logging.progress,
        ),
    )
    if cfg.logging.progress:
        print(f"k-means visual tokenizer: conv CLIP loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} in "
              f"{result.steps} steps, {result.codes_used} of {cfg.data.visual_tokenizer_codes} codes used, "
              f"{result.elapsed_s:.0f} s")


def _train_visual(cfg: TrainConfig, image_dir: Path, folder: Path) -> None:
    from imglish.tokenizers.vqkd_train import VisualTokenizerTrainConfig, train_visual_tokenizer

    train_visual_tokenizer(
        VisualTokenizerTrainConfig(
            images=str(image_dir),
            out=str(folder),
            model_overrides={
                "img_size": cfg.model.img_size,
                "patch_size": cfg.model.patch_size,
                "n_code": cfg.data.visual_tokenizer_codes,
            },
            steps=cfg.data.visual_tokenizer_steps,
            teacher=cfg.data.visual_tokenizer_teacher,
            seed=cfg.seed,
            progress=cfg.logging.progress,
        )
    )

def prepare_precomputed_targets(
    cfg: TrainConfig, sources: StreamSources, visual_tokenizer: nn.Module, is_main: bool = True
) -> PrecomputedTargets:
    """The image stream's visual codes from ``data.visual_tokens``, or from ``OUT/tokenizers/visual_tokens.safetensors``
    written here (rank 0) with ``imglish.tokenizers.vqkd_train.precompute_visual_tokens`` if missing.

    Raises:
        ValueError: if the image stream is not an image folder (``imglish.data.ImageOnlyDataset``), or if the file's
            codebook does not match the visual tokenizer's.
    """
    from imglish.tokenizers.vqkd_train import precompute_visual_tokens

    images = sources.images
    base = getattr(images, "base", images)  # a held-out split wraps the reader
    root = getattr(base, "root", None)
    if root is None:
        raise ValueError(
            "data.visual_targets='precomputed' needs an image-only folder (imglish.data.ImageOnlyDataset)"
        )
    if cfg.data.visual_tokens:
        path = Path(cfg.data.visual_tokens)
        if not path.is_file():
            raise FileNotFoundError(f"data.visual_tokens {str(path)!r} does not exist")
    else:
        path = Path(cfg.out) / "tokenizers" / "visual_tokens.safetensors"
        if is_main and not path.exists():
            precompute_visual_tokens(visual_tokenizer, root, path, progress=cfg.logging.progress)
        parallel.barrier("rank 0 to precompute the visual targets", cfg.parallel.prepare_timeout_s)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        n_code = int((fh.metadata() or {}).get("n_code", -1))
    if n_code != _num_codes(visual_tokenizer):
        raise ValueError(
            f"{str(path)!r} holds codes of a {n_code}-code tokenizer but the visual tokenizer has "
            f"{_num_codes(visual_tokenizer)} codes"
        )
    return PrecomputedTargets({root: path})


# --------------------------------------------------------------------------------------------- data
def build_image_transform(
    image_size: int, augment: bool
) -> Callable[[Any], tuple[torch.Tensor, torch.Tensor]]:
    """``PIL image -> (normalised (3, S, S), [0, 1] (3, S, S))``: the BEiT two-view pretraining transform, or a
    plain bicubic resize when ``augment`` is off."""
    from imglish.tokenizers.transforms import build_transform

    if augment:
        return build_transform("pretraining", image_size, train=True)
    return _PlainTwoView(image_size)


class _PlainTwoView:
    """Squash-resize (bicubic) to ``size``; returns the 0.5-normalised view and the [0, 1] view.

    The [0, 1] view is made exactly as ``imglish tokenizer precompute`` makes its input (resize the 8-bit image,
    then scale), so that precomputed visual codes are the codes of this view.
    """

    def __init__(self, size: int) -> None:
        from torchvision.transforms import InterpolationMode, v2

        self.tf = v2.Compose(
            [
                v2.ToImage(),
                v2.Resize((size, size), interpolation=InterpolationMode.BICUBIC, antialias=True),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )

    def __call__(self, img: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.tf(img).clamp(0, 1)
        return (x - 0.5) / 0.5, x


def load_world_sources(path: str | os.PathLike, split: str, skip: Any = None) -> StreamSources:
    """The three streams of a folder written by ``imglish data shapes``, read with the ``imglish.data`` readers.

    * images: :class:`imglish.data.ImageOnlyDataset` over ``imagenet/<split>/`` (the image-only set);
    * texts: :class:`imglish.data.TextCorpus` over ``text/<split>.txt`` (the text-only corpus);
    * pairs: :class:`imglish.data.KarpathyCaptions` over ``coco/dataset_coco.json``, one record per caption, Karpathy
      split ``split`` (``train`` also takes ``restval``, as the official COCO training set does).

    Nothing is written into the data folder.

    Args:
        path: the data folder.
        split: ``train``, ``val`` or ``test``.
        skip: the ``imglish.data.BadRecordCounter`` every reader reports bad records to (a fresh one if ``None``).

    Raises:
        FileNotFoundError: if none of the three parts exists under ``path``.
    """
    from imglish.data import BadRecordCounter, ImageOnlyDataset, KarpathyCaptions, TextCorpus

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist")
    skip = skip if skip is not None else BadRecordCounter()
    sources = StreamSources()
    img_dir = root / "imagenet" / split
    if img_dir.is_dir():
        try:
            sources.images = ImageOnlyDataset(img_dir, skip=skip)
        except ValueError:  # a folder with no image in it
            sources.images = None
    text_file = root / "text" / f"{split}.txt"
    if text_file.is_file():
        corpus = TextCorpus(text_file, skip=skip)
        sources.texts = corpus if len(corpus) else None
    karpathy = root / "coco" / "dataset_coco.json"
    if karpathy.is_file():
        splits = ("train", "restval") if split == "train" else (split,)
        pairs = KarpathyCaptions(karpathy, splits=splits, skip=skip)
        sources.pairs = pairs if len(pairs) else None
    if sources.images is None and sources.texts is None and sources.pairs is None:
        raise FileNotFoundError(
            f"{str(root)!r} has none of imagenet/{split}/, text/{split}.txt, coco/dataset_coco.json; "
            "create a world with `imglish data shapes --out DIR`"
        )
    return sources


_WDS_DEFAULTS = {
    "image": ("images", "images-train-*.tar"),
    "text": ("texts", "text-train-*.tar"),
    "pair": ("pairs", "pairs-train-*.tar"),
}


def wds_streams(cfg: TrainConfig, sizes: dict[str, int], skip: Any = None) -> dict[str, Any]:
    """One :class:`imglish.data.WdsStream` per stream with a batch size: the shards of ``data.wds_images``,
    ``data.wds_texts``, ``data.wds_pairs`` (brace patterns, ``::`` lists or folders), by default the world's
    ``DIR/wds/{images,text,pairs}-train-*.tar``. Shards are split by rank and by DataLoader worker, shuffled with the
    run's seed (``data.wds_shuffle_buffer`` samples of shuffle buffer).

    Raises:
        FileNotFoundError: when a stream has no shards.
    """
    from imglish.data import WdsStream

    given = {"image": cfg.data.wds_images, "text": cfg.data.wds_texts, "pair": cfg.data.wds_pairs}
    streams = {}
    for stream, (kind, pattern) in _WDS_DEFAULTS.items():
        if sizes.get(stream, 0) <= 0:
            continue
        urls: Any = given[stream]
        if urls is None:
            folder = Path(cfg.data.path or ".") / "wds"
            urls = [str(f) for f in sorted(folder.glob(pattern))]
            if not urls:
                raise FileNotFoundError(
                    f"no {pattern} shards in {str(folder)!r} for the {stream} stream; set data.wds_{kind}"
                )
        streams[stream] = WdsStream(
            urls,
            kind,
            skip=skip,
            shuffle_shards=True,
            shuffle_buffer=cfg.data.wds_shuffle_buffer,
            seed=cfg.seed,
            split_by_node=True,
        )
    return streams


def tokenizer_corpus(sources: StreamSources, folder: Path) -> list[Path]:
    """Text files to train the text tokenizer on: the text stream's own files, plus the pair captions written to
    ``folder/captions_train.txt`` (under the run folder, never into the data folder).

    Sources that are not ``imglish.data`` readers (plain lists of strings or tuples) are written out too.
    """
    files: list[Path] = []
    texts = sources.texts
    if texts is not None:
        if hasattr(texts, "paths"):
            files.extend(Path(p) for p in texts.paths)
        else:
            files.append(
                _write_lines(
                    folder / "texts_train.txt", (t if isinstance(t, str) else t["text"] for t in texts)
                )
            )
    pairs = sources.pairs
    if pairs is not None:
        if hasattr(pairs, "captions"):
            caps = (c for _, c in pairs.captions)
        else:
            caps = (r[1] if isinstance(r, tuple) else r["text"] for r in pairs)
        files.append(_write_lines(folder / "captions_train.txt", caps))
    return files


def _write_lines(path: Path, lines: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            line = " ".join(str(line).split())
            if line:
                f.write(line + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_heldout(
    model: nn.Module,
    dataset: StepBatches,
    num_batches: int,
    visual_tokenizer: Any,
    device: torch.device,
    baseline_counts: dict[str, Counter] | None = None,
) -> dict[str, dict[str, float]]:
    """Masked-token accuracy of each loss term on held-out micro-batches (model in eval mode).

    The pair stream is also scored with each caption given another pair's image (the batch's images rolled by
    one): ``other_image_accuracy`` of ``pair.*``. What the model gets right only with the caption's own image is
    what it reads from the image; the rest comes from the caption's other words.

    Args:
        baseline_counts: per term, counts of the training targets; the most frequent one is the trivial
            baseline whose accuracy on the same held-out targets is reported as ``baseline_accuracy``.
    """
    mdm = MaskedDataModeling(model).eval()
    was_training = model.training
    model.eval()
    sums: dict[str, list[float]] = {}
    baseline_hits: Counter = Counter()
    other_hits: Counter = Counter()
    for k in range(num_batches):
        item = dataset[k]
        pop_skipped(item)
        batch = to_device(item, device)
        if visual_tokenizer is not None:
            attach_visual_targets(batch, visual_tokenizer)
        out = mdm(batch)
        for name in out.count:
            s = sums.setdefault(name, [0.0, 0.0, 0.0])
            s[0] += float(out.loss_sum[name])
            s[1] += float(out.count[name])
            s[2] += float(out.correct[name])
        swapped = _with_other_images(batch)
        if swapped is not None:
            other = mdm(swapped)
            for name in other.count:
                other_hits[name] += float(other.correct[name])
        if baseline_counts:
            for name, targets in _targets(batch).items():
                if baseline_counts.get(name):
                    top = baseline_counts[name].most_common(1)[0][0]
                    baseline_hits[name] += int((targets == top).sum())
    model.train(was_training)
    result = {}
    for name, (loss, count, correct) in sums.items():
        result[name] = {"accuracy": correct / count, "loss": loss / count, "tokens": count}
        if baseline_counts:
            result[name]["baseline_accuracy"] = baseline_hits[name] / count
        if name in other_hits:
            result[name]["other_image_accuracy"] = other_hits[name] / count
    return result


def _with_other_images(batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]] | None:
    """The batch's pair stream alone, each caption with the next pair's image (and its visual targets)."""
    pair = batch.get("pair")
    if pair is None or pair.get("image") is None or pair["image"].shape[0] < 2:
        return None
    moved = dict(pair)
    for key in ("image", "image_mask", "visual_targets", "tokenizer_image"):
        if moved.get(key) is not None:
            moved[key] = moved[key].roll(1, 0)
    return {"pair": moved}


def _targets(batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for stream, kind in TERMS:
        part = batch.get(stream)
        if part is None:
            continue
        if kind == "mim" and part.get("image_mask") is not None and part.get("visual_targets") is not None:
            out[f"{stream}.mim"] = part["visual_targets"][part["image_mask"]].cpu()
        if kind == "mlm" and part.get("text_mask") is not None:
            out[f"{stream}.mlm"] = part["text_targets"][part["text_mask"]].cpu()
    return out


@torch.no_grad()
def training_target_counts(
    dataset: StepBatches, num_batches: int, visual_tokenizer: Any, device: torch.device
) -> dict[str, Counter]:
    """Counts of the prediction targets over the first ``num_batches`` training micro-batches."""
    counts: dict[str, Counter] = {}
    for k in range(num_batches):
        item = dataset[k]
        pop_skipped(item)
        batch = to_device(item, device)
        if visual_tokenizer is not None:
            attach_visual_targets(batch, visual_tokenizer)
        for name, t in _targets(batch).items():
            counts.setdefault(name, Counter()).update(t.tolist())
    return counts


# --------------------------------------------------------------------------------------------- main entry
def _build_model(cfg: TrainConfig, vocab_size: int, num_visual_tokens: int) -> nn.Module:
    import imglish

    torch.manual_seed(cfg.seed)
    kwargs = {
        "img_size": cfg.model.img_size,
        "patch_size": cfg.model.patch_size,
        "vocab_size": vocab_size,
        "num_visual_tokens": num_visual_tokens,
        "drop_path_rate": cfg.model.drop_path_rate,
    }
    if cfg.objective.cls_head_layers:
        kwargs.update(cls_head_layers=cfg.objective.cls_head_layers, cls_head_from=cfg.objective.cls_head_from)
        if cfg.objective.cls_head_pairs != "fused":
            kwargs["cls_head_pairs"] = cfg.objective.cls_head_pairs
    if cfg.model.init_from:
        return imglish.create_model(cfg.model.name, pretrained=cfg.model.init_from, **kwargs)
    model = imglish.create_model(cfg.model.name, **kwargs)
    model.beit3.init_for_scratch(cfg.model.init_std, cfg.model.pos_init_std)
    if model.cls_head is not None and cfg.model.init_std is not None:
        from imglish.model.backbone import redraw_linear_weights

        redraw_linear_weights(model.cls_head, cfg.model.init_std)  # the same start as the backbone's layers
    return model


class _FullStateView:
    """Presents a gathered full state dict with the model's metadata to ``imglish.save_model`` (FSDP export)."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        self._model, self._state = model, state
        for attr in ("beit3", "task", "model_name", "task_kwargs"):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def export_model(
    model: nn.Module, out: Path, official: bool = False, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write ``OUT/model.safetensors`` (our format) and optionally ``OUT/model_official.pth`` (official layout).

    Args:
        model: the unwrapped model (its metadata is written with the weights).
        out: the run folder.
        official: also write the official key layout.
        state_dict: the full weights when ``model`` itself is sharded (FSDP); by default ``model.state_dict()``.
    """
    import imglish

    path = out / "model.safetensors"
    source: Any = model if state_dict is None else _FullStateView(model, state_dict)
    weights = source.state_dict()
    if hasattr(getattr(model, "beit3", model), "config"):
        imglish.save_model(source, path)
    else:  # a model outside the imglish registry: plain safetensors
        from safetensors.torch import save_file

        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp))
        os.replace(tmp, path)
    if official:
        from imglish.model.convert import to_official

        atomic_torch_save({"model": to_official(weights)}, out / "model_official.pth")
    return path


def pretrain(
    cfg: TrainConfig,
    *,
    model: nn.Module | None = None,
    visual_tokenizer: Any = None,
    text_encode: Callable[[str], list[int]] | None = None,
    sources: StreamSources | None = None,
    heldout_sources: StreamSources | None = None,
    vocab_size: int | None = None,
    mask_id: int | None = None,
    loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    on_step: Callable[[Trainer, dict[str, float]], None] | None = None,
    before_training: Callable[[], None] | None = None,
) -> PretrainSummary:
    """Run masked data modeling pretraining as ``cfg`` describes (call on every rank under torchrun).

    The keyword arguments replace the parts normally built from ``cfg`` (tests pass small stand-ins); leave them
    out to get the tokenizers, data and model that ``cfg`` names.

    Returns:
        The :class:`PretrainSummary` (also written to ``OUT/summary.json`` by rank 0).
    """
    cfg.validate()
    device = parallel.resolve_device(cfg.parallel.device, int(os.environ.get("LOCAL_RANK", "0")))
    info = parallel.init_distributed(cfg.parallel.backend, device, cfg.parallel.timeout_s)
    if cfg.parallel.threads > 0:
        torch.set_num_threads(cfg.parallel.threads)
    out = Path(cfg.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.json")
    from imglish.data import BadRecordCounter

    skip_counter = BadRecordCounter(strict=cfg.data.strict)
    if sources is None:
        if not cfg.data.path:
            raise ValueError("data.path (--data) is required: a folder written by `imglish data shapes`")
        try:
            sources = load_world_sources(cfg.data.path, "train", skip_counter)
        except FileNotFoundError:
            if cfg.data.format != "wds":
                raise
            sources = StreamSources()  # shards only: no tokenizer training from files, no held-out evaluation
        if heldout_sources is None:
            try:
                heldout_sources = load_world_sources(
                    cfg.data.path, "val", BadRecordCounter(strict=cfg.data.strict)
                )
            except FileNotFoundError:
                heldout_sources = None
    if heldout_sources is None:
        sources, heldout_sources = split_heldout(sources, cfg.data.heldout_fraction, cfg.seed)
    if text_encode is None:
        train_sources = sources
        tok = prepare_text_tokenizer(
            cfg, lambda: tokenizer_corpus(train_sources, out / "tokenizers"), info.is_main
        )
        text_encode, vocab_size, mask_id = tok.encode, tok.vocab_size, tok.mask_token_id
        pad_id, eos_id, bos_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
        text_tokenizer = tok
    else:
        text_tokenizer = None
        if vocab_size is None or mask_id is None:
            raise ValueError("text_encode needs vocab_size and mask_id")
        pad_id, eos_id, bos_id = 1, 2, 0
    if visual_tokenizer is None:
        image_dir = Path(cfg.data.path) / "imagenet" / "train" if cfg.data.path else None
        visual_tokenizer = prepare_visual_tokenizer(
            cfg, image_dir, info.is_main, pairs=sources.pairs, text_tokenizer=text_tokenizer
        )
    num_codes = _num_codes(visual_tokenizer)
    targets = None
    if cfg.data.visual_targets == "precomputed" and sources.images is not None:
        targets = prepare_precomputed_targets(cfg, sources, visual_tokenizer, info.is_main)
    if model is None:
        model = _build_model(cfg, vocab_size, num_codes)
    side = cfg.model.img_size // cfg.model.patch_size
    o = cfg.objective

    def maker(augment: bool, lookup: PrecomputedTargets | None = None) -> SampleMaker:
        return SampleMaker(
            text_encode,
            build_image_transform(cfg.model.img_size, augment),
            side,
            cfg.data.max_text_len,
            mask_id,
            pad_id=pad_id,
            eos_id=eos_id,
            bos_id=bos_id,
            image_mask_ratio=o.image_mask_ratio,
            text_mask_prob=o.text_mask_prob,
            pair_text_mask_prob=o.pair_text_mask_prob,
            pair_image_mask_ratio=o.pair_image_mask_ratio,
            replace_80_10_10=o.replace_80_10_10,
            min_block_patches=o.min_block_patches,
            visual_targets=lookup,
        )

    sizes = {"image": cfg.data.image_batch, "text": cfg.data.text_batch, "pair": cfg.data.pair_batch}
    dataset: StepBatches | WdsStepBatches
    if cfg.data.format == "wds":
        dataset = WdsStepBatches(
            wds_streams(cfg, sizes, skip_counter),
            maker(cfg.data.augment),
            sizes,
            cfg.seed,
            info.rank,
            info.world_size,
            cfg.optim.accum_steps,
            skip_counter=skip_counter,
        )
    else:
        dataset = StepBatches(
            sources,
            maker(cfg.data.augment, targets),
            sizes,
            cfg.seed,
            info.rank,
            info.world_size,
            cfg.optim.accum_steps,
            skip_counter=skip_counter,
        )
    trainer = Trainer(cfg, model, dataset, visual_tokenizer, info, device, loss_hook=loss_hook)
    if cfg.checkpoint.resume:
        trainer.maybe_resume()
    if before_training is not None:
        before_training()
    result: TrainResult = trainer.train(on_step=on_step)

    summary = PretrainSummary(
        out=str(out),
        model_path=str(out / "model.safetensors"),
        steps=result.step,
        skipped_steps=result.skipped_steps,
        samples_per_s=result.samples_per_s,
        history=result.history,
        stopped_early=result.stopped_early,
        elapsed_s=result.elapsed_s,
    )
    full_state = trainer._model_state() if trainer.strategy == "fsdp" else None  # collective under FSDP
    bad = _gather_bad_records(skip_counter)  # collective
    if info.is_main:
        export_model(model, out, cfg.checkpoint.export_official, state_dict=full_state)
        if text_tokenizer is not None:
            # The processor travels with the checkpoint: the text tokenizer and this run's image preprocessing.
            from imglish.tokenizers.processor import Processor
            from imglish.tokenizers.transforms import TransformConfig

            transform = TransformConfig.for_task("pretraining", cfg.model.img_size)
            Processor(text_tokenizer, transform, cfg.data.max_text_len).save_next_to(out / "model.safetensors")
        eval_sizes = {
            s: max(n // max(info.world_size * cfg.optim.accum_steps, 1), 1) for s, n in sizes.items() if n
        }
        usable = {s: n for s, n in eval_sizes.items() if heldout_sources.get(s) is not None}
        held_model = None
        if usable and cfg.data.heldout_batches > 0:  # under FSDP the trained model is sharded: reload the export
            held_model = _reload_unsharded(out / "model.safetensors", device) if trainer.strategy == "fsdp" else model
        if held_model is not None:
            # held-out images are not in the precomputed table: the tokenizer codes them (the same plain view)
            held = StepBatches(
                heldout_sources, maker(False), usable, cfg.seed + 1, skip_counter=BadRecordCounter()
            )
            train_plain = StepBatches(
                sources, maker(False), usable, cfg.seed + 2, skip_counter=BadRecordCounter()
            )
            counts = training_target_counts(
                train_plain, max(cfg.data.heldout_batches, 4), visual_tokenizer, device
            )
            summary.heldout = evaluate_heldout(
                held_model, held, cfg.data.heldout_batches, visual_tokenizer, device, counts
            )
        summary.bad_records = bad.counts
        if bad.total or cfg.logging.progress:
            print(f"bad records (training streams): {bad.summary()}")
        tmp = out / "summary.json.tmp"
        tmp.write_text(json.dumps(asdict(summary), indent=2) + "\n")
        os.replace(tmp, out / "summary.json")
    parallel.barrier("rank 0 to write the final model and summary")
    return summary


def _reload_unsharded(path: Path, device: torch.device) -> nn.Module | None:
    """The exported model, loaded whole on this rank (FSDP leaves each rank only a shard of the trained one);
    None for a model outside the imglish registry (its file has no architecture to rebuild)."""
    import imglish
    from imglish.model.loading import read_checkpoint_metadata

    if read_checkpoint_metadata(str(path)).get("format") != "imglish/1":
        print("held-out evaluation skipped: under FSDP it reloads the exported model, and this model is not an "
              "imglish model")
        return None
    return imglish.create_model(None, pretrained=str(path)).to(device)


def _num_codes(visual_tokenizer: Any) -> int:
    for attr in ("n_code", "num_codes", "num_tokens"):
        if hasattr(visual_tokenizer, attr):
            return int(getattr(visual_tokenizer, attr))
    cfg = getattr(visual_tokenizer, "config", None)
    if cfg is not None and hasattr(cfg, "n_code"):
        return int(cfg.n_code)
    raise ValueError(
        "cannot tell the codebook size of the visual tokenizer (expected n_code or config.n_code)"
    )


def _gather_bad_records(counter: Any) -> Any:
    """Every rank's bad records merged into one ``BadRecordCounter`` (collective under torchrun)."""
    from imglish.data import BadRecordCounter

    merged = BadRecordCounter()
    for records in parallel.all_gather_objects(counter.records()):
        merged.absorb(records)
    return merged
