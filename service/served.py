"""The models a server holds: loading and verifying each directory, its batchers, its token compressor, and warm-up;
and the codec models beside them (ServedCodec: compress and decompress only)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from gqtok.core.artifact import ArtifactError, load_artifact
from gqtok.core.bitstream import TokenCompressor
from gqtok.core.models import find_model
from gqtok.core.priors import fit_record
from gqtok.service.batcher import Batcher
from gqtok.service.memory import returning_memory
from gqtok.service.metrics import ServiceMetrics
from gqtok.service.compressor import CodecCompressor
from gqtok.service.runtime import TokenizerRuntime, inference_threads, one_blas_thread
from gqtok.service.settings import ServiceSettings

log = logging.getLogger("gqtok.service")


@dataclass
class ServedModel:
    runtime: TokenizerRuntime
    tokenize: Batcher
    detokenize: Batcher
    compressor: TokenCompressor
    prior_bits: dict  # prior -> held-out bits per token, as recorded when the priors were fitted
    warmed: bool = False

    @property
    def ready(self) -> bool:
        """Warmed up, and neither batcher failing (service/batcher.py, health)."""
        return self.warmed and self.tokenize.healthy and self.detokenize.healthy

    @property
    def manifest(self):
        return self.runtime.manifest

    @property
    def headers(self) -> dict[str, str]:
        """Response headers naming what answered, so that a cache can notice a re-exported model."""
        return identity_headers(self.manifest) | {"x-gqtok-codebook-sha256": self.manifest.codebook.sha256}

    @property
    def model_digest(self) -> str:
        return self.manifest.model_digest

    @property
    def token_dtype(self):
        return np.uint16 if self.manifest.num_codes <= 2**16 else np.int32


def identity_headers(m) -> dict[str, str]:
    """The response headers that name the model that answered (id, version, the digest of its networks)."""
    return {"x-gqtok-model": m.model_id, "x-gqtok-model-version": m.model_version,
            "x-gqtok-model-digest": m.model_digest}


def load_models(settings: ServiceSettings, metrics: ServiceMetrics) -> dict[str, ServedModel]:
    """Find, load, verify and wrap every model; raises ArtifactError or FileNotFoundError naming what is wrong."""
    models: dict[str, ServedModel] = {}
    inference_threads(settings.threads, settings.inference_nice)  # sessions' and the search's, at the inference nice
    one_blas_thread()
    for spec in settings.models:
        directory = find_model(spec)
        artifact = load_artifact(directory)
        if artifact.manifest.kind == "codec":
            raise ArtifactError(f"{spec} is a codec model ({artifact.manifest.model_id}): serve it with --codec "
                                f"{spec} (GQTOK_CODECS) beside a tokenizer")
        rt = TokenizerRuntime(artifact, device=settings.device, threads=settings.threads, selector=settings.selector)
        mid = artifact.manifest.model_id
        if mid in models:
            raise ArtifactError(f"two model directories share the model id {mid!r}")

        def observe(direction, mid=mid):
            return lambda t: metrics.observe_batch(mid, direction, t)

        common = dict(max_batch_size=settings.max_batch_size, max_delay_s=settings.max_queue_delay_ms / 1e3,
                      max_queue=settings.max_queue_size, max_batch_pixels=settings.max_batch_pixels,
                      worker_nice=settings.inference_nice)
        f = artifact.manifest.downsample
        image, grid = np.zeros((1, 2 * f, 2 * f, 3), np.uint8), np.zeros((1, artifact.manifest.tokens_per_position, 2, 2), np.int64)
        models[mid] = ServedModel(
            runtime=rt,
            # tokenize answers float64 [3, T, h, w] per image: ids, KL bits, mean sigma (rt.tokenize_posterior)
            tokenize=Batcher(f"{mid}/tokenize", returning_memory(rt.tokenize_posterior), on_batch=observe("tokenize"),
                             pixels_of=lambda key: key[0] * key[1], probe=lambda rt=rt: rt.tokenize(image),
                             **common),  # key: image shape (H, W, 3)
            detokenize=Batcher(f"{mid}/detokenize", returning_memory(rt.detokenize), on_batch=observe("detokenize"),
                               pixels_of=lambda key, f=f: key[1] * key[2] * f * f,
                               probe=lambda rt=rt: rt.detokenize(grid), **common),  # key: (T, h, w)
            compressor=TokenCompressor(artifact),
            prior_bits=fit_record(artifact).get("heldout_bits_per_token", {}),
        )
        log.info("loaded model %s from %s on %s", mid, directory, rt.provider)
    return models


def warm_up(model: ServedModel) -> None:
    """One encode and decode before the model is reported ready."""
    f = model.manifest.downsample
    ids = model.runtime.tokenize(np.zeros((1, 2 * f, 2 * f, 3), np.uint8))
    model.runtime.detokenize(ids)
    model.warmed = True


@dataclass
class ServedCodec:
    """A codec model: /v1/compress?model=ID&quality=N and /v1/decompress of its streams. Its networks run inside a
    coding slot (max_concurrent_coding at once), not on batchers."""
    compressor: CodecCompressor
    warmed: bool = False

    @property
    def ready(self) -> bool:
        return self.warmed

    @property
    def manifest(self):
        return self.compressor.manifest

    @property
    def headers(self) -> dict[str, str]:
        return identity_headers(self.manifest)


def load_codecs(settings: ServiceSettings, taken: set[str]) -> dict[str, ServedCodec]:
    """Every codec model of settings.codecs (after load_models: the thread pool is shared); `taken`: the
    tokenizers' ids, which a codec may not reuse."""
    codecs: dict[str, ServedCodec] = {}
    for spec in settings.codecs:
        artifact = load_artifact(find_model(spec))
        mid = artifact.manifest.model_id
        if artifact.manifest.kind != "codec":
            raise ArtifactError(f"{spec} is a {artifact.manifest.kind} model ({mid}), not a codec: serve it with "
                                f"--model {spec}")
        if mid in codecs or mid in taken:
            raise ArtifactError(f"two model directories share the model id {mid!r}")
        codecs[mid] = ServedCodec(CodecCompressor(artifact, device=settings.device, threads=settings.threads))
        log.info("loaded codec %s from %s", mid, artifact.directory)
    return codecs


def warm_up_codec(codec: ServedCodec) -> None:
    """One compress and decompress at every quality before the codec is reported ready."""
    f = codec.manifest.downsample
    for quality in range(1, codec.manifest.codec.qualities + 1):
        codec.compressor.decompress(codec.compressor.compress(np.zeros((2 * f, 2 * f, 3), np.uint8), None, quality))
    codec.warmed = True
