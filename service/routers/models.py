"""GET /v1/models, /v1/models/{id} (manifest metadata, limits, priors) and /v1/models/{id}/codebook."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from gqtok.core.layout import SEQUENCE_ORDER
from gqtok.service.requests import npy_bytes
from gqtok.service.schemas import NPY, OCTET, CodebookFormat, CodecInfo, ModelInfo, ModelList, binary
from gqtok.service.schemas import errors as error_responses
from gqtok.service.served import ServedCodec, ServedModel
from gqtok.service.state import ServiceState, get_state

router = APIRouter(prefix="/v1/models", tags=["models"])


def model_metadata(served: ServedModel, state: ServiceState) -> dict:
    m, settings = served.manifest, state.settings
    return {
        "model_id": m.model_id, "model_version": m.model_version, "model_digest": m.model_digest,
        "ready": served.ready,
        "downsample": m.downsample, "latent_channels": m.latent_channels, "token_dim": m.token_dim,
        "tokens_per_position": m.tokens_per_position, "num_codes": m.num_codes,
        "bits_per_token": float(np.log2(m.num_codes)), "token_layout": m.token_layout,
        "sequence_order": SEQUENCE_ORDER, "gq_beta": m.gq_beta,
        "npy_token_dtype": np.dtype(served.token_dtype).name,
        "codebook": m.codebook.model_dump(), "input": m.input.model_dump(),
        "provider": served.runtime.provider, "eval": m.eval,
        "priors": {name: {"heldout_bits_per_token": served.prior_bits.get(name)} for name in served.compressor.priors},
        "limits": {"max_image_pixels": settings.max_image_pixels, "max_batch_size": settings.max_batch_size,
                   "max_batch_pixels": settings.max_batch_pixels,
                   "max_images_per_request": settings.max_images_per_request,
                   "max_body_bytes": settings.max_body_bytes, "request_timeout_s": settings.request_timeout_s},
    }


def codec_metadata(served: ServedCodec) -> dict:
    m, spec = served.manifest, served.manifest.codec
    return {"kind": "codec", "model_id": m.model_id, "model_version": m.model_version,
            "model_digest": m.model_digest, "ready": served.ready, "downsample": m.downsample,
            "latent_channels": m.latent_channels, "qualities": spec.qualities, "default_quality": spec.default_quality,
            "rate_lambdas": spec.rate_lambdas, "provider": served.compressor.providers[0], "eval": m.eval}


@router.get("", summary="Loaded models", response_model=ModelList, responses=error_responses(401, 503))
async def list_models(state: ServiceState = Depends(get_state)):
    return {"default": state.default, "models": [model_metadata(m, state) for m in state.models.values()],
            "codecs": [codec_metadata(c) for c in state.codecs.values()]}


@router.get("/{model_id}", summary="One model's metadata (a tokenizer's, or a codec's)",
            response_model=ModelInfo | CodecInfo, responses=error_responses(400, 401, 404, 503))
async def get_model_info(model_id: str, state: ServiceState = Depends(get_state)):
    if model_id in state.codecs:
        return codec_metadata(state.codecs[model_id])
    return model_metadata(state.known_model(model_id), state)


@router.get("/{model_id}/codebook", summary="The model's codebook, float32 [K, d]",
            response_class=Response,
            responses={200: binary(NPY, OCTET, description="npy array, or the safetensors file (format=safetensors)"),
                       **error_responses(400, 401, 404, 503)})
async def get_codebook(model_id: str, state: ServiceState = Depends(get_state),
                       format: CodebookFormat = Query(CodebookFormat.npy, description="npy or safetensors")):
    served = state.known_model(model_id)
    if format is CodebookFormat.npy:
        return Response(npy_bytes(served.runtime.artifact.codebook), media_type=NPY)
    return Response(served.runtime.artifact.codebook_file(), media_type=OCTET)
