"""The one exception hierarchy: every error a user can see, with its HTTP status and OpenAI error type."""

from __future__ import annotations


class EmbservError(Exception):
    """An error with a kind. The ingress maps it once to OpenAI's error shape."""

    status: int = 500
    type: str = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def __reduce__(self):
        # Errors cross process boundaries (replica -> ingress); keep param and code on the way.
        return (_rebuild, (type(self), self.message, self.param, self.code))

    def to_body(self, request_id: str | None = None) -> dict:
        return error_body(self.message, self.type, self.param, self.code, request_id)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None,
               request_id: str | None = None) -> dict:
    """OpenAI's error shape, its four keys exactly; the request's id beside it (`request_id`, as Anthropic's API
    puts it), so that a user who reports an error hands the operator the id that its log lines carry."""
    body: dict = {"error": {"message": message, "type": type, "param": param, "code": code}}
    if request_id:
        body["request_id"] = request_id
    return body


def _rebuild(cls: type[EmbservError], message: str, param: str | None, code: str | None) -> EmbservError:
    return cls(message, param=param, code=code)


class InvalidRequest(EmbservError):
    status = 400
    type = "invalid_request_error"


class InputTooLong(InvalidRequest):
    """An input over the model's maximum without truncate. `tokens` and `maximum` (inside a process only; they
    do not cross to the ingress, which needs the message alone) let another front end word it its own way."""

    default_code = "context_length_exceeded"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 tokens: int | None = None, maximum: int | None = None) -> None:
        super().__init__(message, param=param, code=code)
        self.tokens = tokens
        self.maximum = maximum


class Unauthorized(EmbservError):
    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class ModelNotFound(EmbservError):
    status = 404
    type = "invalid_request_error"
    default_code = "model_not_found"


class PayloadTooLarge(EmbservError):
    status = 413
    type = "invalid_request_error"
    default_code = "payload_too_large"


class Overloaded(EmbservError):
    """The service refuses work it cannot queue; clients should retry after a pause."""

    status = 503
    type = "server_error"
    default_code = "overloaded"


class Unavailable(EmbservError):
    status = 503
    type = "server_error"
    default_code = "service_unavailable"


class OutOfMemory(Unavailable):
    """One input alone did not fit the replica's GPU memory, after its group was split down to it; the
    other inputs of its group are still answered."""

    default_code = "out_of_memory"


class NonFiniteOutput(EmbservError):
    """The model produced NaN or infinite values for an input: never sent as a vector. `rows` (inside a
    replica only) are the group's rows affected and `vectors` the group's output, so the others can
    still be answered; neither crosses a process boundary."""

    status = 500
    type = "server_error"
    default_code = "non_finite_output"
    HINT = ("the model produced non-finite values (NaN or infinity) for {what}; a model that overflows in "
            "float16 or bfloat16 usually runs in float32 (EMB_PROVIDER_DTYPE=float32)")

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 rows: tuple[int, ...] = (), vectors: object = None) -> None:
        super().__init__(message, param=param, code=code)
        self.rows = rows
        self.vectors = vectors


class Cancelled(EmbservError):
    """The caller went away; nobody reads this, it only keeps the work from being done."""

    status = 499
    type = "invalid_request_error"
    default_code = "cancelled"


class RequestTimeout(EmbservError):
    status = 504
    type = "server_error"
    default_code = "timeout"


class UnsupportedModel(EmbservError):
    """A model whose sentence-transformers pipeline embserve cannot compute exactly: refused when a replica
    loads it (the deployment's start fails with this message), never served with different vectors."""

    status = 500
    type = "server_error"
    default_code = "unsupported_model"
