"""Peak resident memory of a `classify` pipeline: the full model against the vision-only one it now builds.

Writes a base image classifier with random weights (memory does not depend on the values) to a temporary folder,
then, in a fresh process per row, builds a pipeline from it, classifies 4 images and reports `ru_maxrss` (which
includes reading the file). "full" builds the model with both modalities and wraps it in the same pipeline class.

    python benchmarks/pipeline_memory.py
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _probe(checkpoint: str, kind: str, precision: str) -> None:
    import numpy as np
    from PIL import Image

    import imglish
    from imglish.inference import pipeline
    from imglish.inference.pipeline import ClassifyPipeline

    if kind == "full":
        net, proc = imglish.create_model_and_processor(None, checkpoint)
        pipe = ClassifyPipeline(net, proc, device="cpu", precision=precision)
    else:
        pipe = pipeline("classify", checkpoint, device="cpu", precision=precision)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8))
    pipe([image] * 4)
    params = sum(p.numel() for p in pipe.model.parameters())
    print(f"{params / 1e6:.1f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="beit3_base_patch16_224_imageclassification")
    p.add_argument("--probe", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        _probe(*args.probe)
        return
    import imglish
    from imglish.model import save_model
    from imglish.tokenizers.processor import Processor
    from imglish.tokenizers.transforms import TransformConfig

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(Path(tmp) / "model.safetensors")
        model = imglish.create_model(args.model)
        size = model.config.img_size[0]
        save_model(model, checkpoint, processor=Processor(None, TransformConfig.for_task("imagenet", size), 64))
        del model
        print("| model | precision | parameters | peak RSS (MiB) |\n|---|---|---|---|")
        for kind in ("full", "vision-only"):
            for precision in ("fp32", "bf16"):
                out = subprocess.run([sys.executable, __file__, "--probe", checkpoint, kind, precision],
                                     check=True, capture_output=True, text=True).stdout.split()
                print(f"| {kind} | {precision} | {out[-2]} M | {out[-1]} |", flush=True)


if __name__ == "__main__":
    main()
