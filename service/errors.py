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


class InvalidImage(ServiceError):
    status, error_type = 422, "invalid_image"


class InvalidTokens(ServiceError):
    status, error_type = 422, "invalid_tokens"


class InvalidBitstream(ServiceError):
    status, error_type = 422, "invalid_bitstream"


class QueueFull(ServiceError):
    status, error_type = 429, "queue_full"


class InferenceFailed(ServiceError):
    status, error_type = 500, "inference_failed"


class NotReady(ServiceError):
    status, error_type = 503, "not_ready"


class RequestTimeout(ServiceError):
    status, error_type = 503, "timeout"


class ShuttingDown(ServiceError):
    status, error_type = 503, "shutting_down"
