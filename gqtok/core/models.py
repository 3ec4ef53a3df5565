"""Where model directories are found: one search order for `gqtok serve`, compress, decompress and the API.

    find_model()                    # the default model: "default" on the search path
    find_model("models/my-model")   # a directory holding manifest.json is taken as it is
    find_model("gqtok-default")     # a name: a folder of that name, or a model whose manifest has that id

The search path, first match wins:
  1. the folders in $GQTOK_MODEL_PATH (os.pathsep-separated), for models kept anywhere;
  2. the user data directory: $GQTOK_HOME/models, else $XDG_DATA_HOME/gqtok/models, else ~/.local/share/gqtok/models;
  3. the models bundled with the package (`gqtok.models`: the embedded default model).
An explicit directory (`--model DIR`, or GQTOK_MODELS for the service) always comes before the search path.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

DEFAULT_MODEL = "default"
MANIFEST = "manifest.json"


def user_models_dir() -> Path:
    if os.environ.get("GQTOK_HOME"):
        return Path(os.environ["GQTOK_HOME"]) / "models"
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "gqtok" / "models"


def bundled_models_dir() -> Path:
    """The package-data folder of gqtok.models (inside the wheel, or models/ in a source checkout)."""
    return Path(str(resources.files("gqtok.models")))


def search_path() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("GQTOK_MODEL_PATH", "").split(os.pathsep) if p]
    return [*extra, user_models_dir(), bundled_models_dir()]


def _model_id(directory: Path) -> str | None:
    try:
        return json.loads((directory / MANIFEST).read_text()).get("model_id")
    except (OSError, ValueError, AttributeError):
        return None


def find_model(spec: str | Path | None = None) -> Path:
    """A model directory for `spec` (a directory, a folder name or a model id; None: the default model).

    FileNotFoundError names every place that was searched."""
    spec = DEFAULT_MODEL if spec is None or str(spec) == "" else spec
    direct = Path(spec).expanduser()
    if (direct / MANIFEST).is_file():
        return direct
    name = str(spec)
    searched = [str(direct)]
    if "/" not in name and os.sep not in name:
        roots = search_path()
        for root in roots:  # a folder of that name
            if (root / name / MANIFEST).is_file():
                return root / name
        for root in roots:  # a model whose manifest carries that id
            if root.is_dir():
                for candidate in sorted(p for p in root.iterdir() if p.is_dir()):
                    if _model_id(candidate) == name:
                        return candidate
        searched += [str(r) for r in roots]
    raise FileNotFoundError(
        f"no model {name!r}: not a directory with {MANIFEST}, and no such folder or model id in "
        f"{', '.join(searched[1:]) or '(a path is not searched)'}. Export one with `gqtok export RUN --out DIR`, "
        "then pass --model DIR, or put it under the user data directory")
