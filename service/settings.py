"""Service configuration, defined once: each field is a `gqtok serve` flag and a GQTOK_* environment variable.

Flags win over environment variables, which win over the defaults here. `add_arguments` builds the flags of
`gqtok serve` from the fields below (name, type, choices, default and help sentence), so they cannot drift.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from gqtok.core.layout import DEFAULT_MAX_IMAGE_PIXELS


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GQTOK_", env_nested_delimiter="__")

    models: list[Path] = Field([Path("default")], description=(
        "Model directories or names to serve (repeat --model; GQTOK_MODELS takes a JSON list). A name is looked "
        "up on the model search path (docs/service.md); the first model is the default."))
    codecs: list[Path] = Field([], description=(
        "Codec models to serve beside them (repeat --codec; GQTOK_CODECS takes a JSON list), e.g. the bundled "
        "'codec': the discretized-VAE image codec, /v1/compress?model=codec&quality=N with a rate you choose."))
    default_model: str | None = Field(None, description="Model id used when a request names none (default: the first).")
    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 in a container.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description=(
        "onnxruntime provider: auto takes CUDA when onnxruntime-gpu sees a GPU, else the CPU."))
    threads: int = Field(0, ge=0, description=(
        "Threads of the one onnxruntime pool that every model's sessions share, and of each model's exact GQ "
        "search; 0: one per core."))
    inference_nice: int = Field(10, ge=0, le=19, description=(
        "Nice value of the threads that run inference and entropy coding (Linux; 0: the event loop's). Above 0, "
        "the event loop that admits requests, refuses them (429) and answers /health keeps the cores it needs "
        "under overload."))
    selector: Literal["exact", "onnx"] = Field("exact", description=(
        "Where GQ selection runs: exact is the exact selection (a k-d tree search on the CPU, also beside a GPU: "
        "the same ids on every machine); onnx is gq_select.onnx (the float32 argmax on the model's provider, "
        "scores kept on a GPU; a token on a near-tie can get another id)."))
    max_batch_size: int = Field(8, ge=1, description="Images or grids per inference call.")
    max_queue_delay_ms: float = Field(0.0, ge=0, description=(
        "How long a batch waits for company. 0: a batch is whatever queued while the previous one ran, all a CPU "
        "needs (batch 1 runs as fast per image as batch 8); a GPU gains from 2-5 ms."))
    max_queue_size: int = Field(256, ge=1, description="Waiting items per model and direction; past it, 429.")
    max_concurrent_requests: int = Field(64, ge=1, description=(
        "Requests in flight at once (health probes aside); past it, 429 before the body is read."))
    max_images_per_request: int = Field(32, ge=1, description="Images or grids in one request; past it, 400.")
    max_body_bytes: int = Field(32 * 2**20, ge=1024, description=(
        "Request body limit in bytes; past it, 413. Image bodies are held lower, to what the pixel limit can need "
        "(8 bytes per pixel and 1 MiB per image, a third more as base64 JSON)."))
    # Memory: on the CPU provider the default model's decoder held about 3.3 KB per pixel of a batch (onnxruntime's
    # arena after a batch of 8 at 256x256: 2.2 GiB), so the next two bound the working memory to a few GiB.
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, ge=64, description=(
        "Pixels per image, read from the header before decoding; past it, 413."))
    max_batch_pixels: int = Field(8 * 256 * 256, ge=64, description=(
        "Image pixels per inference call; an image bigger than this runs alone."))
    max_memory_mb: float = Field(0.0, ge=0, description=(
        "Memory budget of the process in MiB (0: none, only the pixel limits above). Set, the server measures "
        "its models at start-up and lowers max_batch_pixels and max_image_pixels so that every worker running "
        "at once stays within it (docs/service.md, memory); in a container, about 85% of its memory limit."))
    alpha: Literal["composite", "refuse"] = Field("composite", description=(
        "Images with transparency: composite them on white, or refuse them with 422 invalid_image."))
    max_concurrent_coding: int = Field(2, ge=1, description=(
        "Compress/decompress requests entropy-coding at once (the context prior holds a core for about 0.2 s per "
        "768x512 image)."))
    request_timeout_s: float = Field(60.0, gt=0, description="Seconds per request for queue and inference; past it, 503.")
    body_timeout_s: float = Field(10.0, gt=0, description=(
        "Seconds a request's body may take to arrive; past it, 408 (a slow client holds an in-flight slot no "
        "longer than this)."))
    drain_timeout_s: float = Field(30.0, ge=0, description=(
        "On SIGTERM, seconds from the signal to the exit: in-flight requests may finish within it, then the rest "
        "are cut (keep it below the orchestrator's grace period: compose gives 40 s)."))
    api_key: SecretStr | None = Field(None, description=(
        "When set, every route but /health/* needs the header 'Authorization: Bearer KEY'."))
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="Log level.")
    engine: Literal["uvicorn", "ray"] = Field("uvicorn", description=(
        "uvicorn: one server process (scale it with replicas behind a balancer, docker-compose.yml); ray: the same "
        "app as a Ray Serve deployment, replicas placed over a Ray cluster (docs/deploy.md)."))
    ray_address: str | None = Field(None, description=(
        "With engine ray: the cluster to join (e.g. ray://head:10001 or auto); unset, a local one is started."))
    replicas: int = Field(1, ge=1, description="With engine ray: replicas to start with (each one loads every model).")
    max_replicas: int | None = Field(None, ge=1, description=(
        "With engine ray: autoscale on requests in flight between replicas and this many (off: a fixed count)."))


def _flag_type(annotation):
    """(argparse type, choices) for a settings field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return str, list(typing.get_args(annotation))
    if args and typing.get_origin(annotation) is not list:  # Optional[X]
        return _flag_type(args[0])
    if annotation is SecretStr:
        return str, None
    return annotation, None


def flags() -> list[tuple[str, str, object, object]]:
    """(field name, flag, field, default as shown to people) for every ServiceSettings field: what the serve
    flags and the configuration table in docs/service.md are made from."""
    out = []
    for name, field in ServiceSettings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "off" if default is None else ", ".join(map(str, default)) if isinstance(default, list) else default
        flag = {"models": "--model", "codecs": "--codec"}.get(name, f"--{name.replace('_', '-')}")
        out.append((name, flag, field, shown))
    return out


def add_arguments(parser: argparse.ArgumentParser, dest_prefix: str = "cfg_") -> None:
    """One flag per ServiceSettings field; unset flags stay None, so environment variables and defaults apply."""
    for name, flag, field, shown in flags():
        # argparse formats help with %: a literal one must be doubled
        help_text = f"{field.description} Env GQTOK_{name.upper()}; default {shown}.".replace("%", "%%")
        if typing.get_origin(field.annotation) is list:
            parser.add_argument(flag, dest=dest_prefix + name, action="append", metavar="DIR_OR_NAME", help=help_text)
            continue
        kind, choices = _flag_type(field.annotation)
        metavar = None if choices else {int: "N", float: "X"}.get(kind, "TEXT")
        parser.add_argument(flag, dest=dest_prefix + name, type=kind, choices=choices, default=None, metavar=metavar,
                            help=help_text)


def from_arguments(args: argparse.Namespace, dest_prefix: str = "cfg_") -> ServiceSettings:
    """ServiceSettings from parsed flags; flags given win over GQTOK_* variables."""
    given = {k[len(dest_prefix):]: v for k, v in vars(args).items() if k.startswith(dest_prefix) and v is not None}
    return ServiceSettings(**given)
