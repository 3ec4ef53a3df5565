"""More real photos: the photographs inside Debian packages beyond endless-sky, fetched, verified and recorded.

    gqtok data fetch --source debian-photos                 # -> data/photos/<package>/<file>, SOURCES.json
    gqtok data fetch --source debian-photos --optional      # also ufoai-textures and stellarium's panorama tiles

`photo_sources.csv` (beside this file) lists every file that was looked at and judged a real photograph: package,
path inside the package, size, md5 and class (photo, photo-small under 512 px, pano-tile, astro). Each fetch
`apt-get download`s the package (never installs it), unpacks it with `dpkg-deb -x`, takes the listed files and
checks each one's md5. Two kinds of path point inside archives:
  rcc-x/NAME/INNER                 the file INNER of the Qt resource archive rcc/NAME.rcc (gcompris-qt-data)
  enlightenment/extracted/S.jpg    the largest JPEG stream inside the EET file data/backgrounds/S.edj
Files that are the same photo as one already kept (equal md5, or a 256-bit difference hash within 10 bits) are
skipped and listed. SOURCES.json records each file's package, version, path, licence, md5 and size; SOURCE.md
lists the licences. The packages reserved for independent evaluation are refused by name and never fetched.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import struct
import subprocess
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SOURCES_CSV = Path(__file__).with_name("photo_sources.csv")
# Reserved for independent evaluation (../shared/data.md): never fetch, train or evaluate on them.
RESERVED = ("mate-backgrounds", "opencv-doc", "lomiri-wallpapers")


@dataclass(frozen=True)
class Package:
    licence: str
    classes: tuple[str, ...] = ("photo", "photo-small")  # which classes of the csv to take
    optional: bool = False  # only with --optional (large, or a narrow domain)


PACKAGES = {
    "gcompris-qt-data": Package("per file, mostly Wikimedia CC-BY-SA / CC-BY / public domain (see the package's "
                                "copyright file)"),
    "kphotoalbum": Package("GPL-2+"),
    "tuxpaint-data": Package("GPL-2+"),
    "python3-skimage": Package("BSD-3-Clause"),
    "enlightenment-data": Package("BSD-2-Clause"),
    "plasma-workspace-wallpapers": Package("GPL-2+"),
    "lxqt-themes": Package("LGPL-2.1+"),
    "scribus-template": Package("see the package's copyright file"),
    "palapeli-data": Package("see the package's copyright file"),
    "libjs-jquery-backstretch": Package("MIT"),
    "psychtoolbox-3-common": Package("see the package's copyright file"),
    "sddm-theme-maldives": Package("see the package's copyright file"),
    "scratch": Package("CC-BY-SA-3.0"),
    "python3-sklearn": Package("BSD-3-Clause"),
    "python-matplotlib-data": Package("see the package's copyright file (matplotlib licence)"),
    "stellarium-data": Package("GPL-2+", classes=("pano-tile",), optional=True),
    "ufoai-textures": Package("GPL-2+ / CC-BY-SA (see the package's copyright file)", classes=(), optional=True),
}
UFOAI_ARCHIVE = "usr/share/games/ufoai/base/0textures.pk3"
UFOAI_SKIP = ("_nm", "_gm", "_sm", "_rm", "_hm")  # normal, gloss, specular, roughness and height maps: not photos


def check_not_reserved(package: str) -> None:
    if any(package == r or package.startswith(r) for r in RESERVED):
        raise ValueError(f"{package} is reserved for independent evaluation: it is never fetched, trained or "
                         "evaluated on")


def listed_files(package: str) -> list[dict]:
    with SOURCES_CSV.open() as f:
        rows = [r for r in csv.DictReader(f) if r["package"] == package]
    return [r for r in rows if r["class"] in PACKAGES[package].classes]


# -- archives inside packages ------------------------------------------------------------------------------------
def rcc_files(data: bytes) -> dict[str, bytes]:
    """The files of a Qt resource archive (.rcc, format versions 1-3): inner path -> bytes."""
    if data[:4] != b"qres":
        raise ValueError("not a Qt resource archive")
    version, tree, payload, names = struct.unpack(">IIII", data[4:20])
    node = 14 if version == 1 else 22  # version 2 added an 8-byte modification time per node

    def name_at(offset: int) -> str:
        (n,) = struct.unpack_from(">H", data, names + offset)
        return data[names + offset + 6 : names + offset + 6 + 2 * n].decode("utf-16-be")

    out, stack = {}, [(0, "")]
    while stack:
        index, prefix = stack.pop()
        base = tree + index * node
        name_offset, flags = struct.unpack_from(">IH", data, base)
        path = f"{prefix}/{name_at(name_offset)}" if index else ""
        path = path.lstrip("/")
        if flags & 2:  # a directory: its children are consecutive nodes
            count, first = struct.unpack_from(">II", data, base + 6)
            stack += [(first + i, path) for i in range(count)]
            continue
        (offset,) = struct.unpack_from(">I", data, base + 10)
        (size,) = struct.unpack_from(">I", data, payload + offset)
        blob = data[payload + offset + 4 : payload + offset + 4 + size]
        if flags & 1:  # zlib, after a 4-byte uncompressed length
            blob = zlib.decompress(blob[4:])
        elif flags & 4:
            raise ValueError(f"{path} is zstd-compressed, which this reader does not handle")
        out[path] = blob
    return out


def _jpeg_end(data: bytes, start: int) -> int | None:
    """Offset just past the JPEG stream starting at data[start] (an SOI), found by walking its segments."""
    i, n = start + 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0xD9:  # EOI
            return i + 2
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:
            i += 2
        else:
            (length,) = struct.unpack_from(">H", data, i + 2)
            i += 2 + length
            if marker == 0xDA:  # entropy-coded data: runs to the next marker that is not a stuffed 0xFF00 or RSTn
                while True:
                    j = data.find(b"\xff", i)
                    if j == -1 or j + 1 >= n:
                        return None
                    if data[j + 1] == 0 or 0xD0 <= data[j + 1] <= 0xD7:
                        i = j + 2
                    else:
                        i = j
                        break
    return None


def largest_jpeg(data: bytes) -> bytes:
    """The largest complete JPEG stream inside a blob (an EET file stores its images as whole JPEGs)."""
    best, pos = b"", data.find(b"\xff\xd8\xff")
    while pos != -1:
        end = _jpeg_end(data, pos)
        if end and end - pos > len(best):
            best = data[pos:end]
        pos = data.find(b"\xff\xd8\xff", pos + 3)
    return best


def extract(root: Path, path: str, rcc_cache: dict) -> bytes:
    """The bytes the csv's path names, from an unpacked package at root."""
    if "/rcc-x/" in path:
        head, rest = path.split("/rcc-x/", 1)
        name, inner = rest.split("/", 1)
        if name not in rcc_cache:
            rcc_cache[name] = rcc_files((root / head / "rcc" / f"{name}.rcc").read_bytes())
        return rcc_cache[name][inner]
    if "/enlightenment/extracted/" in path:
        stem = Path(path).stem
        return largest_jpeg((root / "usr/share/enlightenment/data/backgrounds" / f"{stem}.edj").read_bytes())
    return (root / path).read_bytes()


def ufoai_photos(root: Path, min_side: int = 512) -> list[tuple[str, bytes]]:
    """The photo-based textures of ufoai-textures (not in the csv): the JPEG members of its pk3 with both sides at
    least min_side, maps skipped. On 0textures.pk3 of 2.5: 193 files, by eye almost all photographs of stone,
    wood, grass, brick, doors and walls (the PNG members are mostly drawn)."""
    out = []
    with zipfile.ZipFile(root / UFOAI_ARCHIVE) as z:
        for name in sorted(z.namelist()):
            stem, suffix = Path(name).stem.lower(), Path(name).suffix.lower()
            if suffix not in (".jpg", ".jpeg") or stem.endswith(UFOAI_SKIP):
                continue
            data = z.read(name)
            with Image.open(io.BytesIO(data)) as im:
                if min(im.size) >= min_side:
                    out.append((name, data))
    return out


# -- de-duplication ----------------------------------------------------------------------------------------------
def difference_hash(data: bytes, side: int = 16) -> int:
    """A side*side-bit dHash: the signs of horizontal gradients of a (side+1) x side grey thumbnail. Equal or
    near-equal for the same photo re-encoded or resized. 256 bits, not the usual 64: at 64 bits a foggy, flat
    photo matched a colour chart (4 bits apart); at 256 they are 32 bits apart and a re-encoded copy 0."""
    with Image.open(io.BytesIO(data)) as im:
        g = np.asarray(im.convert("L").resize((side + 1, side), Image.BILINEAR), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).ravel()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


class Deduplicator:
    """Keeps what is new: refuses a file whose md5 or dHash (within max_bits of 256) matches one kept before."""

    def __init__(self, max_bits: int = 10):
        self.max_bits, self.md5s, self.hashes = max_bits, {}, []

    def add(self, name: str, data: bytes) -> str | None:
        """None if kept; else the name of the file it duplicates."""
        md5 = hashlib.md5(data).hexdigest()
        if md5 in self.md5s:
            return self.md5s[md5]
        h = difference_hash(data)
        for other, oh in self.hashes:
            if bin(h ^ oh).count("1") <= self.max_bits:
                return other
        self.md5s[md5] = name
        self.hashes.append((name, h))
        return None


GENERIC_DIRS = {"images", "contents", "resource", "resources", "src", "activities", "gcompris", "usr", "share", "data"}


def unique_name(dest: Path, package: str, path: str, taken: set[str]) -> str:
    """<package>/<file name>, prefixed with the nearest telling folder names of `path` until it is unique
    (plasma's wallpapers are all called 2560x1600.jpg: they become Kite-2560x1600.jpg, ...)."""
    p = Path(path)
    parts = [d for d in reversed(p.parent.parts) if d not in GENERIC_DIRS]
    for k in range(len(parts) + 1):
        rel = f"{package}/{'-'.join([*reversed(parts[:k]), p.name])}"
        if rel not in taken and not (dest / rel).exists():
            return rel
    raise RuntimeError(f"no unique name for {path}")


# -- fetching ----------------------------------------------------------------------------------------------------
def download(package: str, into: Path) -> Path:
    """apt-get download into `into` (after apt-get update when the lists are missing) -> the .deb. Never installs."""
    def run():
        return subprocess.run(["apt-get", "download", package], cwd=into, capture_output=True, text=True)

    if run().returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
        proc = run()
        if proc.returncode != 0:
            raise RuntimeError(f"apt-get download {package} failed: {proc.stderr.strip()}")
    return next(into.glob(f"{package}_*.deb"))


def fetch_photos(dest: Path, packages: list[str] | None = None, optional: bool = False, progress: bool = True,
                 existing: list[Path] = ()) -> dict:
    """Fetch the photos of these packages (default: every non-optional one, plus the optional ones if asked)
    into dest/<package>/, verified and de-duplicated (also against the images in `existing` folders).
    Idempotent per package: a package already recorded in dest/SOURCES.json is not fetched again."""
    from tqdm import tqdm

    from gqtok.photos import list_images

    names = packages or [p for p, spec in PACKAGES.items() if optional or not spec.optional]
    for name in names:
        check_not_reserved(name)
        if name not in PACKAGES:
            raise ValueError(f"unknown photo package {name!r}; known: {', '.join(PACKAGES)}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    record_path = dest / "SOURCES.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"packages": {}, "files": [],
                                                                                 "duplicates": []}
    dedup = Deduplicator()
    for folder in existing:
        for p in list_images(folder):
            dedup.add(str(p), p.read_bytes())
    for f in record["files"]:
        dedup.add(f["file"], (dest / f["file"]).read_bytes())
    for name in tqdm([n for n in names if n not in record["packages"]], desc="photo packages", disable=not progress):
        spec = PACKAGES[name]
        with tempfile.TemporaryDirectory() as tmp:
            deb = download(name, Path(tmp))
            version = deb.name.split("_")[1]
            root = Path(tmp) / "x"
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
            if name == "ufoai-textures":
                items = [(path, data, None) for path, data in ufoai_photos(root)]
            else:
                rcc_cache: dict = {}
                items = [(r["path"], extract(root, r["path"], rcc_cache), r["md5"]) for r in listed_files(name)]
            kept, taken = 0, {f["file"] for f in record["files"]}
            for path, data, md5 in items:
                if md5 is not None and hashlib.md5(data).hexdigest() != md5:
                    raise RuntimeError(f"{name} {version}: {path} has md5 {hashlib.md5(data).hexdigest()}, the list "
                                       f"says {md5}: the package changed")
                rel = unique_name(dest, name, path, taken)
                target = dest / rel
                same = dedup.add(rel, data)
                if same is not None:
                    record["duplicates"].append({"file": path, "package": name, "same_as": same})
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                with Image.open(io.BytesIO(data)) as im:
                    size = list(im.size)
                taken.add(rel)
                record["files"].append({"file": rel, "package": name, "version": version, "source_path": path,
                                        "licence": spec.licence, "md5": hashlib.md5(data).hexdigest(), "size": size})
                kept += 1
            record["packages"][name] = {"version": version, "licence": spec.licence, "files": kept}
        record_path.write_text(json.dumps(record, indent=1))
    write_source_md(dest, record)
    return record


def write_source_md(dest: Path, record: dict) -> None:
    lines = [f"# Photos from {len(record['packages'])} Debian packages", "",
             f"{len(record['files'])} files; {len(record['duplicates'])} skipped as duplicates. Licence per "
             "package (each file's package, version, path and md5 are in SOURCES.json):", "",
             "| package | version | files | licence |", "| --- | --- | --- | --- |"]
    lines += [f"| {p} | {v['version']} | {v['files']} | {v['licence']} |" for p, v in sorted(record["packages"].items())]
    (dest / "SOURCE.md").write_text("\n".join(lines) + "\n")
