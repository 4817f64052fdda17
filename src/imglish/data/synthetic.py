"""The embedded synthetic world: seeded scenes of coloured shapes, written in the formats of the real datasets.

``generate_world(WorldConfig(...), out_dir)`` (CLI: ``imglish data shapes``) draws ``num_images`` scenes with Pillow.
Each scene holds one large object and up to ``max_objects - 1`` small ones, each with a shape, a colour, a size and a
position taken from fixed vocabularies, on a plain or gradient background with pixel noise and specks. From the scene
description (never from the pixels) it writes:

* captions (several per image, templated, with attributes, positions and spatial relations) in the COCO and Flickr30k
  Karpathy JSON layouts plus COCO-style caption ground truth for pycocotools;
* VQAv2 questions and annotations (colour, shape, count, existence, relation; ten answers each with some annotator
  disagreement);
* NLVR2 JSON lines with left/right image files (a statement about two images, True/False);
* an ImageNet-style class tree whose label is the colour and shape of the largest object;
* a text-only corpus (captions of other, unrendered scenes) and webdataset tar shards (pairs, images, texts);
* dense-prediction ground truth: ADE20K-style semantic label maps (drawn in the same pass as the pixels)
  and COCO instances (boxes, polygons, RLE masks for circles) from the exact geometry of the objects.

The on-disk layout is documented in ``docs/data.md``. Every random draw comes from ``numpy.random.default_rng([seed,
stream, index])``, so output depends only on the config: same seed and flags give byte-identical files, whatever the
number of worker processes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import tarfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ADE_BACKGROUND",
    "ADE_CLASSES",
    "ADE_IGNORE",
    "FORMATS",
    "WORLD_FORMAT",
    "WorldConfig",
    "WorldSummary",
    "class_names",
    "generate_world",
    "load_world",
    "make_captions",
    "make_nlvr2_statement",
    "make_questions",
    "render_scene",
    "sample_scene",
    "scene_label",
    "world_paths",
]

WORLD_FORMAT = "imglish-shapes/1"
FORMATS = ("coco", "flickr30k", "vqav2", "nlvr2", "imagenet", "text", "wds", "ade20k", "coco_instances")

# ADE20K label values of the semantic maps: 0 is unlabelled (ignored), 1 background, 2.. the shapes
ADE_IGNORE = 0
ADE_BACKGROUND = 1

# random streams: rng = default_rng([seed, STREAM, index])
_S_SCENE, _S_TEXT, _S_QA, _S_NLVR2, _S_CORPUS, _S_PAIRS = 1, 2, 3, 4, 5, 6

_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 220),
    "yellow": (240, 215, 30),
    "purple": (135, 50, 175),
    "orange": (245, 135, 25),
}
_SHAPES = ("circle", "square", "triangle", "diamond", "cross")
_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (242, 242, 240),
    "light gray": (190, 190, 192),
    "dark gray": (75, 75, 78),
    "black": (18, 18, 20),
    "beige": (228, 216, 186),
}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclasses.dataclass
class WorldConfig:
    """Settings of the synthetic world (the flags of ``imglish data shapes``).

    Attributes:
        num_images: number of scenes (images) over all splits.
        image_size: side of the square images in pixels (64 for CPU work; 224 works too).
        seed: world seed; same seed and settings give byte-identical output.
        val_fraction: share of scenes in the val split.
        test_fraction: share of scenes in the test split.
        min_objects: fewest objects per scene (>= 1).
        max_objects: most objects per scene.
        captions_per_image: captions written per image.
        questions_per_image: VQA questions per image (ten answers each).
        nlvr2_per_image: NLVR2 examples per image of a split (a float; 1.0 gives as many examples as images; the
            default 4 gives a tiny fine-tune enough pairs to learn from).
        texts_per_image: lines of the text-only corpus per image of a split.
        answer_noise: probability that one annotator's VQA answer is wrong.
        noise_fraction: share of pixels given a random brightness shift ("salt" noise).
        noise_amplitude: largest brightness shift of a noisy pixel (0..255 scale).
        shard_size: samples per webdataset tar shard.
        jpeg_quality: JPEG quality of the written images.
        formats: which outputs to write (subset of ``FORMATS``).
        workers: processes used to draw images (None: all CPU cores).
    """

    num_images: int = 2000
    image_size: int = 64
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    min_objects: int = 1
    max_objects: int = 4
    captions_per_image: int = 5
    questions_per_image: int = 4
    nlvr2_per_image: float = 4.0
    texts_per_image: int = 5
    answer_noise: float = 0.12
    noise_fraction: float = 0.15
    noise_amplitude: int = 24
    shard_size: int = 1000
    jpeg_quality: int = 90
    formats: tuple[str, ...] = FORMATS
    workers: int | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid setting."""
        if self.num_images < 3:
            raise ValueError(f"num_images must be at least 3 (one per split), got {self.num_images}")
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in [16, 1024], got {self.image_size}")
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave room for a train split")
        if not 1 <= self.min_objects <= self.max_objects <= 8:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= 8, got min_objects={self.min_objects}, "
                f"max_objects={self.max_objects}"
            )
        for name in ("captions_per_image", "questions_per_image", "texts_per_image", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.nlvr2_per_image < 0:
            raise ValueError(f"nlvr2_per_image must be >= 0, got {self.nlvr2_per_image}")
        if not 0.0 <= self.answer_noise < 0.5:
            raise ValueError(f"answer_noise must be in [0, 0.5), got {self.answer_noise}")
        if not 0.0 <= self.noise_fraction <= 1.0:
            raise ValueError(f"noise_fraction must be in [0, 1], got {self.noise_fraction}")
        if not 0 <= self.noise_amplitude <= 255:
            raise ValueError(f"noise_amplitude must be in [0, 255], got {self.noise_amplitude}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise ValueError(f"unknown formats {unknown}; expected a subset of {list(FORMATS)}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    def split_sizes(self) -> dict[str, int]:
        """Images per split: ``{"train": n, "val": n, "test": n}``."""
        n_val = int(round(self.num_images * self.val_fraction))
        n_test = int(round(self.num_images * self.test_fraction))
        return {"train": self.num_images - n_val - n_test, "val": n_val, "test": n_test}


@dataclasses.dataclass
class WorldSummary:
    """What :func:`generate_world` wrote.

    Attributes:
        root: the output folder.
        counts: number of records per output (images, captions, questions, ...) and split.
        seconds: wall time of the generation.
    """

    root: Path
    counts: dict[str, Any]
    seconds: float


# ---------------------------------------------------------------------------------------------------------------------
# scenes
# ---------------------------------------------------------------------------------------------------------------------


def class_names() -> list[str]:
    """The classification labels, ``"<colour>_<shape>"``, in sorted order (label index = position)."""
    return sorted(f"{c}_{s}" for c in _COLORS for s in _SHAPES)


def scene_label(scene: dict[str, Any]) -> str:
    """Class name of a scene: colour and shape of its largest object (``"red_circle"``)."""
    big = max(scene["objects"], key=lambda o: o["r"])
    return f"{big['color']}_{big['shape']}"


def sample_scene(rng: np.random.Generator, cfg: WorldConfig) -> dict[str, Any]:
    """Draw a scene description (no pixels).

    Args:
        rng: numpy random generator.
        cfg: world settings.

    Returns:
        ``{"background": str, "gradient": bool, "objects": [{"shape", "color", "size", "x", "y", "r"}]}`` with x, y, r
        as fractions of the image side; the first object is the single large one.
    """
    colors, shapes, bgs = list(_COLORS), list(_SHAPES), list(_BACKGROUNDS)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objects: list[dict[str, Any]] = []
    for i in range(n):
        size = "large" if i == 0 else "small"
        r = float(rng.uniform(0.2, 0.26)) if size == "large" else float(rng.uniform(0.07, 0.11))
        for _ in range(40):
            x = float(rng.uniform(r + 0.02, 1 - r - 0.02))
            y = float(rng.uniform(r + 0.02, 1 - r - 0.02))
            if all(math.hypot(x - o["x"], y - o["y"]) > (r + o["r"]) * 1.05 for o in objects):
                objects.append({
                    "shape": shapes[int(rng.integers(len(shapes)))],
                    "color": colors[int(rng.integers(len(colors)))],
                    "size": size,
                    "x": round(x, 4),
                    "y": round(y, 4),
                    "r": round(r, 4),
                })
                break
    return {
        "background": bgs[int(rng.integers(len(bgs)))],
        "gradient": bool(rng.random() < 0.5),
        "objects": objects,
    }


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        a = r * 0.85
        return [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "cross":
        a, b = r, r * 0.35
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                (cx - a, cy - b), (cx - b, cy - b)]
    return None


_Polygon = list[tuple[float, float]]


def _object_geometry(o: dict[str, Any], s: int) -> tuple[float, float, float, _Polygon | None]:
    """Centre, radius (pixels) and polygon (None for a circle) of an object in an image of side ``s``."""
    cx, cy, r = o["x"] * s, o["y"] * s, o["r"] * s
    return cx, cy, r, _shape_polygon(o["shape"], cx, cy, r)


def render_scene(scene: dict[str, Any], cfg: WorldConfig, rng: np.random.Generator,
                 labels: bool = False) -> Image.Image | tuple[Image.Image, np.ndarray]:
    """Draw a scene as an RGB image of ``cfg.image_size`` pixels, and optionally its semantic label map.

    The label map is drawn in the same pass, with the same drawing calls and coordinates as the image, so it
    matches the pixels exactly; asking for it changes no random draw (the image is the same either way). Its
    values follow ADE20K: ``ADE_IGNORE`` (0) for the grey clutter specks, ``ADE_BACKGROUND`` (1) for the
    background and ``2 + k`` for a pixel of the k-th shape of the vocabulary (circle, square, triangle,
    diamond, cross).

    Args:
        scene: from :func:`sample_scene`.
        cfg: world settings (size, noise).
        rng: random generator for colour jitter and noise.
        labels: also return the label map.

    Returns:
        ``PIL.Image`` in RGB; with ``labels``, ``(image, label_map)``, ``label_map`` a ``(H, W)`` uint8 array.
    """
    s = cfg.image_size
    base = np.array(_BACKGROUNDS[scene["background"]], dtype=np.float32)
    if scene["gradient"]:
        ramp = np.linspace(-1.0, 1.0, s, dtype=np.float32)
        ramp = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
        bg = np.broadcast_to(base + (ramp * float(rng.uniform(15, 35)))[..., None], (s, s, 3))
    else:
        bg = np.broadcast_to(base, (s, s, 3)).copy()
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    label_img = Image.new("L", (s, s), ADE_BACKGROUND) if labels else None
    ldraw = ImageDraw.Draw(label_img) if label_img is not None else None
    # a few specks of background clutter (small, grey, never a shape from the vocabulary)
    for _ in range(int(rng.integers(0, 4))):
        px, py = rng.uniform(0, s, 2)
        d = max(1.0, s / 64)
        g = int(rng.integers(90, 170))
        box = [px, py, px + d, py + d]
        draw.rectangle(box, fill=(g, g, g))
        if ldraw is not None:
            ldraw.rectangle(box, fill=ADE_IGNORE)
    for o in scene["objects"]:
        col = np.array(_COLORS[o["color"]]) + rng.integers(-14, 15, 3)
        fill = tuple(int(v) for v in np.clip(col, 0, 255))
        cx, cy, r, poly = _object_geometry(o, s)
        cls = ADE_BACKGROUND + 1 + _SHAPES.index(o["shape"])
        if poly is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            if ldraw is not None:
                ldraw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=cls)
        else:
            draw.polygon(poly, fill=fill)
            if ldraw is not None:
                ldraw.polygon(poly, fill=cls)
    if cfg.noise_fraction > 0 and cfg.noise_amplitude > 0:
        # sparse brightness noise: visible, yet PNG files stay small (dense Gaussian noise does not compress)
        arr = np.asarray(img, dtype=np.int16)
        hit = rng.random((s, s)) < cfg.noise_fraction
        shift = rng.integers(-cfg.noise_amplitude, cfg.noise_amplitude + 1, (s, s), dtype=np.int16)
        arr = arr + (shift * hit)[..., None]
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if label_img is None:
        return img
    return img, np.array(label_img, dtype=np.uint8)


# dense annotations (COCO instances) from scene descriptions


def _rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts of a mask: runs over the pixels in column-major order, zeros first."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return [0, *runs] if flat[0] else runs


def _polygon_area(poly: Sequence[tuple[float, float]]) -> float:
    """Area enclosed by a simple polygon (shoelace formula)."""
    twice = 0.0
    for (x0, y0), (x1, y1) in zip(poly, [*poly[1:], poly[0]]):
        twice += x0 * y1 - x1 * y0
    return abs(twice) / 2.0


def _instance_annotations(scene: dict[str, Any], s: int) -> list[dict[str, Any]]:
    """COCO instance annotations (without ``id`` and ``image_id``) of a scene's objects, in object order.

    Polygon shapes get their exact vertices as a COCO polygon; a circle gets the uncompressed RLE of the
    ellipse that :func:`render_scene` draws (the same call and coordinates on an empty mask).
    """
    out: list[dict[str, Any]] = []
    for o in scene["objects"]:
        cx, cy, r, poly = _object_geometry(o, s)
        if poly is None:
            mask_img = Image.new("L", (s, s), 0)
            ImageDraw.Draw(mask_img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
            mask = np.asarray(mask_img, dtype=bool)
            bbox = [cx - r, cy - r, 2 * r, 2 * r]
            seg: Any = {"counts": _rle_counts(mask), "size": [s, s]}
            area = float(mask.sum())
        else:
            xs, ys = [p[0] for p in poly], [p[1] for p in poly]
            bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            seg = [[v for p in poly for v in p]]
            area = round(_polygon_area(poly), 2)
        out.append({"category_id": _SHAPES.index(o["shape"]) + 1, "iscrowd": 0,
                    "bbox": [round(v, 2) for v in bbox], "area": area, "segmentation": seg})
    return out


# ---------------------------------------------------------------------------------------------------------------------
# text from scene descriptions
# ---------------------------------------------------------------------------------------------------------------------


def _region(o: dict[str, Any]) -> str:
    v = "top" if o["y"] < 1 / 3 else ("bottom" if o["y"] > 2 / 3 else "middle")
    h = "left" if o["x"] < 1 / 3 else ("right" if o["x"] > 2 / 3 else "center")
    if v == "middle" and h == "center":
        return "center"
    if v == "middle":
        return f"{h} side"
    if h == "center":
        return v
    return f"{v} {h}"


def _relation(a: dict[str, Any], b: dict[str, Any], margin: float = 0.12) -> str | None:
    """Spatial relation of a to b (``"to the left of"``...), or None if unclear."""
    dx, dy = a["x"] - b["x"], a["y"] - b["y"]
    if abs(dx) >= abs(dy) and abs(dx) > margin:
        return "to the left of" if dx < 0 else "to the right of"
    if abs(dy) > abs(dx) and abs(dy) > margin:
        return "above" if dy < 0 else "below"
    return None


def _name(o: dict[str, Any], size: bool = False) -> str:
    return f"{o['size']} {o['color']} {o['shape']}" if size else f"{o['color']} {o['shape']}"


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _count_word(n: int) -> str:
    return _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)


def make_captions(scene: dict[str, Any], rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct-as-possible captions describing the scene (attributes, positions, relations).

    Args:
        scene: scene description.
        rng: random generator (choice of templates and wording).
        n: number of captions.

    Returns:
        list of ``n`` lower-case captions.
    """
    objs = scene["objects"]
    big = objs[0]
    bg = scene["background"]
    pic = ["a picture of", "an image of", "a drawing of", "a photo of", "a render of"]
    listing = _join([_article(_name(o, size=True)) for o in objs])
    pairs = [(a, b, _relation(a, b)) for a in objs for b in objs if a is not b]
    pairs = [p for p in pairs if p[2] is not None]

    def t_list() -> str:
        return f"{listing} on a {bg} background"

    def t_pic() -> str:
        return f"{pic[int(rng.integers(len(pic)))]} {listing}"

    def t_count() -> str:
        k = len(objs)
        return f"{_count_word(k)} shape{'s' if k > 1 else ''} on a {bg} background, the largest is {_article(_name(big))}"

    def t_region() -> str:
        o = objs[int(rng.integers(len(objs)))]
        return f"there is {_article(_name(o, size=True))} in the {_region(o)} of the image"

    def t_relation() -> str:
        if not pairs:
            return f"a single {_name(big)} in the {_region(big)} on a {bg} background"
        a, b, rel = pairs[int(rng.integers(len(pairs)))]
        return f"{_article(_name(a))} {rel} {_article(_name(b))}"

    def t_big() -> str:
        verb = ["the biggest shape is", "the largest object is", "the main shape is"][int(rng.integers(3))]
        return f"{verb} {_article(_name(big))} on a {bg} background"

    def t_colors() -> str:
        cols = sorted({o["color"] for o in objs})
        return f"{_join(cols)} shape{'s' if len(objs) > 1 else ''} on a {'plain' if not scene['gradient'] else 'shaded'} {bg} background"

    templates = [t_list, t_pic, t_count, t_region, t_relation, t_big, t_colors]
    order = rng.permutation(len(templates))
    out: list[str] = []
    for i in range(n):
        out.append(templates[int(order[i % len(templates)])]())
    return out


def _noisy_answers(correct: str, wrong: Sequence[str], variants: Sequence[str], rng: np.random.Generator,
                   noise: float) -> list[str]:
    answers = []
    for _ in range(10):
        u = rng.random()
        if u < noise and wrong:
            answers.append(wrong[int(rng.integers(len(wrong)))])
        elif u < noise + 0.1 and variants:
            answers.append(variants[int(rng.integers(len(variants)))])
        else:
            answers.append(correct)
    return answers


def make_questions(scene: dict[str, Any], rng: np.random.Generator, n: int, noise: float = 0.12) -> list[dict[str, Any]]:
    """VQA questions about a scene, each with ten annotator answers.

    Question kinds: colour, shape, count, existence, relation. Most annotators give the right answer; with probability
    ``noise`` one gives a wrong answer of the same kind, and sometimes a surface variant (``"two"`` for ``"2"``,
    ``"a circle"`` for ``"circle"``) that the official answer normalisation maps back.

    Args:
        scene: scene description.
        rng: random generator.
        n: number of questions.
        noise: probability of a wrong answer per annotator.

    Returns:
        list of ``{"question", "answers" (10 str), "answer" (the correct one), "answer_type", "question_type"}``.
    """
    objs = scene["objects"]
    colors, shapes = list(_COLORS), list(_SHAPES)
    by_shape = Counter(o["shape"] for o in objs)
    by_color = Counter(o["color"] for o in objs)
    by_name = Counter(_name(o) for o in objs)
    out: list[dict[str, Any]] = []
    kinds = ["color", "shape", "count", "exist", "relation"]
    for qi in range(n):
        kind = kinds[int(rng.integers(len(kinds)))] if qi >= len(kinds) else kinds[int(rng.permutation(len(kinds))[qi])]
        if kind == "color":
            o = objs[int(rng.integers(len(objs)))]
            q = (f"what color is the {o['shape']}?" if by_shape[o["shape"]] == 1
                 else f"what color is the {o['size']} {o['shape']}?" if o["size"] == "large"
                 else None)
            if q is None:
                o = objs[0]
                q = "what color is the largest shape?"
            a = o["color"]
            wrong = [c for c in colors if c != a]
            rec = dict(question=q, answer=a, answer_type="other", question_type="what color is the",
                       answers=_noisy_answers(a, wrong, [], rng, noise))
        elif kind == "shape":
            o = objs[int(rng.integers(len(objs)))]
            if by_color[o["color"]] == 1:
                q = f"what shape is the {o['color']} object?"
            else:
                o = objs[0]
                q = "what shape is the biggest object?"
            a = o["shape"]
            wrong = [s for s in shapes if s != a]
            rec = dict(question=q, answer=a, answer_type="other", question_type="what shape is the",
                       answers=_noisy_answers(a, wrong, [_article(a)], rng, noise))
        elif kind == "count":
            u = rng.random()
            if u < 0.4:
                q, k = "how many shapes are there?", len(objs)
            elif u < 0.7:
                c = colors[int(rng.integers(len(colors)))]
                q, k = f"how many {c} shapes are there?", by_color[c]
            else:
                s = shapes[int(rng.integers(len(shapes)))]
                q, k = f"how many {s}s are there?", by_shape[s]
            a = str(k)
            wrong = [str(max(0, k - 1)), str(k + 1)]
            wrong = [w for w in wrong if w != a]
            rec = dict(question=q, answer=a, answer_type="number", question_type="how many",
                       answers=_noisy_answers(a, wrong, [_count_word(k)], rng, noise))
        elif kind == "exist":
            if rng.random() < 0.5:
                o = objs[int(rng.integers(len(objs)))]
                c, s = o["color"], o["shape"]
            else:
                c, s = colors[int(rng.integers(len(colors)))], shapes[int(rng.integers(len(shapes)))]
            a = "yes" if by_name[f"{c} {s}"] > 0 else "no"
            q = f"is there {_article(c)} {s}?"
            rec = dict(question=q, answer=a, answer_type="yes/no", question_type="is there a",
                       answers=_noisy_answers(a, ["no" if a == "yes" else "yes"], [], rng, noise))
        else:  # relation between two objects that are uniquely named
            cands = [(x, y) for x in objs for y in objs
                     if x is not y and by_name[_name(x)] == 1 and by_name[_name(y)] == 1 and _relation(x, y)]
            if cands:
                x, y = cands[int(rng.integers(len(cands)))]
                true_rel = _relation(x, y)
                rels = ["to the left of", "to the right of", "above", "below"]
                rel = true_rel if rng.random() < 0.5 else rels[int(rng.integers(len(rels)))]
                a = "yes" if rel == true_rel else "no"
                q = f"is the {_name(x)} {rel} the {_name(y)}?"
                rec = dict(question=q, answer=a, answer_type="yes/no", question_type="is the",
                           answers=_noisy_answers(a, ["no" if a == "yes" else "yes"], [], rng, noise))
            else:
                o = objs[0]
                q = f"where is the {_name(o)}?"
                a = _region(o)
                rec = dict(question=q, answer=a, answer_type="other", question_type="where is the",
                           answers=_noisy_answers(a, ["center", "top left", "bottom right"], [], rng, noise))
        out.append(rec)
    return out


def make_nlvr2_statement(left: dict[str, Any], right: dict[str, Any], rng: np.random.Generator) -> tuple[str, bool]:
    """A statement about a pair of scenes and whether it is true.

    Args:
        left: scene shown as the left image.
        right: scene shown as the right image.
        rng: random generator.

    Returns:
        ``(sentence, label)``.
    """
    colors, shapes = list(_COLORS), list(_SHAPES)

    def has(scene: dict[str, Any], color: str | None = None, shape: str | None = None) -> bool:
        return any((color is None or o["color"] == color) and (shape is None or o["shape"] == shape)
                   for o in scene["objects"])

    def pick_attr() -> tuple[str, str]:
        if rng.random() < 0.6:  # an attribute that is present in one of the images: keeps labels balanced
            src = left if rng.random() < 0.5 else right
            o = src["objects"][int(rng.integers(len(src["objects"])))]
            return o["color"], o["shape"]
        return colors[int(rng.integers(len(colors)))], shapes[int(rng.integers(len(shapes)))]

    kind = int(rng.integers(6))
    c, s = pick_attr()
    if kind == 0:
        return f"Both images contain a {s}.", has(left, shape=s) and has(right, shape=s)
    if kind == 1:
        side, scene = ("left", left) if rng.random() < 0.5 else ("right", right)
        return f"The {side} image contains {_article(c)} {s}.", has(scene, c, s)
    if kind == 2:
        return f"Exactly one image contains a {c} shape.", has(left, color=c) != has(right, color=c)
    if kind == 3:
        nl, nr = len(left["objects"]), len(right["objects"])
        if rng.random() < 0.5:
            return "The left image has more shapes than the right image.", nl > nr
        total = nl + nr + int(rng.integers(-1, 2))
        return f"There are {_count_word(total)} shapes in total.", nl + nr == total
    if kind == 4:
        return (f"The largest shape in each image is {c}.",
                left["objects"][0]["color"] == c and right["objects"][0]["color"] == c)
    return f"At least one image contains {_article(c)} {s}.", has(left, c, s) or has(right, c, s)


# ---------------------------------------------------------------------------------------------------------------------
# file layout
# ---------------------------------------------------------------------------------------------------------------------


def _coco_folder(split: str) -> str:
    return "train2014" if split == "train" else "val2014"


def _coco_name(split: str, image_id: int) -> str:
    f = _coco_folder(split)
    return f"COCO_{f}_{image_id:012d}.jpg"


_NLVR2_FILES = {"train": "train.json", "val": "dev.json", "test": "test1.json"}
_NLVR2_DIRS = {"train": "train", "val": "dev", "test": "test1"}


def _nlvr2_prefix(split: str, k: int) -> str:
    return f"{_NLVR2_DIRS[split]}-{k}-0"


def _nlvr2_image_relpath(split: str, k: int, side: int) -> str:
    d = _NLVR2_DIRS[split]
    name = f"{_nlvr2_prefix(split, k)}-img{side}.png"
    if split == "train":
        return f"images/{d}/{k % 100}/{name}"
    return f"images/{d}/{name}"


_ADE_FOLDERS = {"train": "training", "val": "validation", "test": "testing"}
#: names of the reduced class ids 0..5 of the world's ADE20K layout (raw label v is class v - 1; 0 is ignored)
ADE_CLASSES = ("background", *_SHAPES)


def _ade_name(split: str, image_id: int) -> str:
    return f"ADE_{split}_{image_id:08d}"


def world_paths(root: str | os.PathLike) -> dict[str, Path]:
    """Where everything lives in a world folder (see ``docs/data.md``).

    Args:
        root: the folder written by :func:`generate_world`.

    Returns:
        a dict of named paths: ``world_json``, ``coco_root`` (image root of the Karpathy file), ``coco_karpathy``,
        ``coco_gt_{train,val,test}``, ``flickr30k_root``, ``flickr30k_karpathy``, ``vqav2_dir``, ``nlvr2_dir``,
        ``imagenet_{train,val,test}``, ``images_{train,val,test}`` (the image-only sets: the ImageNet trees),
        ``text_{train,val,test}``, ``wds_dir``, ``ade20k_root`` (an ADEChallengeData2016-style folder),
        ``coco_instances_{train,val,test}`` (COCO instances JSON; images relative to ``coco_root``).
    """
    r = Path(root)
    p: dict[str, Path] = {
        "world_json": r / "world.json",
        "coco_root": r / "coco",
        "coco_karpathy": r / "coco" / "dataset_coco.json",
        "flickr30k_root": r / "flickr30k",
        "flickr30k_karpathy": r / "flickr30k" / "dataset_flickr30k.json",
        "vqav2_dir": r / "vqav2",
        "nlvr2_dir": r / "nlvr2",
        "wds_dir": r / "wds",
        "ade20k_root": r / "ade20k",
    }
    for split in ("train", "val", "test"):
        p[f"coco_gt_{split}"] = r / "coco" / "annotations" / f"coco_karpathy_{split}_gt.json"
        p[f"imagenet_{split}"] = r / "imagenet" / split
        p[f"images_{split}"] = r / "imagenet" / split
        p[f"text_{split}"] = r / "text" / f"{split}.txt"
        p[f"coco_instances_{split}"] = r / "coco" / "annotations" / f"instances_{split}.json"
    return p


def load_world(root: str | os.PathLike) -> dict[str, Any]:
    """Read ``world.json`` (format, config, split id ranges, class names, counts).

    Raises:
        FileNotFoundError: if ``root`` holds no world.
        ValueError: if the file is not an imglish world.
    """
    path = Path(root) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root}: not a synthetic world (no world.json); create one with `imglish data shapes`")
    data = json.loads(path.read_text())
    if data.get("format") != WORLD_FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r}, expected {WORLD_FORMAT!r}")
    return data


# ---------------------------------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------------------------------


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, stream, index])


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _link_or_write(src: Path | None, dst: Path, data: bytes) -> Path:
    """Hard-link ``dst`` to ``src`` (same bytes, no extra disk space), or write ``data`` if that is not possible."""
    if src is not None:
        try:
            os.link(src, dst)
            return dst
        except OSError:
            pass
    _write(dst, data)
    return dst


# layouts that read their images from coco/{train2014,val2014}
_COCO_IMAGE_FORMATS = {"coco", "vqav2", "coco_instances"}

# Worker-side state (set once per process by the pool initializer).
_W: dict[str, Any] = {}


def _init_worker(cfg: WorldConfig, tmp_root: str, nlvr2_slots: dict[int, list[str]]) -> None:
    _W["cfg"], _W["root"], _W["slots"] = cfg, Path(tmp_root), nlvr2_slots


def _make_scene(job: tuple[int, str]) -> dict[str, Any]:
    """Draw, render and write one scene; return its description, texts and JPEG bytes."""
    image_id, split = job
    cfg: WorldConfig = _W["cfg"]
    root: Path = _W["root"]
    scene = sample_scene(_rng(cfg.seed, _S_SCENE, image_id), cfg)
    fm = set(cfg.formats)
    label_map = None
    if "ade20k" in fm:
        img, label_map = render_scene(scene, cfg, _rng(cfg.seed, _S_SCENE + 100, image_id), labels=True)
    else:
        img = render_scene(scene, cfg, _rng(cfg.seed, _S_SCENE + 100, image_id))
    jpg = _encode(img, "JPEG", cfg.jpeg_quality)
    label = scene_label(scene)
    first: Path | None = None  # the same JPEG is hard-linked into every layout that shows this image
    if fm & _COCO_IMAGE_FORMATS:
        first = _link_or_write(first, root / "coco" / _coco_folder(split) / _coco_name(split, image_id), jpg)
    if "flickr30k" in fm:
        first = _link_or_write(first, root / "flickr30k" / "flickr30k-images" / f"{image_id}.jpg", jpg)
    if "imagenet" in fm:
        first = _link_or_write(first, root / "imagenet" / split / label / f"{image_id:08d}.JPEG", jpg)
    if label_map is not None:
        ade, name = root / "ade20k", _ade_name(split, image_id)
        first = _link_or_write(first, ade / "images" / _ADE_FOLDERS[split] / f"{name}.jpg", jpg)
        _write(ade / "annotations" / _ADE_FOLDERS[split] / f"{name}.png",
               _encode(Image.fromarray(label_map, "L"), "PNG", 0))
    slots = _W["slots"].get(image_id, [])
    if slots:
        png = _encode(img, "PNG", 0)
        first_png: Path | None = None
        for rel in slots:
            first_png = _link_or_write(first_png, root / "nlvr2" / rel, png)
    captions = make_captions(scene, _rng(cfg.seed, _S_TEXT, image_id), cfg.captions_per_image)
    questions = make_questions(scene, _rng(cfg.seed, _S_QA, image_id), cfg.questions_per_image, cfg.answer_noise)
    instances = _instance_annotations(scene, cfg.image_size) if "coco_instances" in fm else []
    return {"id": image_id, "split": split, "scene": scene, "label": label, "captions": captions,
            "questions": questions, "jpg": jpg if "wds" in fm else b"", "instances": instances}


def _dump_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, sort_keys=True, separators=(",", ":")))


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _write_tar(job: tuple[str, list[tuple[str, dict[str, bytes]]]]) -> None:
    """Write one deterministic tar shard (fixed mtime/owner/mode), readable by the webdataset library."""
    path, samples = job
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))


def _corpus_chunk(job: tuple[int, int, int]) -> list[str]:
    """Text-only corpus lines for scenes ``start..stop`` of split number ``si`` (scenes that are never drawn)."""
    si, start, stop = job
    cfg: WorldConfig = _W["cfg"]
    lines: list[str] = []
    for j in range(start, stop):
        rng = _rng(cfg.seed, _S_CORPUS, si * 100_000_000 + j)
        lines.extend(make_captions(sample_scene(rng, cfg), rng, cfg.texts_per_image))
    return lines


def _write_file(job: tuple[str, bytes]) -> None:
    path, data = job
    _write(Path(path), data)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def generate_world(cfg: WorldConfig, out_dir: str | os.PathLike, *, overwrite: bool = False,
                   progress: bool = False) -> WorldSummary:
    """Generate the synthetic world into ``out_dir``.

    The folder is built under a temporary name next to ``out_dir`` and renamed at the end, so a crash never leaves a
    half-written world under the final name. Work is spread over ``cfg.workers`` processes; the output does not
    depend on their number.

    Args:
        cfg: world settings.
        out_dir: destination folder; must not exist or be empty unless ``overwrite``.
        overwrite: replace an existing folder.
        progress: show a tqdm progress bar.

    Returns:
        :class:`WorldSummary` with the counts of what was written.

    Raises:
        ValueError: on invalid settings, or if ``out_dir`` exists and is not empty without ``overwrite``.
    """
    cfg.validate()
    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"output folder {out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    fm = set(cfg.formats)
    sizes = cfg.split_sizes()
    split_names = ("train", "val", "test")
    splits: dict[str, tuple[int, int]] = {}
    first = 1
    for split in split_names:
        splits[split] = (first, first + sizes[split])  # image ids [start, stop)
        first += sizes[split]
    jobs = [(i, split) for split, (a, b) in splits.items() for i in range(a, b)]

    for split in split_names:
        if fm & _COCO_IMAGE_FORMATS:
            (tmp / "coco" / _coco_folder(split)).mkdir(parents=True, exist_ok=True)
        if "coco_instances" in fm:
            (tmp / "coco" / "annotations").mkdir(parents=True, exist_ok=True)
        if "ade20k" in fm:
            for sub in ("images", "annotations"):
                (tmp / "ade20k" / sub / _ADE_FOLDERS[split]).mkdir(parents=True, exist_ok=True)
        if "imagenet" in fm:
            for name in class_names():
                (tmp / "imagenet" / split / name).mkdir(parents=True, exist_ok=True)
    if "flickr30k" in fm:
        (tmp / "flickr30k" / "flickr30k-images").mkdir(parents=True, exist_ok=True)

    # NLVR2 pairs are chosen before drawing so that the workers can write the image files
    nlvr2_pairs: dict[str, list[tuple[int, int]]] = {}
    slots: dict[int, list[str]] = {}
    if "nlvr2" in fm:
        for si, (split, (a, b)) in enumerate(splits.items()):
            n_ex = int(round((b - a) * cfg.nlvr2_per_image)) if b - a >= 2 else 0
            rng = _rng(cfg.seed, _S_PAIRS, si)
            pairs = []
            for k in range(n_ex):
                left, right = rng.choice(b - a, 2, replace=False) + a
                pairs.append((int(left), int(right)))
                for side, img_id in ((0, int(left)), (1, int(right))):
                    rel = _nlvr2_image_relpath(split, k, side)
                    slots.setdefault(img_id, []).append(rel)
            nlvr2_pairs[split] = pairs
        for rels in slots.values():
            for rel in rels:
                (tmp / "nlvr2" / rel).parent.mkdir(parents=True, exist_ok=True)

    workers = cfg.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(jobs) // 100 or 1))
    _init_worker(cfg, str(tmp), slots)
    pool = None
    if workers > 1:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(cfg, str(tmp), slots))

    def run(fn, items: list, chunk: int = 1):
        if pool is None:
            return map(fn, items)
        return pool.imap(fn, items, chunksize=chunk)

    try:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(jobs), desc="drawing scenes", unit="img")
        results: list[dict[str, Any]] = []
        chunk = max(1, min(128, len(jobs) // (workers * 8) or 1))
        for res in run(_make_scene, jobs, chunk):
            results.append(res)
            if bar:
                bar.update(1)
        if bar:
            bar.close()

        # text-only corpus (in parallel: chunks of scenes that are never drawn)
        texts: dict[str, list[str]] = {}
        if fm & {"text", "wds"}:
            corpus_jobs = [(si, j, min(j + 500, sizes[s])) for si, s in enumerate(split_names)
                           for j in range(0, sizes[s], 500)]
            for s in split_names:
                texts[s] = []
            for (si, _, _), lines in zip(corpus_jobs, run(_corpus_chunk, corpus_jobs)):
                texts[split_names[si]].extend(lines)

        files: list[tuple[str, bytes]] = []  # (path, bytes) written by the pool at the end
        tars: list[tuple[str, list]] = []
        by_id = {r["id"]: r for r in results}
        counts: dict[str, Any] = {"images": dict(sizes)}
        paths = world_paths(tmp)

        if fm & {"coco", "flickr30k"}:
            for fmt in ("coco", "flickr30k"):
                if fmt not in fm:
                    continue
                images, sentid = [], 0
                for r in results:
                    sents = []
                    for c in r["captions"]:
                        sents.append({"tokens": _tokens(c), "raw": c, "imgid": r["id"] - 1, "sentid": sentid})
                        sentid += 1
                    entry: dict[str, Any] = {"split": r["split"], "imgid": r["id"] - 1,
                                             "sentids": [x["sentid"] for x in sents], "sentences": sents}
                    if fmt == "coco":
                        entry.update(filepath=_coco_folder(r["split"]), filename=_coco_name(r["split"], r["id"]),
                                     cocoid=r["id"])
                    else:
                        entry.update(filename=f"{r['id']}.jpg")
                    images.append(entry)
                key = "coco_karpathy" if fmt == "coco" else "flickr30k_karpathy"
                files.append((str(paths[key]), _json_bytes({"images": images, "dataset": fmt})))
            if "coco" in fm:
                paths["coco_gt_train"].parent.mkdir(parents=True, exist_ok=True)
                for split in split_names:
                    rs = [r for r in results if r["split"] == split]
                    ann, aid = [], 1
                    for r in rs:
                        for c in r["captions"]:
                            ann.append({"image_id": r["id"], "id": aid, "caption": c})
                            aid += 1
                    gt = {
                        "info": {"description": f"imglish synthetic world, Karpathy {split} split"},
                        "licenses": [],
                        "type": "captions",
                        "images": [{"id": r["id"], "file_name": f"{_coco_folder(split)}/{_coco_name(split, r['id'])}",
                                    "width": cfg.image_size, "height": cfg.image_size} for r in rs],
                        "annotations": ann,
                    }
                    files.append((str(paths[f"coco_gt_{split}"]), _json_bytes(gt)))
            counts["captions"] = {s: sum(len(r["captions"]) for r in results if r["split"] == s) for s in sizes}

        # VQAv2: questions + annotations; train2014 holds the train split, val2014 the val and test splits
        if "vqav2" in fm:
            (tmp / "vqav2").mkdir(parents=True, exist_ok=True)
            q_counts = {}
            for subtype, split_set in (("train2014", {"train"}), ("val2014", {"val", "test"})):
                qs, anns = [], []
                for r in results:
                    if r["split"] not in split_set:
                        continue
                    for j, q in enumerate(r["questions"]):
                        qid = r["id"] * 1000 + j
                        qs.append({"image_id": r["id"], "question": q["question"][0].upper() + q["question"][1:],
                                   "question_id": qid})
                        mc = Counter(q["answers"]).most_common(1)[0][0]
                        anns.append({
                            "question_id": qid, "image_id": r["id"], "question_type": q["question_type"],
                            "answer_type": q["answer_type"], "multiple_choice_answer": mc,
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                        for k, a in enumerate(q["answers"])],
                        })
                head = {"info": {"description": "imglish synthetic world"}, "license": {}, "data_subtype": subtype}
                files.append((str(tmp / "vqav2" / f"v2_OpenEnded_mscoco_{subtype}_questions.json"),
                              _json_bytes({**head, "task_type": "Open-Ended", "data_type": "mscoco", "questions": qs})))
                files.append((str(tmp / "vqav2" / f"v2_mscoco_{subtype}_annotations.json"),
                              _json_bytes({**head, "data_type": "mscoco", "annotations": anns})))
                q_counts[subtype] = len(qs)
            counts["vqav2_questions"] = q_counts

        # NLVR2 JSON lines
        if "nlvr2" in fm:
            (tmp / "nlvr2").mkdir(parents=True, exist_ok=True)
            nl_counts = {}
            for si, (split, pairs) in enumerate(nlvr2_pairs.items()):
                lines, n_true = [], 0
                for k, (li, ri) in enumerate(pairs):
                    sent, label = make_nlvr2_statement(by_id[li]["scene"], by_id[ri]["scene"],
                                                       _rng(cfg.seed, _S_NLVR2, si * 100_000_000 + k))
                    n_true += int(label)
                    rec = {"identifier": f"{_nlvr2_prefix(split, k)}-0", "sentence": sent,
                           "label": "True" if label else "False", "left_image_id": li, "right_image_id": ri}
                    if split == "train":
                        rec["directory"] = str(k % 100)
                    lines.append(json.dumps(rec, sort_keys=True))
                files.append((str(tmp / "nlvr2" / _NLVR2_FILES[split]), "".join(x + "\n" for x in lines).encode()))
                nl_counts[split] = {"examples": len(pairs), "true": n_true}
            counts["nlvr2"] = nl_counts

        if "text" in fm:
            (tmp / "text").mkdir(parents=True, exist_ok=True)
            for split, lines in texts.items():
                files.append((str(paths[f"text_{split}"]), "".join(t + "\n" for t in lines).encode()))
        if texts:
            counts["text_lines"] = {s: len(v) for s, v in texts.items()}
        if "imagenet" in fm:
            counts["classes"] = len(class_names())

        # dense prediction: ADE20K class list, COCO instances per split
        if "ade20k" in fm:
            files.append((str(paths["ade20k_root"] / "classes.json"), json.dumps(list(ADE_CLASSES)).encode()))
            counts["ade20k"] = dict(sizes)
        if "coco_instances" in fm:
            categories = [{"id": k + 1, "name": name, "supercategory": "shape"}
                          for k, name in enumerate(_SHAPES)]
            inst_counts = {}
            for split in split_names:
                rs = [r for r in results if r["split"] == split]
                anns = [{**a, "id": n + 1, "image_id": r["id"]}
                        for n, (r, a) in enumerate((r, a) for r in rs for a in r["instances"])]
                doc = {
                    "info": {"description": f"imglish synthetic world, instances of the {split} split"},
                    "licenses": [],
                    "images": [{"id": r["id"], "width": cfg.image_size, "height": cfg.image_size,
                                "file_name": f"{_coco_folder(split)}/{_coco_name(split, r['id'])}"}
                               for r in rs],
                    "categories": categories,
                    "annotations": anns,
                }
                files.append((str(paths[f"coco_instances_{split}"]), _json_bytes(doc)))
                inst_counts[split] = len(anns)
            counts["coco_instances"] = inst_counts

        # webdataset shards: pairs (jpg, txt, json), images (jpg, cls), texts (txt)
        if "wds" in fm:
            wd = tmp / "wds"
            wd.mkdir(parents=True, exist_ok=True)
            names = class_names()
            n_shards: dict[str, int] = {}
            for split in split_names:
                rs = [r for r in results if r["split"] == split]
                pair_samples = [(f"{r['id']:08d}", {
                    "jpg": r["jpg"], "txt": r["captions"][0].encode(),
                    "json": _json_bytes({"image_id": r["id"], "captions": r["captions"]})}) for r in rs]
                img_samples = [(f"{r['id']:08d}", {"jpg": r["jpg"], "cls": str(names.index(r["label"])).encode()})
                               for r in rs]
                per = cfg.texts_per_image  # one text sample = the lines written about one unrendered scene
                lines = texts[split]
                txt_samples = [(f"{j:09d}", {"txt": "\n".join(lines[j * per : (j + 1) * per]).encode()})
                               for j in range(len(lines) // per)]
                n = 0
                for kind, samples in (("pairs", pair_samples), ("images", img_samples), ("text", txt_samples)):
                    for k, start in enumerate(range(0, len(samples), cfg.shard_size)):
                        tars.append((str(wd / f"{kind}-{split}-{k:06d}.tar"), samples[start : start + cfg.shard_size]))
                        n += 1
                n_shards[split] = n
            counts["wds_shards"] = n_shards

        world = {
            "format": WORLD_FORMAT,
            "config": {**dataclasses.asdict(cfg), "formats": list(cfg.formats), "workers": None},
            "splits": {s: {"first_id": a, "stop_id": b} for s, (a, b) in splits.items()},
            "classes": class_names(),
            "vocabularies": {"colors": list(_COLORS), "shapes": list(_SHAPES), "backgrounds": list(_BACKGROUNDS)},
            "counts": counts,
        }
        files.append((str(tmp / "world.json"), json.dumps(world, sort_keys=True, indent=1).encode()))
        for _ in run(_write_tar, tars):
            pass
        for _ in run(_write_file, files):
            pass
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return WorldSummary(root=out, counts=counts, seconds=time.perf_counter() - t0)
