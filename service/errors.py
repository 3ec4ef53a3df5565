"""Typed service errors; each maps to one HTTP status and a JSON body {"error", "error_type"}."""

from __future__ import annotations


class ServiceError(Exception):
    status = 500
    error_type = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.headers = message, headers or {}

    def body(self) -> dict:
        return {"error": self.message, "error_type": self.error_type}


class InvalidRequest(ServiceError):
    status, error_type = 400, "invalid_request"


class Unauthorized(ServiceError):
    status, error_type = 401, "unauthorized"


class UnknownModel(ServiceError):
    status, error_type = 404, "unknown_model"


class NotAcceptable(ServiceError):
    status, error_type = 406, "not_acceptable"


class PayloadTooLarge(ServiceError):
    status, error_type = 413, "payload_too_large"


class ImageTooLarge(ServiceError):
    status, error_type = 413, "image_too_large"


class UnsupportedMediaType(ServiceError):
    status, error_type = 415, "unsupported_media_type"


class BodyTimeout(ServiceError):
    status, error_type = 408, "body_timeout"


class ClientClosed(ServiceError):
    """The client went away before its body arrived: nobody reads the answer. Counted under nginx's 499, logged
    without a traceback: a disconnect is the client's doing, not a server error."""
    status, error_type = 499, "client_closed_request"


class ModelMismatch(ServiceError):
    status, error_type = 409, "model_mismatch"


class InvalidImage(ServiceError):
    status, error_type = 422, "invalid_image"


class InvalidTokens(ServiceError):
    status, error_type = 422, "invalid_tokens"


class InvalidBitstream(ServiceError):
    status, error_type = 422, "invalid_bitstream"


class QueueFull(ServiceError):
    status, error_type = 429, "queue_full"


class TooManyRequests(ServiceError):
    status, error_type = 429, "too_many_requests"


class InferenceFailed(ServiceError):
    status, error_type = 500, "inference_failed"


class NotReady(ServiceError):
    status, error_type = 503, "not_ready"


class RequestTimeout(ServiceError):
    status, error_type = 503, "timeout"


class ShuttingDown(ServiceError):
    status, error_type = 503, "shutting_down"


def install_handlers(app, log=None) -> None:
    """Answer every error of a FastAPI app as JSON {"error", "error_type"}: ServiceErrors with their status,
    request validation as 400 invalid_request, routing as 404 not_found / 405 method_not_allowed, and
    anything unexpected as 500 internal_error (logged, its message not leaked)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def respond(e: ServiceError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ServiceError)
    async def _service_error(request, e: ServiceError):
        return respond(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        detail = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        return respond(InvalidRequest(detail or "invalid request"))

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        # e.headers carries a 405's Allow (RFC 9110 requires it)
        return JSONResponse({"error": str(e.detail), "error_type": kind}, status_code=e.status_code,
                            headers=e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        if log is not None:
            log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"error": f"internal error: {type(e).__name__}", "error_type": "internal_error"},
                            status_code=500)
