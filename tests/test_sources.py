"""training/sources.py: photos from Debian packages, verified by md5, de-duplicated, licences recorded; the two
archive formats read on synthetic files and on the real gcompris package; reserved packages refused."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from gqtok.training import sources


def jpeg_bytes(seed: int, size=(40, 30)) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_rcc(files: dict[str, tuple[bytes, bool]]) -> bytes:
    """A Qt resource archive (format 3) holding files at one directory level: name -> (bytes, zlib?)."""
    names, payload, nodes = b"", b"", []

    def add_name(n: str) -> int:
        nonlocal names
        off = len(names)
        enc = n.encode("utf-16-be")
        names += struct.pack(">HI", len(n), 0) + enc
        return off

    root_name, dir_name = add_name(""), add_name("dir")
    file_nodes = []
    for name, (data, packed) in files.items():
        off = len(payload)
        blob = struct.pack(">I", len(data)) + zlib.compress(data) if packed else data
        payload += struct.pack(">I", len(blob)) + blob
        file_nodes.append(struct.pack(">IHHHIQ", add_name(name), 1 if packed else 0, 0, 0, off, 0))
    nodes.append(struct.pack(">IHIIQ", root_name, 2, 1, 1, 0))  # root: one child, node 1
    nodes.append(struct.pack(">IHIIQ", dir_name, 2, len(file_nodes), 2, 0))  # dir: children from node 2
    nodes += file_nodes
    tree = b"".join(nodes)
    head = 24
    return (b"qres" + struct.pack(">IIIII", 3, head + len(payload) + len(names), head, head + len(payload), 0)
            + payload + names + tree)


def test_rcc_reader_finds_stored_and_compressed_files():
    a, b = jpeg_bytes(1), b"plain text " * 50
    files = sources.rcc_files(make_rcc({"a.jpg": (a, False), "b.txt": (b, True)}))
    assert files == {"dir/a.jpg": a, "dir/b.txt": b}
    with pytest.raises(ValueError, match="not a Qt resource archive"):
        sources.rcc_files(b"nope" + bytes(40))


def test_largest_jpeg_is_cut_exactly_from_a_blob():
    small, big = jpeg_bytes(2, (16, 16)), jpeg_bytes(3, (64, 48))
    blob = b"\x00EET" + bytes(100) + small + b"\xff\xd9junk\xff\xd8" + bytes(33) + big + b"tail\xff\xd9"
    assert sources.largest_jpeg(blob) == big
    assert Image.open(io.BytesIO(sources.largest_jpeg(blob))).size == (64, 48)


def test_reserved_packages_are_refused():
    for name in ("mate-backgrounds", "opencv-doc", "lomiri-wallpapers-extra"):
        with pytest.raises(ValueError, match="reserved for independent evaluation"):
            sources.fetch_photos("unused", packages=[name])
    listed = {line.split(",")[0] for line in sources.SOURCES_CSV.read_text().splitlines()[1:]}
    assert not [p for p in listed | set(sources.PACKAGES) if p.startswith(sources.RESERVED)]


def test_duplicates_are_found_by_content_not_name():
    photo = jpeg_bytes(4, (120, 90))
    img = Image.open(io.BytesIO(photo))
    resized = io.BytesIO()
    img.resize((60, 45)).save(resized, format="PNG")
    dedup = sources.Deduplicator()
    assert dedup.add("a.jpg", photo) is None
    assert dedup.add("b.png", resized.getvalue()) == "a.jpg"  # same photo, other size and format
    assert dedup.add("c.jpg", jpeg_bytes(5, (120, 90))) is None  # another photo


def test_unique_names_for_files_that_share_one(tmp_path):
    taken = set()
    for wallpaper in ("Kite", "Path", "Grey"):
        taken.add(sources.unique_name(tmp_path, "plasma", f"usr/share/wallpapers/{wallpaper}/contents/images/2560x1600.jpg",
                                      taken))
    assert taken == {"plasma/2560x1600.jpg", "plasma/Path-2560x1600.jpg", "plasma/Grey-2560x1600.jpg"}


@pytest.mark.slow
def test_fetch_real_packages(tmp_path, photos_dir):
    """Two real packages (a plain one and gcompris's resource archives, 46 MB): every listed photo arrives with
    the md5 the list gives, is recorded with its licence, and a second fetch does nothing."""
    dest = tmp_path / "photos"
    record = sources.fetch_photos(dest, packages=["python3-sklearn", "gcompris-qt-data"], progress=False,
                                  existing=[photos_dir])
    listed = {r["md5"] for p in ("python3-sklearn", "gcompris-qt-data") for r in sources.listed_files(p)}
    assert {f["md5"] for f in record["files"]} == listed and len(listed) == 123
    assert record["packages"]["gcompris-qt-data"]["files"] == 121 and not record["duplicates"]
    f = next(f for f in record["files"] if f["package"] == "python3-sklearn")
    assert f["licence"] == "BSD-3-Clause" and (dest / f["file"]).is_file() and f["source_path"].endswith(".jpg")
    assert Image.open(dest / record["files"][0]["file"]).size == tuple(record["files"][0]["size"])
    assert "gcompris-qt-data" in (dest / "SOURCE.md").read_text()
    again = sources.fetch_photos(dest, packages=["python3-sklearn"], progress=False)
    assert again["files"] == json.loads((dest / "SOURCES.json").read_text())["files"] == record["files"]
