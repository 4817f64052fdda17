"""Small synthetic images for the tokenizer tests (shapes on noisy backgrounds), drawn with Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = [(220, 40, 40), (40, 180, 60), (50, 80, 220), (240, 200, 30), (160, 60, 200), (30, 200, 200),
           (250, 130, 20), (240, 240, 240), (20, 20, 20), (120, 120, 120)]


def make_image(rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One image: a gradient background with noise and 1-4 coloured shapes."""
    c0, c1 = np.array(COLOURS[rng.integers(len(COLOURS))]), np.array(COLOURS[rng.integers(len(COLOURS))])
    t = np.linspace(0, 1, size)[None, :, None]
    if rng.random() < 0.5:
        t = t.transpose(1, 0, 2)
    bg = (c0 * (1 - t) + c1 * t) * 0.6 + 50
    bg = np.broadcast_to(bg, (size, size, 3)) + rng.normal(0, 12, (size, size, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(1, 5)):
        r = rng.integers(size // 10, size // 3)
        cx, cy = rng.integers(0, size, 2)
        colour = tuple(int(c) for c in COLOURS[rng.integers(len(COLOURS))])
        kind = rng.integers(3)
        box = [cx - r, cy - r, cx + r, cy + r]
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


def write_images(folder: Path, n: int, size: int = 64, seed: int = 0) -> list[Path]:
    """Write ``n`` PNG images into ``folder`` (in two subfolders, to exercise the recursive search)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / f"img_{i:05d}.png"
        make_image(rng, size).save(p)
        paths.append(p)
    return paths
