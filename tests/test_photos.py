"""gqtok.photos: the one conversion of decoded images to uint8 RGB, and photo lists."""

import io

import numpy as np
import pytest
from PIL import Image

from gqtok.photos import ALPHA_BACKGROUND, TransparentImage, load_rgb, to_rgb


def reopen(im: Image.Image, fmt: str = "PNG", **save) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return Image.open(io.BytesIO(buf.getvalue()))


def rgb8(seed=0, shape=(24, 40)):
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_16_bit_grayscale_is_scaled_not_clipped():
    gray8 = rgb8()[..., 0]
    im = reopen(Image.fromarray(gray8.astype(np.uint16) * 257))  # 0..65535, as a 16-bit PNG holds it
    assert im.mode.startswith("I")
    out = to_rgb(im)
    assert out.dtype == np.uint8 and np.array_equal(out, np.repeat(gray8[..., None], 3, axis=2))


def test_float_grayscale_in_unit_range():
    values = np.linspace(0, 1, 24 * 40, dtype=np.float32).reshape(24, 40)
    out = to_rgb(Image.fromarray(values, mode="F"))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255 and np.all(np.diff(out[..., 0].ravel().astype(int)) >= 0)


@pytest.mark.parametrize("orientation,turn", [(3, lambda a: a[::-1, ::-1]), (6, lambda a: np.rot90(a, -1)),
                                              (8, lambda a: np.rot90(a, 1))])
def test_exif_orientation_is_applied(orientation, turn):
    """A phone photo stored sideways with an orientation tag comes out as it is displayed."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    im = reopen(Image.fromarray(rgb8()), "JPEG", quality=95, exif=exif.tobytes())
    stored = np.asarray(reopen(Image.fromarray(rgb8()), "JPEG", quality=95).convert("RGB"))
    out = to_rgb(im)
    assert np.array_equal(out, turn(stored))
    assert out.shape[:2] == ((40, 24) if orientation in (6, 8) else (24, 40))


def test_alpha_is_composited_on_white_or_refused():
    rgb = rgb8()
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[:, 20:] = 255
    alpha[:, 10:20] = 128
    im = reopen(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))
    out = to_rgb(im)
    assert np.array_equal(out[:, 20:], rgb[:, 20:])  # opaque: as it is
    assert np.all(out[:, :10] == ALPHA_BACKGROUND)  # transparent: the background
    half = np.round(rgb[:, 10:20] * (128 / 255) + 255 * (1 - 128 / 255)).astype(np.uint8)
    assert np.array_equal(out[:, 10:20], half)
    with pytest.raises(TransparentImage, match="transparent pixels"):
        to_rgb(im, alpha="refuse")
    opaque = reopen(Image.fromarray(np.dstack([rgb, np.full_like(alpha, 255)]), "RGBA"))
    assert np.array_equal(to_rgb(opaque, alpha="refuse"), rgb)  # an opaque RGBA image is fine either way


def test_palette_transparency_grayscale_and_cmyk():
    pal = Image.fromarray(rgb8()).quantize(16)
    pal.info["transparency"] = 0
    out = to_rgb(reopen(pal))
    index = np.asarray(pal)
    assert np.all(out[index == 0] == ALPHA_BACKGROUND)
    gray = rgb8()[..., 0]
    assert np.array_equal(to_rgb(Image.fromarray(gray)), np.repeat(gray[..., None], 3, axis=2))
    cmyk = Image.fromarray(rgb8()).convert("CMYK")
    assert to_rgb(cmyk).shape == (24, 40, 3)
    with pytest.raises(ValueError, match="alpha must be"):
        to_rgb(cmyk, alpha="drop")


def test_load_rgb_reads_files_through_the_same_conversion(tmp_path):
    gray8 = rgb8()[..., 0]
    Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    assert np.array_equal(load_rgb(tmp_path / "deep.png")[..., 1], gray8)
