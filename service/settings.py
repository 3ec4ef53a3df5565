"""Service configuration: flags of `gqtok serve` and GQTOK_* environment variables (flags win)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "default"


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GQTOK_", env_nested_delimiter="__")

    models: list[Path] = Field(default_factory=lambda: [DEFAULT_MODEL_DIR])  # model directories; the first is the default
    default_model: str | None = None  # model id to use when a request names none (default: the first)
    host: str = "127.0.0.1"
    port: int = 8000
    device: Literal["auto", "cpu", "cuda"] = "auto"  # onnxruntime provider choice
    threads: int = 0  # intra-op threads per onnxruntime session; 0 = onnxruntime's choice
    selector: Literal["auto", "onnx", "numpy", "ort-matmul"] = "auto"  # GQ selection: auto = ort-matmul on CPU, onnx on CUDA
    max_batch_size: int = Field(8, ge=1)  # images (or grids) per inference call
    # how long a batch waits for company. 0: a batch is whatever queued while the previous one ran, which is
    # all a CPU needs (batch 1 runs as fast per image as batch 8); a GPU gains from a few ms.
    max_queue_delay_ms: float = Field(0.0, ge=0)
    max_queue_size: int = Field(256, ge=1)  # queued images per model and direction; past it: 429
    max_images_per_request: int = Field(32, ge=1)
    max_body_bytes: int = Field(32 * 2**20, ge=1024)  # request body; past it: 413
    # Memory: on the CPU provider the default model's decoder held about 3.3 KB per pixel of a batch (onnxruntime's
    # arena after a batch of 8 at 256x256: 2.2 GiB), so these two bound the working memory to a few GiB.
    max_image_pixels: int = Field(1024 * 1024, ge=64)  # per image, read from the header before decoding; past it: 413
    max_batch_pixels: int = Field(8 * 256 * 256, ge=64)  # pixels per inference call (an image bigger runs alone)
    # entropy coding (/v1/compress, /v1/decompress) runs in threads beside inference; the context prior takes
    # about a second of one core per 768x512 image, so this bounds how many cores compression may hold
    max_concurrent_coding: int = Field(2, ge=1)
    request_timeout_s: float = Field(60.0, gt=0)  # per request, queue + inference; past it: 503
    drain_timeout_s: float = Field(30.0, ge=0)  # graceful shutdown: how long in-flight requests may take
    api_key: SecretStr | None = None  # when set, every route but /health/* needs "Authorization: Bearer KEY"
    log_level: str = "info"
