"""Loading an exported model directory without torch, verifying every byte first.

`load_artifact(dir)` reads manifest.json, checks the sha256 of every file it
lists, rebuilds the codebook from (generator, seed, K, d) and checks its
digest, and refuses with `ArtifactError` naming the file and the mismatch.

codebook.safetensors is derived, not shipped: the codebook is rebuilt from its seed, and the file's bytes are a
fixed function of it (`codebook_file_bytes`), so the manifest keeps the file's digest (and with it every model
digest made while the file was shipped) and the loader checks the rebuilt bytes against it. A model directory
that still holds the file is checked the same way.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gqtok.core import codebook as cb
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

    def codebook_file(self) -> bytes:
        """codebook.safetensors' bytes (the same as the file an export once wrote)."""
        return codebook_file_bytes(self.codebook, self.manifest.codebook.seed)


SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64", np.dtype(np.uint16): "U16"}


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """A safetensors file whose bytes depend only on its contents: header keys sorted, tensors in name order
    (safetensors' own writer puts the metadata map in no fixed order, so the same tensors got a new digest)."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    offset, blobs = 0, []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        header[name] = {"dtype": SAFETENSORS_DTYPES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        blobs.append(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def codebook_file_bytes(codebook: np.ndarray, seed: int) -> bytes:
    return safetensors_bytes({"codebook": codebook}, {"generator": cb.GENERATOR_NAME, "seed": str(seed)})


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
    try:
        codebook = manifest.codebook.build() if manifest.codebook is not None else None
    except ValueError as e:
        raise ArtifactError(f"{model_dir}/manifest.json: {e}") from e
    for name, expected in manifest.files.items():
        path = model_dir / name
        if name == CODEBOOK and codebook is not None and not path.is_file():  # derived: check the rebuilt bytes
            actual = hashlib.sha256(codebook_file_bytes(codebook, manifest.codebook.seed)).hexdigest()
        elif not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing")
        else:
            actual = file_sha256(path)
        if actual != expected:
            raise ArtifactError(f"{path} has sha256 {actual}, manifest says {expected}: the file was changed or corrupted")
    return Artifact(model_dir, manifest, codebook)


def require_kind(artifact: Artifact, kind: str, use: str) -> None:
    """ArtifactError unless the artifact is a `kind` model: a codec has no tokens, a tokenizer no rate knob."""
    m = artifact.manifest
    if m.kind != kind:
        other = {"tokenizer": "it makes GQ tokens (gqtok tokenize, /v1/tokenize) and compresses at one rate",
                 "codec": "it compresses images at a chosen quality (gqtok compress --quality, /v1/compress)"}
        raise ArtifactError(f"model {m.model_id} is a {m.kind} model and cannot be used for {use}: {other[m.kind]}")
