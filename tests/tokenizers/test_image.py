"""load_image: every mode to RGB correctly, EXIF orientation, bomb guard, clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from imglish.tokenizers.image import ImageLoadError, find_images, load_image


def _save(img: Image.Image, path, fmt: str = "PNG", **kw) -> str:
    img.save(path, format=fmt, **kw)
    return str(path)


def test_rgb_png_round_trips_exactly(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (12, 9, 3), dtype=np.uint8)
    out = load_image(_save(Image.fromarray(arr), tmp_path / "x.png"))
    assert out.mode == "RGB" and out.size == (9, 12)
    assert np.array_equal(np.asarray(out), arr)


@pytest.mark.parametrize("fmt,suffix", [("JPEG", "jpg"), ("BMP", "bmp"), ("GIF", "gif"), ("WEBP", "webp"),
                                        ("TIFF", "tif"), ("PPM", "ppm")])
def test_common_formats(tmp_path, fmt, suffix):
    img = Image.new("RGB", (16, 10), (200, 30, 40))
    out = load_image(_save(img, tmp_path / f"x.{suffix}", fmt))
    assert out.mode == "RGB" and out.size == (16, 10)
    assert np.abs(np.asarray(out).astype(int) - [200, 30, 40]).max() <= 12  # lossy formats: close


def test_alpha_is_composited_not_dropped(tmp_path):
    # Fully transparent red over white must come out white; half-transparent black must come out grey.
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[0, 0] = (255, 0, 0, 0)
    arr[0, 1] = (0, 0, 0, 128)
    arr[1, :] = (10, 20, 30, 255)
    out = np.asarray(load_image(_save(Image.fromarray(arr, "RGBA"), tmp_path / "a.png")))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in out[0, 1])
    assert out[1, 0].tolist() == [10, 20, 30]
    black_bg = np.asarray(load_image(tmp_path / "a.png", background=(0, 0, 0)))
    assert black_bg[0, 0].tolist() == [0, 0, 0]


def test_la_and_palette_transparency(tmp_path):
    la = Image.fromarray(np.array([[[50, 0], [50, 255]]], dtype=np.uint8), "LA")
    out = np.asarray(load_image(_save(la, tmp_path / "la.png")))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [50, 50, 50]

    p = Image.new("P", (2, 1))
    p.putpalette([0, 255, 0, 0, 0, 255] + [0] * 762)
    p.putdata([0, 1])
    p.info["transparency"] = 0  # palette index 0 (green) is transparent
    path = _save(p, tmp_path / "p.png", transparency=0)
    assert Image.open(path).mode == "P"
    out = np.asarray(load_image(path))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 0, 255]

    gif = _save(p, tmp_path / "p.gif", "GIF", transparency=0)
    assert np.asarray(load_image(gif))[0, 0].tolist() == [255, 255, 255]


def test_bilevel_greyscale_and_cmyk(tmp_path):
    one = Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")
    assert np.asarray(load_image(_save(one, tmp_path / "b.png"))).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    grey = Image.fromarray(np.array([[7, 200]], dtype=np.uint8), "L")
    assert np.asarray(load_image(_save(grey, tmp_path / "g.png"))).tolist() == [[[7, 7, 7], [200, 200, 200]]]
    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(load_image(_save(cmyk, tmp_path / "c.jpg", "JPEG", quality=100)))
    assert out[1, 1, 0] > 230 and out[1, 1, 1] < 25 and out[1, 1, 2] < 25


def test_sixteen_bit_and_float_are_rescaled_not_clipped(tmp_path):
    arr16 = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    img16 = Image.fromarray(arr16)
    path = _save(img16, tmp_path / "d.png")
    assert Image.open(path).mode.startswith("I")
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 100, 255]

    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    path = _save(f, tmp_path / "f.tif", "TIFF")
    assert Image.open(path).mode == "F"
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 128, 255]
    f255 = Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32), "F")
    assert np.asarray(load_image(_save(f255, tmp_path / "g.tif", "TIFF")))[0, :, 0].tolist() == [0, 100, 255]


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((4, 8, 3), dtype=np.uint8)  # wide image, left half red
    arr[:, :4] = (255, 0, 0)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(img, tmp_path / "o.jpg", "JPEG", exif=exif, quality=100)
    out = load_image(path)
    assert out.size == (4, 8)  # now tall
    top = np.asarray(out)[0].mean(axis=0)
    assert top[0] > 200  # after a clockwise turn the red left half is on top


def test_errors_name_the_file_and_cause(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageLoadError, match=r"nope\.png.*no such file"):
        load_image(missing)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty\.jpg.*empty"):
        load_image(empty)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(ImageLoadError, match=r"notes\.png.*not an image"):
        load_image(text)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match=r"cut\.png.*truncated"):
        load_image(truncated)
    jbuf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jbuf, "JPEG")
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(jbuf.getvalue()[:400], name="cut.jpg")
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


def test_bytes_and_streams(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (5, 4), (9, 8, 7)).save(buf, format="PNG")
    assert load_image(buf.getvalue()).size == (5, 4)
    buf.seek(0)
    assert load_image(buf).getpixel((0, 0)) == (9, 8, 7)


def test_decompression_bomb_guard_stays_on(tmp_path, monkeypatch):
    path = _save(Image.new("L", (64, 64)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2 x limit: Pillow refuses
    with pytest.raises(ImageLoadError, match=r"big\.png.*decompression bomb"):
        load_image(path)


def test_refuses_to_run_with_truncated_loading_enabled(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (4, 4)), tmp_path / "ok.png")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageLoadError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(path)


def test_find_images_is_recursive_and_sorted(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for rel in ("z.PNG", "a/b/x.jpg", "a/y.webp", "a/readme.txt"):
        (tmp_path / rel).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a/b/x.jpg", "a/y.webp", "z.PNG"]
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        find_images(tmp_path / "empty_dir")
