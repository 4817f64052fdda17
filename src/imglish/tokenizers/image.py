"""The one image loader of imglish: any file Pillow reads, returned as an RGB ``PIL.Image``.

Every data path (datasets, the visual tokenizer, inference) opens images through :func:`load_image`, so that
all of them agree on how odd files are handled:

* every Pillow mode is converted to RGB *correctly*: 16-bit and float greyscale are rescaled rather than
  clipped, and an alpha channel (``RGBA``, ``LA``, ``PA``, palette or greyscale images with a ``transparency``
  entry) is composited over a background colour instead of being dropped;
* the EXIF orientation tag is applied, so photos from phones come out upright;
* Pillow's decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``) is left on;
* missing, empty, truncated and non-image files raise :class:`ImageLoadError`, one exception type whose
  message names the file and the cause.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = ["ImageLoadError", "ImageSource", "load_image", "to_rgb", "IMAGE_EXTENSIONS", "find_images"]

ImageSource = Union[str, os.PathLike, bytes, bytearray, BinaryIO]

#: File name extensions treated as images when a folder is searched (lower case, with the dot).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm",
)

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class ImageLoadError(Exception):
    """An image could not be read: the file is missing, empty, truncated, not an image, or too large.

    The message always names the file (or ``<bytes>`` for in-memory data) and the cause.
    """


def _describe(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray)):
        return "<bytes>"
    return str(getattr(source, "name", "<stream>"))


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """Rescale 16/32-bit integer or float greyscale to 8-bit ``L``.

    ``I;16*`` modes span 0..65535 and are divided by 257. ``I`` (32-bit int) is taken as 8-bit when its values
    fit in 0..255 and as 16-bit otherwise. ``F`` (float) is taken as [0, 1] when its values fit there and as
    [0, 255] otherwise (values outside are clipped). Pillow's own ``convert("L")`` clips instead of rescaling,
    which turns most 16-bit images white.
    """
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        out = arr.astype(np.float64) / 257.0
    elif img.mode == "I":
        arr = arr.astype(np.float64)
        out = arr if (arr.size == 0 or (arr.min() >= 0 and arr.max() <= 255)) else arr / 257.0
    else:  # "F"
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        out = arr * 255.0 if (arr.size == 0 or (arr.min() >= 0.0 and arr.max() <= 1.0)) else arr
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert a decoded image of any mode to RGB.

    Args:
        img: a loaded ``PIL.Image`` of any mode.
        background: the colour transparent pixels are composited over.

    Returns:
        A new RGB image of the same size (or ``img`` itself when it is already RGB without transparency).
    """
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        img = _high_depth_to_l(img)
        mode = "L"
    has_alpha = mode in _ALPHA_MODES or "transparency" in img.info
    if has_alpha:
        with warnings.catch_warnings():
            # Pillow warns that palette images with transparency bytes should be converted to RGBA: we do.
            warnings.simplefilter("ignore", UserWarning)
            rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode == "RGB":
        return img
    return img.convert("RGB")


def load_image(
    source: ImageSource,
    *,
    background: tuple[int, int, int] = (255, 255, 255),
    name: str | None = None,
) -> Image.Image:
    """Open an image file (or bytes) and return it upright in RGB.

    Args:
        source: a path, raw encoded bytes, or a binary file object.
        background: colour for transparent pixels (alpha is composited over it, never dropped).
        name: how to name the source in error messages (defaults to the path, or ``<bytes>``).

    Returns:
        A fully decoded ``PIL.Image.Image`` in mode ``RGB``; for animated files, the first frame.

    Raises:
        ImageLoadError: the file is missing, empty, not an image, truncated or corrupt, or larger than
            Pillow's decompression-bomb limit. The message names the file and the cause.
    """
    label = _describe(source, name)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            cause = "is a directory, not an image file" if path.is_dir() else "no such file"
            raise ImageLoadError(f"cannot load image {label!s}: {cause}")
        if path.stat().st_size == 0:
            raise ImageLoadError(f"cannot load image {label!s}: the file is empty (0 bytes)")
        fp: str | BinaryIO = os.fspath(path)
    elif isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise ImageLoadError(f"cannot load image {label!s}: the data is empty (0 bytes)")
        fp = io.BytesIO(bytes(source))
    else:
        fp = source
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone switched Pillow to silently pad truncated files with grey; we refuse to train on those.
        raise ImageLoadError(
            f"cannot load image {label!s}: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; "
            "imglish requires it to be False so truncated files are detected"
        )
    try:
        with Image.open(fp) as opened:
            opened.load()
            img = ImageOps.exif_transpose(opened)
            if img is opened:
                img = opened.copy()
            img.load()
    except Image.DecompressionBombError as err:
        raise ImageLoadError(f"cannot load image {label!s}: decompression bomb guard: {err}") from err
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"cannot load image {label!s}: not an image format Pillow can identify") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated") or SyntaxError.
        raise ImageLoadError(f"cannot load image {label!s}: truncated or corrupt image data ({err})") from err
    try:
        return to_rgb(img, background)
    except (OSError, ValueError) as err:
        raise ImageLoadError(f"cannot load image {label!s}: cannot convert mode {img.mode} to RGB ({err})") from err


def find_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under ``root`` (searched recursively), sorted by path.

    Args:
        root: a folder, or a single image file.

    Returns:
        Sorted paths whose extension is in :data:`IMAGE_EXTENSIONS` (case-insensitive).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no image files were found.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if root.is_file():
        files = [root]
    else:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return files
