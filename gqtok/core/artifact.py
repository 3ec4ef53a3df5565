"""Loading an exported model directory without torch, verifying every byte first.

`load_artifact(dir)` reads manifest.json, checks the sha256 of every file it
lists, rebuilds the codebook from (generator, seed, K, d) and checks its
digest, and refuses with `ArtifactError` naming the file and the mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gqtok.core.manifest import Manifest, file_sha256

ENCODER, DECODER, GQ_SELECT, CODEBOOK = "encoder.onnx", "decoder.onnx", "gq_select.onnx", "codebook.safetensors"
HYPER_ANALYSIS, LATENT_CODER = "hyper_analysis.onnx", "latent_coder.npz"  # a codec's side information and coder
REQUIRED_FILES = {"tokenizer": (ENCODER, DECODER, GQ_SELECT), "codec": (ENCODER, DECODER, HYPER_ANALYSIS, LATENT_CODER)}


class ArtifactError(ValueError):
    """A model directory that must not be loaded: missing, tampered or inconsistent."""


@dataclass
class Artifact:
    directory: Path
    manifest: Manifest
    codebook: np.ndarray | None  # float32 [K, d], digest-checked (None for a codec)

    def path(self, name: str) -> Path:
        return self.directory / name


def load_artifact(model_dir: Path | str) -> Artifact:
    model_dir = Path(model_dir)
    try:
        manifest = Manifest.read(model_dir)
    except FileNotFoundError as e:
        raise ArtifactError(str(e)) from e
    except ValueError as e:
        raise ArtifactError(str(e)) from e
    missing = [f for f in REQUIRED_FILES[manifest.kind] if f not in manifest.files]
    if missing:
        raise ArtifactError(f"{model_dir}/manifest.json lists no digest for {', '.join(missing)}")
    for name, expected in manifest.files.items():
        path = model_dir / name
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing")
        actual = file_sha256(path)
        if actual != expected:
            raise ArtifactError(f"{path} has sha256 {actual}, manifest says {expected}: the file was changed or corrupted")
    try:
        codebook = manifest.codebook.build() if manifest.codebook is not None else None
    except ValueError as e:
        raise ArtifactError(f"{model_dir}/manifest.json: {e}") from e
    return Artifact(model_dir, manifest, codebook)


def require_kind(artifact: Artifact, kind: str, use: str) -> None:
    """ArtifactError unless the artifact is a `kind` model: a codec has no tokens, a tokenizer no rate knob."""
    m = artifact.manifest
    if m.kind != kind:
        other = {"tokenizer": "it makes GQ tokens (gqtok tokenize, /v1/tokenize) and compresses at one rate",
                 "codec": "it compresses images at a chosen quality (gqtok compress --quality, /v1/compress)"}
        raise ArtifactError(f"model {m.model_id} is a {m.kind} model and cannot be used for {use}: {other[m.kind]}")
