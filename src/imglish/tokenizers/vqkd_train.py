"""Training a VQ-KD visual tokenizer on a folder of images, codebook usage, and precomputed visual tokens.

``train_visual_tokenizer(VisualTokenizerTrainConfig(...))`` trains with AdamW (betas 0.9/0.99, weight decay
1e-4, linear warmup then cosine, as the BEiT v2 recipe), augments with RandomResizedCrop + flip, shows a progress
bar with the losses and the codebook usage, writes ``OUT/checkpoint.pt`` atomically every ``save_every`` steps
(model, optimizer, step, RNG state) and resumes from it, and exports ``OUT/vqkd.safetensors`` (official key names,
config in the metadata) plus ``OUT/metrics.json``.

Codebook usage is the fraction of the ``n_code`` codes that at least one patch of the evaluation images maps to.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2
from tqdm.auto import tqdm

from imglish.tokenizers.image import ImageLoadError, find_images, load_image
from imglish.tokenizers.teachers import build_teacher
from imglish.tokenizers.vqkd import VQKD, create_vqkd, save_vqkd

__all__ = [
    "VisualTokenizerTrainConfig",
    "TrainResult",
    "ImageFolderDataset",
    "train_visual_tokenizer",
    "codebook_usage",
    "precompute_visual_tokens",
    "load_visual_tokens",
]


@dataclass
class VisualTokenizerTrainConfig:
    """Settings of :func:`train_visual_tokenizer`.

    Attributes:
        images: folder searched recursively for images (or one image file).
        out: output folder (checkpoint, final tokenizer, metrics).
        model: a VQ-KD preset name (see ``list_vqkd_models()``).
        model_overrides: VQKDConfig fields to change (``img_size``, ``n_code``, ...).
        teacher: ``pixels``, ``hog``, ``pixels+hog``, ``clip:DIR``, ``dino:DIR`` or ``beit3:FILE``.
        steps: optimizer steps in total.
        batch_size: images per step.
        lr: peak learning rate.
        min_lr: final learning rate of the cosine schedule.
        warmup_steps: linear warmup from 0.
        weight_decay: AdamW weight decay (1e-4 in BEiT v2).
        betas: AdamW betas ((0.9, 0.99) in BEiT v2).
        min_crop_scale: RandomResizedCrop smallest area fraction (0.08 in BEiT v2).
        seed: seeds weights, data order and augmentation.
        num_workers: DataLoader workers.
        save_every: checkpoint period in steps (a checkpoint is always written at the end).
        resume: continue from ``out/checkpoint.pt`` if it exists.
        device: ``cpu``, ``cuda``, ... (None: cuda when available).
        progress: show a tqdm progress bar.
        restart_every: every this many steps, codes no patch used since the last check are moved onto random
            recent encoder outputs (0 disables; the official recipe has no restarts). Stops after
            ``restart_until`` of the run so the codebook can settle.
        restart_until: fraction of ``steps`` after which restarts stop.
        stop_at: end this run early at that step (after a checkpoint), as if interrupted; the schedule still
            spans ``steps``, and a later run with ``resume`` continues.
    """

    images: str
    out: str
    model: str = "vqkd_tiny_patch8_64"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    teacher: str = "pixels+hog"
    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    min_crop_scale: float = 0.08
    seed: int = 0
    num_workers: int = 0
    save_every: int = 100
    resume: bool = True
    device: str | None = None
    progress: bool = True
    restart_every: int = 20
    restart_until: float = 0.75
    stop_at: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps}, {self.batch_size}")
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise ValueError(f"min_crop_scale must be in (0, 1], got {self.min_crop_scale}")
        self.betas = tuple(self.betas)  # type: ignore[assignment]


@dataclass
class TrainResult:
    """What :func:`train_visual_tokenizer` produced.

    Attributes:
        tokenizer_path: the exported ``vqkd.safetensors``.
        checkpoint_path: the resumable ``checkpoint.pt``.
        step: steps done in total.
        history: per logged step ``{"step", "loss", "rec_loss", "quant_loss", "batch_usage", "lr"}``.
        usage: final codebook usage on the (un-augmented) training images, in [0, 1].
        codes_used: number of codes used.
    """

    tokenizer_path: Path
    checkpoint_path: Path
    step: int
    history: list[dict[str, float]]
    usage: float
    codes_used: int


class ImageFolderDataset(Dataset):
    """Every image under a folder, through :func:`load_image` and a transform.

    Unreadable files yield ``None`` (dropped by :func:`collate_skip_none`) and are counted in ``self.skipped``
    of the main process when ``num_workers=0``.
    """

    def __init__(self, root: str | os.PathLike, transform: Any) -> None:
        self.root = Path(root)
        self.files = find_images(root)
        self.transform = transform
        self.skipped = 0
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor | None:
        try:
            img = load_image(self.files[i])
        except ImageLoadError as err:
            if i not in self._bad:  # count and report each bad file once
                self._bad.add(i)
                self.skipped += 1
                tqdm.write(f"skipping unreadable image: {err}")
            return None
        return self.transform(img)


def collate_skip_none(batch: list[Any]) -> torch.Tensor | None:
    """Stack the non-None items; None when nothing is left."""
    items = [b for b in batch if b is not None]
    return torch.stack(items) if items else None


def _eval_transform(size: int) -> v2.Compose:
    return v2.Compose([
        v2.ToImage(),
        v2.Resize((size, size), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.ToDtype(torch.float32, scale=True),
    ])


def _train_transform(size: int, min_scale: float) -> v2.Compose:
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
    ])


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _lr_at(step: int, cfg: VisualTokenizerTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * step / max(cfg.warmup_steps, 1)
    t = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(t, 1.0)))


@torch.no_grad()
def codebook_usage(
    model: VQKD, images: str | os.PathLike, batch_size: int = 64, device: str | torch.device | None = None
) -> tuple[float, torch.Tensor]:
    """Fraction of codes used when tokenizing every image under a folder (squash-resized to the model size).

    Returns:
        ``(usage in [0, 1], counts (n_code,) long)``.
    """
    device = torch.device(device or next(model.parameters()).device)
    ds = ImageFolderDataset(images, _eval_transform(model.config.img_size))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_skip_none)
    counts = torch.zeros(model.n_code, dtype=torch.long)
    for x in loader:
        if x is None:
            continue
        idx = model.get_codebook_indices(x.to(device)).cpu()
        counts += torch.bincount(idx.flatten(), minlength=model.n_code)
    return float((counts > 0).float().mean()), counts


def train_visual_tokenizer(config: VisualTokenizerTrainConfig) -> TrainResult:
    """Train a VQ-KD tokenizer on a folder of images (see the module docstring).

    Args:
        config: the run settings.

    Returns:
        A :class:`TrainResult`.
    """
    cfg = config
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    model = create_vqkd(cfg.model, **cfg.model_overrides).to(device)
    teacher = build_teacher(cfg.teacher, model.config.patch_size).to(device)
    if "decoder_out_dim" not in cfg.model_overrides and teacher.out_dim != model.config.decoder_out_dim:
        model = create_vqkd(cfg.model, **{**cfg.model_overrides, "decoder_out_dim": teacher.out_dim}).to(device)
    if teacher.out_dim != model.config.decoder_out_dim:
        raise ValueError(
            f"teacher {cfg.teacher!r} gives {teacher.out_dim}-d features but decoder_out_dim is "
            f"{model.config.decoder_out_dim}"
        )
    decay, no_decay = [], []
    skip = model.no_weight_decay()
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name.endswith(".bias") or name in skip else decay).append(p)
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas,
    )
    step = 0
    history: list[dict[str, float]] = []
    window = torch.zeros(model.n_code, dtype=torch.long)  # codes used since the last restart check
    restart_gen = torch.Generator().manual_seed(cfg.seed + 1)
    restarted = 0
    if cfg.resume and ckpt_path.is_file():
        from imglish.model.loading import safe_torch_load

        state = safe_torch_load(ckpt_path)
        saved = state.get("config", {})
        for key in ("model", "teacher"):
            if saved.get(key) != getattr(cfg, key):
                raise ValueError(
                    f"{ckpt_path} was made with {key} {saved.get(key)!r}, not {getattr(cfg, key)!r}; "
                    "use another --out folder or pass --no-resume"
                )
        if state.get("vqkd_config") != model.config.to_dict():
            raise ValueError(f"{ckpt_path} was made for another tokenizer architecture: {state.get('vqkd_config')}")
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optimizer"])
        step = int(state["step"])
        history = list(state.get("history", []))
        torch.set_rng_state(state["rng"])
        restart_gen.set_state(state["restart_rng"])
        window = state["window"].clone()
        restarted = int(state["restarted"])
        model.quantize.last_z = state["last_z"]
        tqdm.write(f"resumed from {ckpt_path} at step {step}")

    ds = ImageFolderDataset(cfg.images, _train_transform(model.config.img_size, cfg.min_crop_scale))
    per_epoch = max(len(ds) // cfg.batch_size, 1)

    def batches_from(start: int):
        epoch, offset = divmod(start, per_epoch)
        while True:
            g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            order = torch.randperm(len(ds), generator=g).tolist()
            if len(order) < cfg.batch_size:  # tiny folders: repeat the images to fill a batch
                order = (order * math.ceil(cfg.batch_size / len(order)))[: cfg.batch_size]
            for b in range(offset, per_epoch):
                idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                yield collate_skip_none([ds[i] for i in idx])
            epoch, offset = epoch + 1, 0

    def save() -> None:
        _atomic_torch_save(
            {
                "format": "imglish-vqkd-train/1",
                "config": {**asdict(cfg), "betas": list(cfg.betas)},
                "vqkd_config": model.config.to_dict(),
                "model": model.state_dict(),
                "optimizer": optim.state_dict(),
                "step": step,
                "history": history,
                "rng": torch.get_rng_state(),
                "restart_rng": restart_gen.get_state(),
                "window": window,
                "restarted": restarted,
                "last_z": model.quantize.last_z,
            },
            ckpt_path,
        )

    model.train()
    shown = torch.zeros(model.n_code, dtype=torch.long)  # codes used since the last progress update
    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress, desc="vqkd", dynamic_ncols=True)
    data = batches_from(step)
    t0 = time.time()
    while step < cfg.steps:
        x = next(data)
        if x is None:
            continue
        x = x.to(device)
        for g in optim.param_groups:
            g["lr"] = _lr_at(step, cfg)
        target = teacher(x)
        outp = model(x, target)
        optim.zero_grad(set_to_none=True)
        outp.loss.backward()
        optim.step()
        step += 1
        used = torch.bincount(outp.indices.flatten().cpu(), minlength=model.n_code)
        window += used
        shown += used
        if cfg.restart_every and step % cfg.restart_every == 0:
            if step <= cfg.restart_until * cfg.steps and model.quantize.last_z is not None:
                restarted += model.quantize.restart_codes(window == 0, model.quantize.last_z, restart_gen)
            window.zero_()
        rec = {
            "step": step,
            "loss": float(outp.loss.detach()),
            "rec_loss": float(outp.rec_loss.detach()),
            "quant_loss": float(outp.quant_loss.detach()),
            "batch_usage": float((used > 0).float().mean()),
            "lr": optim.param_groups[0]["lr"],
        }
        history.append(rec)
        if step % 10 == 0 or step == cfg.steps:
            bar.set_postfix(rec=f"{rec['rec_loss']:.4f}", usage=f"{float((shown > 0).float().mean()):.0%}")
            shown.zero_()
        bar.update(1)
        if step % cfg.save_every == 0 or step == cfg.steps or step == cfg.stop_at:
            save()
        if step == cfg.stop_at:
            break
    bar.close()
    model.eval()
    usage, counts = codebook_usage(model, cfg.images, device=device)
    tok_path = save_vqkd(model, out / "vqkd.safetensors")
    metrics = {
        "steps": step,
        "seconds_this_run": round(time.time() - t0, 1),
        "teacher": cfg.teacher,
        "model": cfg.model,
        "vqkd_config": model.config.to_dict(),
        "codebook_usage": usage,
        "codes_used": int((counts > 0).sum()),
        "n_code": model.n_code,
        "first_rec_loss": history[0]["rec_loss"] if history else None,
        "final_rec_loss": history[-1]["rec_loss"] if history else None,
        "skipped_images": ds.skipped,
        "codes_restarted": restarted,
    }
    fd, tmp = tempfile.mkstemp(dir=out, prefix="metrics.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(metrics, fh, indent=2)
    os.replace(tmp, out / "metrics.json")
    return TrainResult(tok_path, ckpt_path, step, history, usage, int((counts > 0).sum()))


@torch.no_grad()
def precompute_visual_tokens(
    tokenizer: str | os.PathLike | nn.Module,
    images: str | os.PathLike,
    output: str | os.PathLike,
    *,
    batch_size: int = 64,
    device: str | None = None,
    progress: bool = True,
) -> Path:
    """Tokenize every image under a folder once, so pretraining need not run the tokenizer.

    Images are squash-resized (bicubic) to the tokenizer's ``img_size``; tokens therefore match a pretraining
    view made the same way (not randomly cropped views).

    Args:
        tokenizer: a tokenizer file (VQ-KD: imglish ``.safetensors`` or official with a saved config; or a k-means
            tokenizer file) or a model (anything with ``get_codebook_indices``, ``n_code`` and
            ``config.img_size`` / ``config.num_tokens``).
        images: folder searched recursively.
        output: ``.safetensors`` file: tensor ``tokens`` (M, N) int32 (-1 rows for unreadable images) and
            metadata ``paths`` (JSON list of paths relative to ``images``), ``n_code``, ``img_size``.
        batch_size: images per forward.
        device: where to run (None: cuda when available).

    Returns:
        The output path.
    """
    from safetensors.torch import save_file

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(tokenizer, nn.Module):
        model = tokenizer
    else:
        from imglish.tokenizers.kmeans import load_visual_tokenizer

        model = load_visual_tokenizer(tokenizer)
    model = model.to(dev).eval()
    ds = ImageFolderDataset(images, _eval_transform(model.config.img_size))
    tokens = torch.full((len(ds), model.config.num_tokens), -1, dtype=torch.int32)
    for start in tqdm(range(0, len(ds), batch_size), disable=not progress, desc="tokens"):
        items = [(i, ds[i]) for i in range(start, min(start + batch_size, len(ds)))]
        ok = [(i, x) for i, x in items if x is not None]
        if not ok:
            continue
        idx = model.get_codebook_indices(torch.stack([x for _, x in ok]).to(dev)).cpu().to(torch.int32)
        tokens[[i for i, _ in ok]] = idx
    root = Path(images)
    rel = [str(p.relative_to(root)) if root.is_dir() else p.name for p in ds.files]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=output.name + ".", suffix=".tmp")
    os.close(fd)
    save_file({"tokens": tokens}, tmp, metadata={
        "format": "imglish-visual-tokens/1", "paths": json.dumps(rel), "n_code": str(model.n_code),
        "img_size": str(model.config.img_size), "skipped": str(ds.skipped),
    })
    os.replace(tmp, output)
    return output


def load_visual_tokens(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a :func:`precompute_visual_tokens` file: ``{relative image path: (N,) int32 tokens}``."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != "imglish-visual-tokens/1":
            raise ValueError(f"{path} is not an imglish visual-token file (format {meta.get('format')!r})")
        tokens = fh.get_tensor("tokens")
    paths = json.loads(meta["paths"])
    return {p: tokens[i] for i, p in enumerate(paths)}
