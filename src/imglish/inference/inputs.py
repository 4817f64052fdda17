"""Inputs of the inference paths (pipelines, ``imglish predict``, ``imglish embed``, the server) as RGB images.

One function, :func:`to_image`, takes what people hand a model: a path, encoded bytes, a ``PIL.Image``, a numpy
array (``H×W``, ``H×W×C`` with 1, 3 or 4 channels; ``uint8`` or floats in ``[0, 1]``) or a torch tensor (``C×H×W``,
``uint8`` or floats in ``[0, 1]``). Files go through the shared loader (:func:`imglish.tokenizers.load_image`), so a
missing, empty, truncated or non-image file fails the same way everywhere. An optional pixel limit is checked from
the file header before anything is decoded (the server's guard against decompression bombs).

Every failure is an :class:`InputError` (a ``ValueError``): its message names the input and what was expected.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imglish.tokenizers.image import ImageLoadError, load_image, to_rgb

__all__ = ["ImageTooLarge", "InputError", "describe", "to_image"]


class InputError(ValueError):
    """An input of an inference call cannot be used; the message names it and says what was expected."""


def describe(item: Any) -> str:
    """A short name for an input in messages: the path, ``<bytes>``, ``<PIL image 640x480>``, ``<array (H, W, 3)>``."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    if isinstance(item, (bytes, bytearray)):
        return f"<{len(item)} bytes>"
    if isinstance(item, Image.Image):
        return f"<PIL image {item.width}x{item.height}>"
    shape = getattr(item, "shape", None)
    if shape is not None:
        return f"<{type(item).__name__} {tuple(shape)}>"
    return f"<{type(item).__name__}>"


class ImageTooLarge(InputError):
    """An image with more pixels than ``max_pixels`` (found from its header, before decoding)."""


def _check_pixels(width: int, height: int, max_pixels: int | None, name: str) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(
            f"image {name} is {width}x{height} = {width * height} pixels; at most {max_pixels} are accepted"
        )


def _header_size(source: Any, max_pixels: int, name: str) -> tuple[int, int] | None:
    """``(width, height)`` from the file header (nothing decoded), or None when Pillow cannot identify it; raises
    :class:`ImageTooLarge` for a header past Pillow's own decompression-bomb limit."""
    fp = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source
    try:
        with Image.open(fp) as im:
            return im.size
    except Image.DecompressionBombError as err:  # Pillow refuses to open it at all: far over any sane limit
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{found.group(1)} pixels" if found else "more pixels than Pillow opens"
        raise ImageTooLarge(f"image {name} is {size}; at most {max_pixels} are accepted") from None
    except Exception:  # the loader reports the real cause
        return None


def _from_array(arr: np.ndarray, name: str) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise InputError(
            f"image {name}: an array must be H×W or H×W×C with C in 1, 3, 4 (a tensor C×H×W), got shape "
            f"{tuple(arr.shape)}"
        )
    if arr.size == 0:
        raise InputError(f"image {name} is empty (shape {tuple(arr.shape)})")
    if arr.dtype == np.uint8:
        out = arr
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InputError(f"image {name} has NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise InputError(
                f"image {name}: a float array must hold values in [0, 1], got [{lo:.3g}, {hi:.3g}] (pass uint8 for "
                "0..255)"
            )
        out = np.rint(arr * 255.0).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise InputError(f"image {name}: integer values must lie in 0..255, got {lo}..{hi}")
        out = arr.astype(np.uint8)
    else:
        raise InputError(f"image {name}: unsupported array dtype {arr.dtype}")
    mode = "L" if out.ndim == 2 else ("RGB" if out.shape[-1] == 3 else "RGBA")
    return to_rgb(Image.fromarray(np.ascontiguousarray(out), mode=mode))


def to_image(item: Any, *, max_pixels: int | None = None, name: str | None = None) -> Image.Image:
    """One input as an RGB ``PIL.Image``.

    Args:
        item: a path, encoded bytes, a PIL image, a numpy array or a torch tensor (see the module docstring).
        max_pixels: refuse images with more pixels than this (checked from the header before decoding).
        name: how to name the input in messages (default: :func:`describe`).

    Raises:
        InputError: naming the input and what was expected.
    """
    label = name or describe(item)
    if isinstance(item, (str, os.PathLike, bytes, bytearray)):
        if isinstance(item, (str, os.PathLike)) and not Path(item).is_file():
            cause = "is a directory, not an image file" if Path(item).is_dir() else "no such file"
            raise InputError(f"image {label}: {cause}")
        if max_pixels is not None:
            size = _header_size(item, max_pixels, label)
            if size is not None:
                _check_pixels(*size, max_pixels, label)
        try:
            return load_image(item, name=label)
        except ImageLoadError as err:
            raise InputError(str(err)) from None
    if isinstance(item, Image.Image):
        _check_pixels(item.width, item.height, max_pixels, label)
        try:
            return to_rgb(item)
        except (OSError, ValueError) as err:
            raise InputError(f"image {label}: cannot convert mode {item.mode} to RGB ({err})") from None
    try:
        import torch

        if isinstance(item, torch.Tensor):
            t = item.detach().cpu()
            if t.ndim == 3 and t.shape[0] in (1, 3, 4):
                t = t.permute(1, 2, 0)
            elif t.ndim != 2:
                raise InputError(f"image {label}: a tensor must be C×H×W with C in 1, 3, 4 (or H×W), got shape "
                                 f"{tuple(item.shape)}")
            arr = t.float().numpy() if t.is_floating_point() else t.numpy()
            img = _from_array(arr, label)
            _check_pixels(img.width, img.height, max_pixels, label)
            return img
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(item, np.ndarray):
        h, w = item.shape[:2] if item.ndim >= 2 else (0, 0)
        _check_pixels(w, h, max_pixels, label)
        return _from_array(item, label)
    raise InputError(
        f"image {label}: expected a path, bytes, a PIL image, a numpy array or a torch tensor, got "
        f"{type(item).__name__}"
    )
