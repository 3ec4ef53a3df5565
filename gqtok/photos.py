"""Photo files: finding them, the fixed held-out split, decoding to uint8 RGB, centre crops (numpy + Pillow).

One place for what every stage reads photos with: training, evaluation, the priors fit, the generator and the
benchmarks. It sits beside gqtok.core at the bottom of the layers and imports nothing of gqtok's.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}

# Fixed evaluation photos (file stems), never used for training: one or two per
# scene type, all public domain. Centre-cropped to 768x512 for evaluation. This
# is NOT the Kodak set; numbers on it are "held-out endless-sky" numbers.
HELDOUT = (
    "badlands3", "beach4", "beach6", "canyon5", "canyon8", "city3", "city7", "desert4",
    "dune2", "fields5", "fields8", "fog3", "forest2", "hills2", "lava4", "mountain4",
    "mountain7", "sea4", "sea7", "sky4", "snow4", "valley4", "valley7", "water4",
)
HELDOUT_SIZE = (512, 768)  # (H, W) of the evaluation crops


def list_images(source: Path) -> list[Path]:
    """The images of a folder (searched recursively, sorted), or of a text file listing one path per line
    (relative paths are relative to the list's folder; blank lines and lines starting with # are skipped)."""
    source = Path(source)
    if source.is_file():
        lines = [line.strip() for line in source.read_text().splitlines()]
        paths = [source.parent / line for line in lines if line and not line.startswith("#")]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} files listed in {source} do not exist, e.g. {missing[0]}")
        if not paths:
            raise FileNotFoundError(f"the list {source} names no images")
        return paths
    if not source.is_dir():
        raise FileNotFoundError(f"image folder {source} does not exist (for the default set run: gqtok data fetch)")
    paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {source}")
    return paths


HELDOUT_EVERY = 8  # photos of a fetched package (data/photos/<package>/): one in 8 by name is held out


def source_of(path: Path) -> str:
    """The source a photo belongs to: its package for a `gqtok data fetch --source debian-photos` folder
    (data/photos/<package>/<file>, SOURCES.json beside the packages), else its folder's name."""
    return Path(path).parent.name


def _in_fetched_package(path: Path) -> bool:
    return (Path(path).parent.parent / "SOURCES.json").is_file()


def _name_hash(path: Path) -> int:
    return int(hashlib.sha256(f"{Path(path).parent.name}/{Path(path).name}".encode()).hexdigest()[:12], 16)


def split_heldout(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training paths, held-out paths), fixed by file names alone so every stage agrees:
    - endless-sky photos whose stem is in HELDOUT;
    - photos of a fetched Debian package: those whose name hash is 0 modulo HELDOUT_EVERY, and at least one per
      package of two or more photos (the one with the smallest hash), so every source has held-out photos."""
    held = {p for p in paths if Path(p).stem in HELDOUT}
    packaged: dict[str, list[Path]] = {}
    for p in paths:
        if _in_fetched_package(p):
            packaged.setdefault(source_of(p), []).append(p)
    for members in packaged.values():
        chosen = [p for p in members if _name_hash(p) % HELDOUT_EVERY == 0]
        if not chosen and len(members) >= 2:
            chosen = [min(members, key=_name_hash)]
        held.update(chosen)
    return [p for p in paths if p not in held], [p for p in paths if p in held]


ALPHA_MODES = ("composite", "refuse")


class TransparentImage(ValueError):
    """An image with transparent pixels, read with alpha="refuse"."""


ORIENTATION_TAG = 0x0112  # EXIF's Orientation
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white, as most viewers show them


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1: upright; 5 to 8 turn the image by 90 degrees, swapping its sides)."""
    return im.getexif().get(ORIENTATION_TAG, 1)


def displayed_size(im: Image.Image) -> tuple[int, int]:
    """(H, W) of an opened image as to_rgb returns it (EXIF orientation applied), read from its header."""
    w, h = im.size
    return (w, h) if exif_orientation(im) in (5, 6, 7, 8) else (h, w)


def to_rgb(im: Image.Image, alpha: str = "composite", name: str = "image") -> np.ndarray:
    """A decoded PIL image -> uint8 [H, W, 3] RGB, the one conversion every reader uses (server, CLI, training,
    evaluation), so that one file gives one array everywhere:
    - EXIF orientation applied (a phone photo comes out upright, its size as displayed);
    - 16-bit and 32-bit integer grayscale scaled to 8 bits (65535 -> 255), not clipped; float images in [0, 1];
    - alpha (RGBA, LA, a palette with transparency) composited on ALPHA_BACKGROUND, or with alpha="refuse" a
      TransparentImage when any pixel is not opaque;
    - grayscale, palette and CMYK converted as Pillow does."""
    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha must be one of {ALPHA_MODES}, got {alpha!r}")
    if exif_orientation(im) != 1:  # exif_transpose copies the image even when there is nothing to turn
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or values.max(initial=0) <= 65535 else 2.0**31 - 1
        return np.repeat(np.round(np.clip(values / top, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    if im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        return np.repeat(np.round(np.clip(values, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(im.convert("RGBA"))
        opacity = rgba[..., 3:4].astype(np.float32) / 255
        if opacity.min(initial=1.0) < 1.0 and alpha == "refuse":
            raise TransparentImage(f"{name} has transparent pixels; send an opaque image (or let the server composite "
                             f"them on white)")
        background = np.asarray(ALPHA_BACKGROUND, dtype=np.float32)
        return np.round(rgba[..., :3] * opacity + background * (1 - opacity)).astype(np.uint8)
    return np.asarray(im.convert("RGB"))


def as_uint8_array(image) -> np.ndarray:
    """An image array or torch tensor as uint8 HxW, HxWx3 or HxWx4: floats are values in [0, 1] (scaled by 255 and
    rounded); channels first (CHW with 1 or 3 channels, as torch keeps images) becomes channels last."""
    if type(image).__module__.startswith("torch"):  # a torch tensor, without importing torch here
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.dtype.kind == "f":
        if not np.isfinite(image).all() or image.min(initial=0) < 0 or image.max(initial=0) > 1:
            raise ValueError("float image arrays must hold values in [0, 1]")
        image = np.round(image * 255).astype(np.uint8)
    if image.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 or float in [0, 1] (got {image.dtype})")
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[2] > 4:
        image = image.transpose(1, 2, 0)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
        raise ValueError(f"image arrays must be HxWx3 (or HxW, HxWx4, 3xHxW); got shape {image.shape}")
    return np.ascontiguousarray(image)


def to_torch(images: np.ndarray):
    """uint8 [..., H, W, 3] -> a float32 torch tensor [..., 3, H, W] in [0, 1], as torch models take images.
    torch is imported only here, only when a caller asks for tensors: the service and the client run without it."""
    torch = importlib.import_module("torch")
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(images, -1, -3))).float().div_(255)


def as_rgb(image, alpha: str = "composite", name: str = "image") -> np.ndarray:
    """A file path, encoded bytes, a PIL image, an image array or a torch tensor (as_uint8_array) -> uint8
    [H, W, 3] RGB by to_rgb: what the service's clients take, converted as the server converts it."""
    if isinstance(image, (str, Path)):
        return load_rgb(Path(image), alpha)
    if isinstance(image, (bytes, bytearray, memoryview)):
        import io

        with Image.open(io.BytesIO(bytes(image))) as im:
            return to_rgb(im, alpha, name)
    if isinstance(image, Image.Image):
        return to_rgb(image, alpha, name)
    arr = as_uint8_array(image)
    return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else to_rgb(Image.fromarray(arr), alpha, name)


def load_rgb(path: Path, alpha: str = "composite") -> np.ndarray:
    """An image file -> uint8 [H, W, 3] RGB (to_rgb)."""
    with Image.open(path) as im:
        return to_rgb(im, alpha, name=str(path))


def to_grey(img: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] -> the same shape in grey: its luma (ITU-R BT.601) in all three channels."""
    luma = np.rint(np.asarray(img, np.float64) @ np.array([0.299, 0.587, 0.114])).clip(0, 255).astype(np.uint8)
    return np.repeat(luma[..., None], 3, axis=-1)


def resize_rgb(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> [h, w, 3] (size = (h, w)), Pillow's bicubic filter (antialiased when shrinking)."""
    h, w = size
    if img.shape[:2] == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC))


def center_crop(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre crop [H, W, 3] to (h, w); images smaller than that are resized up first (aspect kept)."""
    h, w = size
    ih, iw = img.shape[:2]
    if ih < h or iw < w:
        s = max(h / ih, w / iw)
        img = np.asarray(Image.fromarray(img).resize((max(w, round(iw * s)), max(h, round(ih * s))), Image.BICUBIC))
        ih, iw = img.shape[:2]
    top, left = (ih - h) // 2, (iw - w) // 2
    return img[top : top + h, left : left + w]
