"""Image bytes <-> uint8 arrays for the service, with the checks that keep bad input out.

The pixel count is checked from the header, before any pixel is decoded, so a
decompression bomb costs nothing. Only PNG, JPEG and WebP are accepted.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from gqtok.core import layout
from gqtok.photos import TransparentImage, to_rgb
from gqtok.service.errors import ImageTooLarge, InvalidImage

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
MEDIA_TYPES = set(FORMATS.values()) | {"image/jpg"}
# MPO is a JPEG with more frames after the first (many phone cameras write it): decoded as its first frame, as
# bulk and the in-process API do
DECODED_FORMATS = set(FORMATS) | {"MPO"}


def decode_image(data: bytes, max_pixels: int, name: str = "image", alpha: str = "composite",
                 multiple: int = 1) -> np.ndarray:
    """Encoded PNG/JPEG/WebP -> uint8 [H, W, 3] RGB (first frame of an animation), converted by
    gqtok.photos.to_rgb: EXIF orientation applied, 16-bit scaled to 8, alpha composited on white (or refused).
    max_pixels bounds the image padded to multiples of `multiple` (the model's f), read from the header: a
    1-pixel-wide image pads to f times its pixels."""
    if not data:
        raise InvalidImage(f"{name} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(f"{name}: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidImage(f"{name} is not a PNG, JPEG or WebP image") from None
    if im.format not in DECODED_FORMATS:
        raise InvalidImage(f"{name} is {im.format}; send PNG, JPEG or WebP")
    w, h = im.size
    ph, pw = layout.padded_size(h, w, multiple)
    if pw * ph > max_pixels:
        padded = f", {pw}x{ph} = {pw * ph} once padded to multiples of {multiple}," if (ph, pw) != (h, w) else ""
        raise ImageTooLarge(f"{name} is {w}x{h} = {w * h} pixels{padded}; the limit is {max_pixels}")
    if w < 1 or h < 1:
        raise InvalidImage(f"{name} has no pixels ({w}x{h})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return to_rgb(im, alpha, name)
    except TransparentImage as e:
        raise InvalidImage(str(e)) from None
    except Exception as e:  # truncated or corrupt data fails here, inside the decoder
        raise InvalidImage(f"{name} could not be decoded (truncated or corrupt): {e}") from None


def padded_pixels(data: bytes, multiple: int) -> int:
    """Pixels of an encoded image once padded to multiples of `multiple`, from its header alone; 0 when the
    header cannot be read (decode_image then says what is wrong)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Exception:
        return 0
    ph, pw = layout.padded_size(h, w, multiple)
    return ph * pw


def fit_image(img: np.ndarray, f: int, mode: str, name: str = "image") -> np.ndarray:
    """gqtok.core.layout.fit_to_grid (the contract's pad rule), its refusals as 422 invalid_image."""
    try:
        return layout.fit_to_grid(img, f, mode, name)
    except ValueError as e:
        raise InvalidImage(str(e)) from None


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
