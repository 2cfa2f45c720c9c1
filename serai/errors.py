"""Domain errors. Each names what went wrong in the domain; the API layer renders them into
the client's own error envelope with the status code given here."""

from __future__ import annotations


class SeraiError(Exception):
    """Base of every error a client can cause or must be told about."""

    status_code = 500
    error_type = "api_error"
    code: str | None = None
    # A refusal: raised before any work was done, so the request is not a run to bill and
    # gives back what it held (a prompt too long, a full waiting line).
    refusal = False

    def __init__(self, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class InvalidRequest(SeraiError):
    status_code = 400
    error_type = "invalid_request_error"
    refusal = True


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class RequestTooLarge(SeraiError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class AuthenticationFailed(SeraiError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(SeraiError):
    status_code = 403
    error_type = "permission_error"
    code = "permission_denied"


class UnknownModel(SeraiError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class NotFound(SeraiError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class Conflict(SeraiError):
    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"


class IdempotencyKeyInUse(Conflict):
    """A call with the same Idempotency-Key is still running; its result will be replayed."""

    code = "idempotency_key_in_use"


class IdempotencyResponseNotRetained(Conflict):
    """The call with this Idempotency-Key finished under zero retention, and the process asked
    does not hold its response: replaying is impossible, running it again would bill twice."""

    code = "idempotency_response_not_retained"


class IdempotencyKeyReused(SeraiError):
    status_code = 422
    error_type = "invalid_request_error"
    code = "idempotency_key_reused"


class EngineUnavailable(SeraiError):
    status_code = 503
    error_type = "server_error"
    code = "engine_unavailable"


class EngineOverloaded(SeraiError):
    """Every sequence is busy and the waiting line is full; the client should retry later."""

    status_code = 503
    error_type = "server_error"
    code = "engine_overloaded"
    refusal = True


class RegionUnavailable(SeraiError):
    """No deployment of the model in the organization's allowed regions can take the request.
    Residency fails closed: the request is never sent to another region."""

    status_code = 503
    error_type = "server_error"
    code = "region_unavailable"


class LimitsUnavailable(SeraiError):
    """The shared limits store (Redis) cannot be reached: nobody is let in unlimited, and the
    client should retry in a moment."""

    status_code = 503
    error_type = "server_error"
    code = "limits_unavailable"


class ContentKeyMissing(SeraiError):
    """A completion should be stored, but the server has no key to encrypt it with: content is
    never stored in clear."""

    status_code = 503
    error_type = "server_error"
    code = "content_key_missing"


class ModelFileError(Exception):
    """A model file cannot be served (missing, unreadable, not a GGUF). Raised at start-up."""


class RateLimited(SeraiError):
    """Too many requests or tokens per minute, or too many in flight: retry after a moment."""

    status_code = 429
    error_type = "requests"
    code = "rate_limit_exceeded"
    # Seconds until a per-minute window frees a unit, when that is what refused the request
    # (None: a refusal that may lift any moment, such as the concurrency cap).
    window_reset_s: float | None = None


class QuotaExceeded(SeraiError):
    """A plan window or the balance is used up. No retry-after: retrying will not help until
    the window rolls on or someone tops up, so SDKs must not retry in a storm."""

    status_code = 429
    error_type = "insufficient_quota"
    code = "insufficient_quota"
