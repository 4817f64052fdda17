"""Read every dataset of a world folder with the imglish readers and report records and skipped records."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from imglish.data.ade20k import ADE20KDataset
from imglish.data.coco import KarpathyCaptions
from imglish.data.coco_instances import CocoInstancesDataset
from imglish.data.flickr import Flickr30kCaptions
from imglish.data.imagenet import ImageFolderDataset
from imglish.data.nlvr2 import NLVR2Dataset
from imglish.data.skip import BadRecordCounter, SkippedRecord
from imglish.data.synthetic import world_paths
from imglish.data.text import TextCorpus
from imglish.data.vqav2 import VQAv2Dataset, build_answer_vocab
from imglish.data.wds import WdsStream

__all__ = ["check_world"]


def check_world(root: str | os.PathLike, *, strict: bool = False, load_images: bool = True) -> dict[str, Any]:
    """Open each dataset found under ``root`` (a folder in the layout of ``imglish data shapes``) and read every item.

    Args:
        root: world folder.
        strict: raise :class:`~imglish.data.skip.BadRecordError` on the first bad record instead of counting.
        load_images: also read every item (decoding images); False only builds the indexes.

    Returns:
        ``{dataset name: {"records": n, "skipped": {reason: n}}}`` for the datasets present.
    """
    p = world_paths(root)
    report: dict[str, Any] = {}

    def run(name: str, ds: Any) -> None:
        n = 0
        if load_images:
            items = iter(ds) if not hasattr(ds, "__len__") else (ds[i] for i in range(len(ds)))
            for rec in items:
                if isinstance(rec, SkippedRecord):
                    ds.skip.absorb([rec])
                else:
                    n += 1
        else:
            n = len(ds)
        report[name] = {"records": n, "skipped": ds.skip.counts}

    def counter() -> BadRecordCounter:
        return BadRecordCounter(strict=strict)

    for split in ("train", "val", "test"):
        if p["coco_karpathy"].is_file():
            run(f"coco_{split}", KarpathyCaptions(p["coco_karpathy"], splits=[split], skip=counter()))
        if p["flickr30k_karpathy"].is_file():
            run(f"flickr30k_{split}", Flickr30kCaptions(p["flickr30k_karpathy"], splits=[split], skip=counter()))
        if p[f"imagenet_{split}"].is_dir():
            classes = sorted(d.name for d in p["imagenet_train"].iterdir() if d.is_dir())
            run(f"imagenet_{split}", ImageFolderDataset(p[f"imagenet_{split}"], classes=classes, skip=counter()))
        if p[f"text_{split}"].is_file():
            run(f"text_{split}", TextCorpus(p[f"text_{split}"], skip=counter()))
        folder = {"train": "training", "val": "validation", "test": "testing"}[split]
        if (p["ade20k_root"] / "images" / folder).is_dir():
            run(f"ade20k_{split}", ADE20KDataset(p["ade20k_root"], folder, skip=counter(), num_classes=6))
        if p[f"coco_instances_{split}"].is_file():
            try:  # masks need pycocotools (the eval extra); boxes alone do not
                import pycocotools.mask  # noqa: F401

                masks = True
            except ImportError:
                masks = False
            run(f"coco_instances_{split}", CocoInstancesDataset(p[f"coco_instances_{split}"], p["coco_root"],
                                                                skip=counter(), skip_empty=False, with_masks=masks))
    vq = p["vqav2_dir"]
    if (vq / "v2_mscoco_train2014_annotations.json").is_file():
        vocab = build_answer_vocab([vq / "v2_mscoco_train2014_annotations.json"])
        for sub in ("train2014", "val2014"):
            run(f"vqav2_{sub}", VQAv2Dataset(vq / f"v2_OpenEnded_mscoco_{sub}_questions.json",
                                             vq / f"v2_mscoco_{sub}_annotations.json", p["coco_root"], vocab,
                                             drop_unanswerable=(sub == "train2014"), skip=counter()))
    for fname in ("train.json", "dev.json", "test1.json"):
        if (p["nlvr2_dir"] / fname).is_file():
            run(f"nlvr2_{Path(fname).stem}", NLVR2Dataset(p["nlvr2_dir"] / fname, skip=counter()))
    if p["wds_dir"].is_dir():
        for kind, stem in (("pairs", "pairs"), ("images", "images"), ("texts", "text")):
            shards = sorted(p["wds_dir"].glob(f"{stem}-*.tar"))
            if shards:
                run(f"wds_{kind}", WdsStream([str(s) for s in shards], kind, skip=counter(), split_by_node=False))
    return report
