"""The artifact manifest: what `gqtok export` writes and the service reads.

A model directory holds manifest.json plus the files it lists (ONNX graphs,
codebook.safetensors). The manifest pins everything a client needs to agree
with the server about tokens: grid geometry, token layout, the codebook's
generator, seed and digest, and the input convention.

Two kinds of model share it: "tokenizer" (GQ tokens; a codebook) and "codec" (the discretized-VAE image codec
of training/codec.py: integer latents at a chosen rate; no codebook, a CodecSpec instead).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gqtok.core import codebook as cb
from gqtok.core.layout import LAYOUT_NAME

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


PRIOR_FILE_PREFIX = "prior_"  # prior_frequency.npz, prior_context.npz: refittable, outside the model digest


class CodebookSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    generator: str = cb.GENERATOR_NAME  # algorithm that rebuilds the codebook from the seed
    generator_version: int = cb.GENERATOR_VERSION
    seed: int = Field(ge=0, lt=2**64)
    num_codes: int = Field(ge=1, le=2**32)  # K
    dim: int = Field(ge=1, le=cb.MAX_DIM)  # d
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of the float32 little-endian [K, d] bytes

    def build(self):
        """Rebuild the codebook and check it against the recorded digest (ValueError on mismatch)."""
        if (self.generator, self.generator_version) != (cb.GENERATOR_NAME, cb.GENERATOR_VERSION):
            raise ValueError(
                f"codebook generator {self.generator} v{self.generator_version} is not supported "
                f"(this gqtok has {cb.GENERATOR_NAME} v{cb.GENERATOR_VERSION})"
            )
        codebook = cb.make_codebook(self.seed, self.num_codes, self.dim)
        digest = cb.codebook_digest(codebook)
        if digest != self.sha256:
            raise ValueError(
                f"codebook rebuilt from seed {self.seed} has sha256 {digest}, manifest says {self.sha256}: "
                "wrong seed or a different generator"
            )
        return codebook


class InputSpec(BaseModel):
    """What encoder.onnx takes and decoder.onnx gives back.

    The encoder takes raw RGB pixels (uint8, NHWC) and normalizes inside the
    graph to model space x * scale + offset, in value_range; the decoder maps
    model space back and returns float32 NHWC in [0, 1].
    """

    model_config = ConfigDict(extra="forbid")

    color: Literal["RGB"] = "RGB"
    encoder_input: Literal["uint8 NHWC"] = "uint8 NHWC"
    decoder_output: Literal["float32 NHWC in [0, 1]"] = "float32 NHWC in [0, 1]"
    scale: float = 1 / 127.5
    offset: float = -1.0
    value_range: tuple[float, float] = (-1.0, 1.0)


class CodecSpec(BaseModel):
    """The discretized-VAE codec: its rate levels and side information. Quality q (1 = the lowest rate) codes
    with the per-channel gains trained for rate_lambdas[q - 1] (latent_coder.npz holds them and the coder)."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["dvae"] = "dvae"
    rate_lambdas: list[float] = Field(min_length=1)  # ascending: quality 1 .. len
    default_quality: int = Field(ge=1)
    hyper_channels: int = Field(ge=1)  # channels of the side information z
    hyper_downsample: int = 4  # z has one position per 4 x 4 latent positions

    @model_validator(mode="after")
    def _levels(self):
        if list(self.rate_lambdas) != sorted(self.rate_lambdas):
            raise ValueError(f"rate_lambdas must ascend (quality 1 is the lowest rate), got {self.rate_lambdas}")
        if self.default_quality > len(self.rate_lambdas):
            raise ValueError(f"default_quality {self.default_quality} is past the {len(self.rate_lambdas)} levels")
        return self

    @property
    def qualities(self) -> int:
        return len(self.rate_lambdas)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    kind: Literal["tokenizer", "codec"] = "tokenizer"
    model_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    model_version: str = "1"
    downsample: int = Field(ge=1)  # f: one grid cell per f x f pixels
    latent_channels: int = Field(ge=1)  # C
    token_dim: int | None = Field(default=None, ge=1)  # d (tokenizers)
    tokens_per_position: int | None = Field(default=None, ge=1)  # T = C / d (tokenizers)
    token_layout: Literal["strided"] = LAYOUT_NAME
    gq_beta: float = 1.0
    codebook: CodebookSpec | None = None  # tokenizers only
    codec: CodecSpec | None = None  # codecs only
    input: InputSpec = InputSpec()
    opset: int | None = None
    gq_select_rows: int = Field(default=64, ge=1)  # fixed row count of gq_select.onnx
    # the k-d tree's metric (gqtok.core.select.tree_metric), measured at export on real posteriors; None: taken
    # from the first selection's tokens. Speed only: a token's id never depends on it
    gq_tree_metric: list[float] | None = None
    files: dict[str, str] = {}  # file name -> sha256
    eval: dict | None = None  # the run's held-out figures, as `gqtok eval` wrote them
    training: dict | None = None  # preset, steps, budget: where the model came from

    @model_validator(mode="after")
    def _consistent(self):
        bad = [n for n in self.files if "/" in n or "\\" in n or n in ("", ".", "..")]
        if bad:
            raise ValueError(f"file names must be plain names inside the model directory, got {bad}")
        if self.kind == "codec":
            if self.codec is None or self.codebook is not None:
                raise ValueError("a codec manifest has a codec section and no codebook")
            return self
        if self.codebook is None or self.token_dim is None or self.tokens_per_position is None:
            raise ValueError("a tokenizer manifest needs codebook, token_dim and tokens_per_position")
        if self.latent_channels != self.tokens_per_position * self.token_dim:
            raise ValueError(f"latent_channels {self.latent_channels} != tokens_per_position * token_dim")
        if self.codebook.dim != self.token_dim:
            raise ValueError(f"codebook dim {self.codebook.dim} != token_dim {self.token_dim}")
        return self

    @property
    def num_codes(self) -> int:
        return self.codebook.num_codes

    @property
    def model_digest(self) -> str:
        """sha256 (hex) over the digests of every file that decides tokens or pixels: the networks, the codebook
        and the selection graph (all of `files` but the entropy-coding priors, which a refit changes and streams
        pin by their own digest). Two exports of different networks differ here whatever their id and version;
        streams, token shards and responses carry it, so that one model's data is never decoded by another."""
        if not self.files:
            raise ValueError(f"manifest of {self.model_id} lists no files: it has no model digest")
        return model_digest_of(self.files)

    def write(self, model_dir: Path) -> Path:
        path = Path(model_dir) / MANIFEST_NAME
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def read(cls, model_dir: Path) -> "Manifest":
        path = Path(model_dir) / MANIFEST_NAME
        if not path.exists():
            raise FileNotFoundError(f"no {MANIFEST_NAME} in {model_dir}")
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except (json.JSONDecodeError, ValueError) as e:
            raise ValueError(f"{path} is not a valid gqtok manifest: {e}") from e


def model_digest_of(files: dict[str, str]) -> str:
    """Manifest.model_digest from a manifest's files (name -> sha256)."""
    decisive = sorted((name, sha) for name, sha in files.items() if not name.startswith(PRIOR_FILE_PREFIX))
    return hashlib.sha256("".join(f"{name}={sha}\n" for name, sha in decisive).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
