"""Why pretraining does or does not transfer on the synthetic world: the measurements of docs/quickstart.md.

Every subcommand reads a world written by ``imglish data shapes`` (or a quickstart's ``OUT/data``) and its
``imagenet`` split (the class of a scene is the colour and kind of its largest shape, 30 classes):

* ``probe``: a linear probe (multinomial logistic regression, L2, full-batch L-BFGS) on the frozen features of
  an imglish model (or of a random start): per layer, the CLS token and the mean of the patch tokens;
* ``probe-codes``: the same probe on a visual tokenizer's code map (a bag of codes per image): how much of the
  class the masked-image-modeling targets carry;
* ``cnn``: a small convolutional network trained with labels, the reference for how learnable the world is;
* ``cnn-clip``: a convolutional image tower and a small text transformer trained contrastively on the world's
  training pairs (CLIP's objective, no labels); probes its pooled features and the k-means codes of its patch
  features;
* ``kmeans-tokens``: writes those k-means codes as a precomputed token file for pretraining
  (``data.visual_targets=precomputed``), with a placeholder VQ-KD of the same codebook size.

Run from the repository root, e.g.::

    python tools/transfer_diagnostics.py probe --data runs/quickstart/data runs/quickstart/model.safetensors
    python tools/transfer_diagnostics.py cnn --data runs/quickstart/data --labels 1600 --steps 600

One torch thread unless ``--threads`` says otherwise; every figure is seeded.
"""

from __future__ import annotations

import argparse
import json
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
    from imglish.tokenizers.vqkd import load_vqkd

    tok, _ = load_vqkd(tokenizer_path)
    with torch.no_grad():
        codes = torch.cat([tok.get_codebook_indices(x[i:i + 100]) for i in range(0, len(x), 100)])
    return F.one_hot(codes.flatten(1), tok.config.n_code).sum(1).float()


def cmd_probe_codes(args) -> None:
    (xa, ya), (xb, yb) = load_split(args.data, "train", args.labels), load_split(args.data, "val", 200)
    acc = linear_probe(code_bags(args.tokenizer, xa), ya, code_bags(args.tokenizer, xb), yb)
    print(f"{args.tokenizer}: linear probe on the bag of visual codes, val accuracy {acc:.1f}")


# ------------------------------------------------------------------------------------------------ CNNs
def conv_tower(width: int = 128) -> nn.Sequential:
    """Four 3x3 conv + BatchNorm + ReLU + 2x2 max-pool blocks: a 64-pixel image becomes a 4x4 map (stride 16,
    the tiny BEiT-3's patch grid)."""
    layers: list[nn.Module] = []
    for cin, cout in ((3, 32), (32, 64), (64, 128), (128, width)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers)


def cmd_cnn(args) -> None:
    torch.manual_seed(args.seed)
    (xa, ya), (xt, yt) = load_split(args.data, "train", args.labels), load_split(args.data, "test", 200)
    model = nn.Sequential(conv_tower(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 30))
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


class ConvCLIP(nn.Module):
    """A conv image tower and a 2-layer text transformer, each projected and L2-normalised (CLIP's shape)."""

    def __init__(self, vocab: int, dim: int = 128, max_len: int = 32) -> None:
        super().__init__()
        self.max_len = max_len
        self.tower = conv_tower(dim)
        self.image_proj = nn.Linear(dim, dim)
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, 0.0, batch_first=True, norm_first=True)
        self.text = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.text_proj = nn.Linear(dim, dim)
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 64, 64) in [0, 1] -> (B, 16, dim): one feature per 16x16 patch."""
        return self.tower((x - 0.5) / 0.5).flatten(2).transpose(1, 2)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.patch_features(x).mean(1)), dim=-1)

    def encode_text(self, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.text(self.embed(ids) + self.pos[: ids.shape[1]], src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return F.normalize(self.text_proj((h * keep).sum(1) / keep.sum(1)), dim=-1)


def _train_pairs(data: Path) -> tuple[torch.Tensor, list[list[str]]]:
    meta = json.loads((data / "coco" / "dataset_coco.json").read_text())
    images, captions = [], []
    for rec in meta["images"]:
        if rec["split"] not in ("train", "restval"):
            continue
        path = data / "coco" / rec["filepath"] / rec["filename"]
        images.append(np.asarray(Image.open(path).convert("RGB").resize((IMG, IMG))))
        captions.append([s["raw"] for s in rec["sentences"]])
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255, captions


def cmd_cnn_clip(args) -> None:
    from imglish.tokenizers.text import TextTokenizer

    torch.manual_seed(args.seed)
    tok = TextTokenizer(args.text_tokenizer)
    x, caps = _train_pairs(args.data)
    model = ConvCLIP(len(tok))
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=args.steps, pct_start=0.1)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = rng.choice(len(x), args.batch, replace=False)
        text = tok([caps[i][rng.integers(len(caps[i]))] for i in idx], max_length=32, padding="max_length",
                   return_tensors="pt")
        ids, pad = text["input_ids"], text["padding_mask"].bool()
        scale = model.log_scale.exp().clamp(max=100)
        logits = model.encode_image(x[idx]) @ model.encode_text(ids, pad).T * scale
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps}: contrastive loss {loss.item():.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "vocab": len(tok)}, args.out / "conv_clip.pt")
    _probe_conv_clip(model.eval(), args.data, args.codes)


def _load_conv_clip(folder: Path) -> ConvCLIP:
    if not (folder / "conv_clip.pt").is_file():
        raise SystemExit(f"{folder / 'conv_clip.pt'} does not exist: --clip takes the folder of cnn-clip")
    blob = torch.load(folder / "conv_clip.pt", weights_only=True)
    model = ConvCLIP(int(blob["vocab"]))
    model.load_state_dict(blob["state"])
    return model.eval()


def _patch_features(model: ConvCLIP, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.patch_features(x[i:i + 200]) for i in range(0, len(x), 200)])


def _kmeans(z: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means (k-means++ start) on rows of ``z``: the (k, D) centroids."""
    gen = torch.Generator().manual_seed(seed)
    cent = z[torch.randint(0, len(z), (1,), generator=gen)]
    for _ in range(1, k):
        d = torch.cdist(z, cent).min(1).values.pow(2)
        cent = torch.cat([cent, z[torch.multinomial(d / d.sum(), 1, generator=gen)]])
    for _ in range(iters):
        assign = torch.cdist(z, cent).argmin(1)
        for j in range(k):
            members = z[assign == j]
            if len(members):
                cent[j] = members.mean(0)
    return cent


class _Codebook:
    """k-means codes of patch features, standardised with the statistics of the features it was fitted on."""

    def __init__(self, patches: torch.Tensor, k: int) -> None:
        flat = patches.reshape(-1, patches.shape[-1])
        self.mu, self.sd = flat.mean(0), flat.std(0) + 1e-6
        self.centroids = _kmeans((flat - self.mu) / self.sd, k)

    def codes(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, D) patch features -> (B, N) code ids."""
        z = (patches.reshape(-1, patches.shape[-1]) - self.mu) / self.sd
        return torch.cdist(z, self.centroids).argmin(1).reshape(patches.shape[:2])


def _probe_conv_clip(model: ConvCLIP, data: Path, codes: list[int]) -> None:
    (xa, ya), (xb, yb) = load_split(data, "train", 1000), load_split(data, "val", 200)
    pa, pb = _patch_features(model, xa), _patch_features(model, xb)
    print(f"conv CLIP: linear probe on the mean patch feature, val accuracy "
          f"{linear_probe(pa.mean(1), ya, pb.mean(1), yb):.1f}")
    for k in codes:
        book = _Codebook(pa, k)

        def bag(p: torch.Tensor) -> torch.Tensor:
            return F.one_hot(book.codes(p), k).sum(1).float()

        print(f"conv CLIP: linear probe on the bag of its k-means codes (k={k}), val accuracy "
              f"{linear_probe(bag(pa), ya, bag(pb), yb):.1f}")


def cmd_kmeans_tokens(args) -> None:
    """k-means codes of the conv CLIP's patch features of every image of the image stream, as a token
    file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from imglish.tokenizers.vqkd import load_vqkd
    from imglish.tokenizers.vqkd_train import (
        VisualTokenizerTrainConfig,
        precompute_visual_tokens,
        train_visual_tokenizer,
    )

    clip = _load_conv_clip(args.clip)  # a missing one is named before anything is written
    root = args.data / "imagenet" / "train"
    if not root.is_dir():
        raise SystemExit(f"{root} does not exist: give --data a world written by `imglish data shapes`")
    placeholder = args.out / "tokenizers" / "vqkd"
    if not (placeholder / "vqkd.safetensors").exists():  # only its codebook size is used
        train_visual_tokenizer(VisualTokenizerTrainConfig(
            images=str(root), out=str(placeholder), steps=2, seed=0, progress=False,
            model_overrides={"img_size": IMG, "patch_size": 16, "n_code": args.codes}))
    tokens = args.out / "kmeans_tokens.safetensors"
    precompute_visual_tokens(load_vqkd(placeholder / "vqkd.safetensors")[0], root, tokens, progress=False)
    with safe_open(str(tokens), "pt") as fh:
        meta = fh.metadata()
    paths = json.loads(meta["paths"])
    x = torch.from_numpy(np.stack([np.asarray(Image.open(root / p).convert("RGB").resize((IMG, IMG)))
                                   for p in paths])).permute(0, 3, 1, 2).float() / 255
    p = _patch_features(clip, x)
    codes = _Codebook(p, args.codes).codes(p)
    save_file({"tokens": codes.long()}, str(tokens), metadata=meta)
    print(f"wrote {tokens}: {len(paths)} images, {int(codes.unique().numel())} of {args.codes} codes used")
    print("pretrain on them: quickstart(OUT, overrides={'data.visual_targets': 'precomputed', "
          f"'data.visual_tokens': '{tokens}', 'data.visual_tokenizer_codes': {args.codes}}})")


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
    s = sub.add_parser("cnn-clip", help="train a conv CLIP on the world's pairs; probe it and its codes")
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--text-tokenizer", required=True, help="a SentencePiece model file")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--batch", type=int, default=128)
    s.add_argument("--codes", type=int, nargs="*", default=[64, 256])
    s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("kmeans-tokens", help="the conv CLIP's k-means codes as pretraining targets")
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--clip", type=Path, required=True, help="the --out folder of cnn-clip")
    s.add_argument("--out", type=Path, required=True, help="the quickstart OUT the token file is meant for")
    s.add_argument("--codes", type=int, default=256)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"probe": cmd_probe, "probe-codes": cmd_probe_codes, "cnn": cmd_cnn, "cnn-clip": cmd_cnn_clip,
     "kmeans-tokens": cmd_kmeans_tokens}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
