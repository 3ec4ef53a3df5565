"""Shared fixtures: the real default photos (fetched once), and a small subset of them for fast runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    """The default photo set (gqtok data fetch), in the repo's data/ folder or $GQTOK_DATA."""
    from training.data import fetch_default_photos

    return fetch_default_photos(Path(os.environ.get("GQTOK_DATA", REPO / "data" / "endless-sky")))


@pytest.fixture(scope="session")
def small_photos(photos_dir, tmp_path_factory) -> Path:
    """12 training photos and 3 held-out photos (symlinks): enough for a real run in seconds."""
    from training.data import HELDOUT, list_images, split_heldout

    train, held = split_heldout(list_images(photos_dir))
    out = tmp_path_factory.mktemp("photos")
    for p in train[::20][:12] + [h for h in held if h.stem in HELDOUT[:3]]:
        (out / p.name).symlink_to(p.resolve())
    return out


@pytest.fixture(scope="session")
def tiny_run(small_photos, tmp_path_factory) -> Path:
    """A real tiny model trained by our code (80 steps) and evaluated on the held-out photos."""
    from training.evaluate import evaluate
    from training.train import train

    run = tmp_path_factory.mktemp("runs") / "tiny"
    train(run, small_photos, preset="tiny", overrides={"steps": 80, "image_every": 0}, progress=False)
    evaluate(run, small_photos, json_out=run / "eval.json", size=(192, 256), progress=False)
    return run


@pytest.fixture(scope="session")
def tiny_model(tiny_run, tmp_path_factory) -> Path:
    """The tiny run exported to ONNX: a model directory the service can load."""
    from export.exporter import export_run

    out = tmp_path_factory.mktemp("models") / "tiny"
    export_run(tiny_run, out, model_id="tiny")
    return out
