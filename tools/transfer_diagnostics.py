"""Why pretraining does or does not transfer on the synthetic world: the measurements of docs/quickstart.md.

Every subcommand reads a world written by ``imglish data shapes`` (or a quickstart's ``OUT/data``) and its
``imagenet`` split (the class of a scene is the colour and kind of its largest shape, 30 classes):

* ``probe``: a linear probe (multinomial logistic regression, L2, full-batch L-BFGS) on the frozen features of
  an imglish model (or of a random start): per layer, the CLS token and the mean of the patch tokens;
* ``probe-codes``: the same probe on a visual tokenizer's code map (a bag of codes per image): how much of the
  class the masked-image-modeling targets carry;
* ``cnn``: a small convolutional network trained with labels, the reference for how learnable the world is;
* ``cnn-clip``: trains the library's k-means visual tokenizer (:mod:`imglish.tokenizers.kmeans`: a convolutional
  image tower and a small text transformer trained contrastively on the world's training pairs, CLIP's objective,
  no labels; k-means codes of its patch features) and probes the tower's pooled features and the bag of its codes.
  Pretraining on those codes: ``imglish quickstart --visual-tokenizer kmeans``.

Run from the repository root, e.g.::

    python tools/transfer_diagnostics.py probe --data runs/quickstart/data runs/quickstart/model.safetensors
    python tools/transfer_diagnostics.py cnn --data runs/quickstart/data --labels 1600 --steps 600

One torch thread unless ``--threads`` says otherwise; every figure is seeded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

IMG = 64


def load_split(data: Path, split: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of the world's ``imagenet/<split>`` (a seeded choice), in [0, 1], and their class ids."""
    root = data / "imagenet" / split
    if not root.is_dir():
        raise SystemExit(f"{root} does not exist: give --data a world written by `imglish data shapes`")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())]
    np.random.default_rng(seed).shuffle(items)
    items = items[:n]
    x = np.stack([np.asarray(Image.open(f).convert("RGB").resize((IMG, IMG))) for f, _ in items])
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, torch.tensor([i for _, i in items])


def linear_probe(train: torch.Tensor, y_train: torch.Tensor, val: torch.Tensor, y_val: torch.Tensor,
                 l2: float = 1e-2) -> float:
    """Accuracy (%) on ``val`` of a multinomial logistic regression fitted on standardised ``train``
    features."""
    mu, sd = train.mean(0), train.std(0) + 1e-6
    a, b = (train - mu) / sd, (val - mu) / sd
    k = int(y_train.max()) + 1
    w = torch.zeros(a.shape[1], k, requires_grad=True)
    bias = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, y_train) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100.0 * ((b @ w + bias).argmax(-1) == y_val).float().mean().item()


# ------------------------------------------------------------------------------------------------ probe
def backbone_features(model_path: str, x: torch.Tensor) -> list[torch.Tensor]:
    """Per layer: the CLS token and the mean patch token, concatenated, of a frozen BEiT-3 backbone."""
    from imglish.registry import create_model

    if model_path == "random":
        torch.manual_seed(0)  # the same random start for every split
        model = create_model("beit3_tiny_patch16_224_imageclassification", img_size=IMG, patch_size=16,
                             num_classes=30)
        model.beit3.init_for_scratch(0.05, 0.02)  # the tiny presets' random start
        mean = std = 0.5
    else:
        from imglish.tokenizers.processor import Processor

        model = create_model(None, model_path)
        proc = Processor.find_for(model_path)
        mean, std = (proc.transform_config.mean[0], proc.transform_config.std[0]) if proc else (0.5, 0.5)
    model.eval()
    feats: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for i in range(0, len(x), 100):
            hidden = model.beit3((x[i:i + 100] - mean) / std, output_hidden_states=True).hidden_states[1:]
            feats.append([torch.cat([h[:, 0], h[:, 1:].mean(1)], -1) for h in hidden])
    return [torch.cat(layer) for layer in zip(*feats)]


def cmd_probe(args) -> None:
    (xa, ya), (xb, yb) = load_split(args.data, "train", args.labels), load_split(args.data, "val", 200)
    fa, fb = backbone_features(args.model, xa), backbone_features(args.model, xb)
    accs = [round(linear_probe(a, ya, b, yb), 1) for a, b in zip(fa, fb)]
    print(f"{args.model}: linear probe, val accuracy by layer 1..{len(accs)}: {accs}")


def code_bags(tokenizer_path: str, x: torch.Tensor) -> torch.Tensor:
    """Per image, how often each code of a visual tokenizer (VQ-KD or k-means) occurs."""
    from imglish.tokenizers.kmeans import load_visual_tokenizer

    tok = load_visual_tokenizer(tokenizer_path)
    with torch.no_grad():
        codes = torch.cat([tok.get_codebook_indices(x[i:i + 100]) for i in range(0, len(x), 100)])
    return F.one_hot(codes.flatten(1), tok.n_code).sum(1).float()


def cmd_probe_codes(args) -> None:
    (xa, ya), (xb, yb) = load_split(args.data, "train", args.labels), load_split(args.data, "val", 200)
    acc = linear_probe(code_bags(args.tokenizer, xa), ya, code_bags(args.tokenizer, xb), yb)
    print(f"{args.tokenizer}: linear probe on the bag of visual codes, val accuracy {acc:.1f}")


# ------------------------------------------------------------------------------------------------ CNNs
def cmd_cnn(args) -> None:
    from imglish.tokenizers.kmeans import conv_tower

    torch.manual_seed(args.seed)
    (xa, ya), (xt, yt) = load_split(args.data, "train", args.labels), load_split(args.data, "test", 200)
    model = nn.Sequential(conv_tower(16, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 30))
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.steps):
        idx = torch.randint(0, len(xa), (32,), generator=gen)
        xb = xa[idx].flip(-1) if torch.rand((), generator=gen) < 0.5 else xa[idx]
        loss = F.cross_entropy(model((xb - 0.5) / 0.5), ya[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = 100.0 * (model((xt - 0.5) / 0.5).argmax(-1) == yt).float().mean().item()
    print(f"supervised CNN, {args.labels} labels, {args.steps} steps of 32: test accuracy {acc:.1f}")


def cmd_cnn_clip(args) -> None:
    """The library's k-means visual tokenizer (``imglish.tokenizers.kmeans``, what ``imglish quickstart
    --visual-tokenizer kmeans`` trains), probed: its conv CLIP's pooled features and the bag of its codes."""
    from imglish.tokenizers.kmeans import (
        KMeansTrainConfig,
        caption_encoder,
        load_conv_clip,
        load_kmeans_tokenizer,
        train_kmeans_tokenizer,
    )
    from imglish.tokenizers.text import TextTokenizer
    from imglish.training.pretrain import load_world_sources

    tok = TextTokenizer(args.text_tokenizer)
    pairs = load_world_sources(args.data, "train").pairs
    if pairs is None:
        raise SystemExit(f"{args.data} has no coco/dataset_coco.json: the conv CLIP trains on the world's pairs")
    t0 = time.perf_counter()
    result = train_kmeans_tokenizer(pairs, caption_encoder(tok), tok.vocab_size, KMeansTrainConfig(
        out=str(args.out), img_size=IMG, patch_size=16, n_code=args.codes, steps=args.steps,
        batch_size=args.batch, lr=args.lr, precision=args.precision, seed=args.seed))
    print(f"conv CLIP: contrastive loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} in {result.steps} steps "
          f"of {args.batch} ({time.perf_counter() - t0:.0f} s); {result.codes_used} of {args.codes} codes used; "
          f"wrote {result.tokenizer_path}")
    clip, book = load_conv_clip(result.teacher_path), load_kmeans_tokenizer(result.tokenizer_path)
    (xa, ya), (xb, yb) = load_split(args.data, "train", 1000), load_split(args.data, "val", 200)
    with torch.no_grad():
        pa, pb = clip.patch_features(xa), clip.patch_features(xb)
        ca, cb = book.get_codebook_indices(xa), book.get_codebook_indices(xb)
    print(f"conv CLIP: linear probe on the mean patch feature, val accuracy "
          f"{linear_probe(pa.mean(1), ya, pb.mean(1), yb):.1f}")

    def bag(c: torch.Tensor) -> torch.Tensor:
        return F.one_hot(c, args.codes).sum(1).float()

    print(f"conv CLIP: linear probe on the bag of its k-means codes (k={args.codes}), val accuracy "
          f"{linear_probe(bag(ca), ya, bag(cb), yb):.1f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("probe", help="linear probe of a model's frozen features, per layer")
    s.add_argument("model", help="an imglish model.safetensors, or 'random'")
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--labels", type=int, default=1000)
    s = sub.add_parser("probe-codes", help="linear probe of a visual tokenizer's bag of codes")
    s.add_argument("tokenizer")
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--labels", type=int, default=1000)
    s = sub.add_parser("cnn", help="a supervised CNN: how learnable the world's classes are")
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--labels", type=int, default=1600)
    s.add_argument("--steps", type=int, default=600)
    s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("cnn-clip", help="train the k-means visual tokenizer (a conv CLIP on the world's pairs); "
                       "probe the conv CLIP and the codes")
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--text-tokenizer", required=True, help="a SentencePiece model file")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--batch", type=int, default=128)
    s.add_argument("--codes", type=int, default=256)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    s.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"probe": cmd_probe, "probe-codes": cmd_probe_codes, "cnn": cmd_cnn, "cnn-clip": cmd_cnn_clip}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
