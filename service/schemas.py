"""The API's types: enums, JSON request and response models, media types, and the error schema per status.

Routes declare their responses from here, so /openapi.json says what the server really answers: PNG, npy or
the compressed format where it sends bytes, and {"error", "error_type"} for every error status.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

NPY = "application/x-npy"
PNG = "image/png"
COMPRESSED = "application/x-gqtok"  # what /v1/compress answers; /v1/decompress also takes application/octet-stream
OCTET = "application/octet-stream"


class Fit(str, Enum):
    """How an image's sides become multiples of f; no mode resamples the image."""

    pad = "pad"  # replicate the bottom and right edges up to the next multiple; original_size is returned
    crop = "crop"  # centre crop down to the previous multiple
    exact = "exact"  # refuse any other size


class PriorName(str, Enum):
    uniform = "uniform"
    frequency = "frequency"
    context = "context"
    pc = "pc"


class CodebookFormat(str, Enum):
    npy = "npy"
    safetensors = "safetensors"


# -- errors ------------------------------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    """Every error the server answers."""

    error: str = Field(description="What is wrong, naming the field, file or limit.")
    error_type: str = Field(description="A stable machine-readable kind, e.g. invalid_request, image_too_large.")


ERROR_KINDS = {  # status -> what it means here (the error_type values it carries)
    400: "invalid_request: a malformed body, option or query parameter",
    401: "unauthorized: missing or wrong API key",
    404: "unknown_model: no loaded model has that id",
    406: "not_acceptable: an npy answer for images of different sizes",
    409: "model_mismatch: tokens made by another export of the model (model_digest) than the one serving",
    413: "payload_too_large / image_too_large: past max_body_bytes, max_image_pixels or the queue",
    415: "unsupported_media_type: a content type the route does not take",
    422: "invalid_image / invalid_tokens / invalid_bitstream: well-formed but unusable content",
    429: ("queue_full: the model's queue is full; too_many_requests: max_concurrent_requests are in flight; "
          "retry after Retry-After"),
    500: "inference_failed / internal_error",
    503: ("not_ready (warming up, or failing until a probe succeeds) / timeout / shutting_down; retry after "
          "Retry-After (a timeout is better not retried: the server may still be working on it)"),
}


def errors(*statuses: int) -> dict[int, dict]:
    """FastAPI `responses` entries for these error statuses, each with the ErrorBody schema."""
    return {s: {"model": ErrorBody, "description": ERROR_KINDS[s]} for s in statuses}


def binary(*media_types: str, description: str, json_model: type[BaseModel] | None = None) -> dict:
    """A 200 response answering raw bytes in these media types (plus a JSON model when given)."""
    content = {m: {"schema": {"type": "string", "format": "binary"}} for m in media_types}
    if json_model is not None:
        content["application/json"] = {"schema": {"$ref": f"#/components/schemas/{json_model.__name__}"}}
    return {"description": description, "content": content}


def request_body(models: dict[str, type[BaseModel] | None]) -> dict:
    """openapi_extra for a body the route parses itself: media type -> JSON model (None: raw bytes)."""
    content = {}
    for media, model in models.items():
        if model is None:
            content[media] = {"schema": {"type": "string", "format": "binary"}}
        else:
            content[media] = {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
    return {"requestBody": {"required": True, "content": content}}


# -- requests ----------------------------------------------------------------------------------------------------
class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TokenizeRequest(_Request):
    images: list[StrictStr] = Field(description="Base64-encoded PNG, JPEG or WebP files.")
    model: StrictStr | None = Field(None, description="Model id; default: the server's default model.")
    fit: Fit | None = Field(None, description="How sides become multiples of f (default pad).")
    resize: Fit | None = Field(None, description="Deprecated name of fit.", json_schema_extra={"deprecated": True})
    posterior: bool | None = Field(None, description="Also each token's kl_bits and sigma_mean (as the query option).")
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = Field(None, description=(
        "Token budget: each image is first resized (aspect kept, never enlarged) so that its grid has at most this "
        "many tokens; resized_size says to what (as the query option)."))


class MultipartImages(BaseModel):
    image: list[bytes] = Field(description="One file part per image.")


class DetokenizeRequest(_Request):
    tokens: list[Any] = Field(description="One grid [h, w] (T = 1) or [T, h, w] of integer ids, or a list of grids.")
    model: StrictStr | None = Field(None, description="Model id; default: the server's default model.")
    image_size: Annotated[list[Annotated[StrictInt, Field(ge=1)]], Field(min_length=2, max_length=2)] | None = Field(
        None, description="[H, W]: crop the decoded images back to this size (the original_size of tokenize, or its "
                          "resized_size under a token budget).")
    output_size: Annotated[list[Annotated[StrictInt, Field(ge=1)]], Field(min_length=2, max_length=2)] | None = Field(
        None, description="[H, W]: then resize the images to this size (bicubic): under a token budget, the "
                          "original_size of tokenize gives the picture back at its own size.")
    model_digest: StrictStr | None = Field(None, description=(
        "The model_digest of the tokenize answer that made these tokens: refused (409 model_mismatch) unless the "
        "model decoding them is the same export."))


# -- responses ---------------------------------------------------------------------------------------------------
class TokenGrid(BaseModel):
    status: int = Field(200, description="200: this image was tokenized.")
    tokens: list = Field(description="[h, w] ids when T = 1, else [T, h, w].")
    grid_size: list[int] = Field(description="[h, w].")
    tokens_per_position: int
    original_size: list[int] = Field(description="[H, W] of the image as displayed (EXIF orientation applied).")
    resized_size: list[int] = Field(description="[H, W] after the token budget (max_tokens) resized it; the "
                                                "original_size when there was none.")
    padded_size: list[int] = Field(description="[H, W] after fit: what the grid decodes to.")
    kl_bits: list | None = Field(None, description=(
        "posterior=true: each token's KL(posterior || N(0, I)) in bits, shaped like tokens (TDC holds it near "
        "log2 K); a token far above it was costly to say, far below it says little."))
    sigma_mean: list | None = Field(None, description=(
        "posterior=true: the mean of each token's posterior standard deviations, shaped like tokens."))


class ItemError(BaseModel):
    """One image of several that could not be tokenized; the others were."""
    status: int = Field(description="The status this image alone would have had (413, 422).")
    error: str
    error_type: str


class TokenizeResponse(BaseModel):
    model: str
    model_digest: str = Field(description="Digest of the networks and codebook that made these tokens; pass it to "
                                          "detokenize to have tokens of another export refused.")
    fit: Fit
    results: list[TokenGrid | ItemError] = Field(description=(
        "One per image, in order. With several images a bad one gets an ItemError and fails only itself; a "
        "single image's error is the request's."))


class DetokenizeResponse(BaseModel):
    model: str
    model_digest: str = Field(description="Digest of the networks and codebook that decoded these images.")
    images: list[str] = Field(description="Base64 PNG files, one per grid.")


class PriorInfo(BaseModel):
    heldout_bits_per_token: float | None = Field(description="Measured on held-out photos when the prior was fitted.")


class ModelInfo(BaseModel):
    model_id: str
    model_version: str
    model_digest: str = Field(description="sha256 over the digests of the files that decide tokens and pixels "
                                          "(networks, codebook, selection graph): differs between any two exports.")
    ready: bool
    downsample: int = Field(description="f: pixels per token side.")
    latent_channels: int
    token_dim: int
    tokens_per_position: int
    num_codes: int
    bits_per_token: float
    token_layout: str
    sequence_order: str = Field(description="How grids become sequences for an autoregressive model.")
    gq_beta: float
    npy_token_dtype: str
    codebook: dict
    input: dict
    provider: str
    eval: dict | None
    priors: dict[str, PriorInfo]
    limits: dict[str, float | int]


class CodecInfo(BaseModel):
    """A codec model (the discretized-VAE image codec): no tokens, a quality to choose."""
    kind: Literal["codec"] = "codec"
    model_id: str
    model_version: str
    model_digest: str
    ready: bool
    downsample: int = Field(description="f: pixels per latent position side.")
    latent_channels: int
    qualities: int = Field(description="/v1/compress?quality= takes 1 (fewest bits) to this.")
    default_quality: int
    rate_lambdas: list[float] = Field(description="The rate-distortion weight each quality was trained for.")
    provider: str
    eval: dict | None


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]
    codecs: list[CodecInfo] = Field(description="Codec models: /v1/compress and /v1/decompress only.")


class Ready(BaseModel):
    ready: bool
    draining: bool
    saturated: bool = Field(description="Every in-flight slot taken, or a model's queue full: new work would be "
                                        "refused now, so a balancer should send it elsewhere.")
    models: dict[str, bool]


class Live(BaseModel):
    live: bool


class Info(BaseModel):
    name: str
    version: str
    onnxruntime: str
    default_model: str
    models: list[str]
    codecs: list[str] = Field(description="Codec models (compress and decompress only).")
    providers: dict[str, str]
    selector: dict[str, str]
    threads: int
    auth: bool
    limits: dict[str, float | int]
    memory: dict | None = Field(None, description=(
        "With max_memory_mb: the memory model measured at start-up (resident MiB when ready; per model and "
        "direction, fixed MiB and bytes per pixel of a batch) and batch_pixels, the limit it set."))


# added to the schema's components: bodies the routes parse themselves, and answers given as JSONResponse
JSON_BODY_MODELS = (TokenizeRequest, DetokenizeRequest, MultipartImages, DetokenizeResponse)
