"""Domain errors: each carries an HTTP status and OpenAI's error body `{"error": {message, type, param,
code}}`. Raised by lathe's services and api's routes alike, rendered by api.errors' one handler;
the worker turns them into a job's `error`. No web framework is imported here."""

from __future__ import annotations

from typing import Any


class LatheError(Exception):
    status_code = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status_code: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's error object (a job's `error`)."""
        return {"message": self.message, "param": self.param, "code": self.code}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(LatheError):
    status_code = 400


class Unauthorized(LatheError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(LatheError):
    status_code = 404
    code = "not_found"


class Conflict(LatheError):
    status_code = 409
    code = "invalid_state"


class TooLarge(LatheError):
    status_code = 413
    code = "file_too_large"


class RateLimited(LatheError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


# Tags pydantic puts in an error's location for union members and validators; they are not fields.
_LOC_TAGS = {"int", "float", "str", "bool", "list", "dict", "none", "bytes"}


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def dotted_param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """`("body", "config", "optimizer", "learning_rate")` -> "config.optimizer.learning_rate"."""
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int):
            parts.append(str(item))
            continue
        text = str(item)
        if i == 0 and text in ("body", "query", "path", "header", "cookie"):
            continue
        if text in _LOC_TAGS or not text.replace("_", "a").replace("-", "a").isalnum() or "-" in text:
            continue  # "constrained-int", "literal['auto']", "function-after[...]"
        parts.append(text)
    return ".".join(parts) or None


def validation_message(error: dict[str, Any]) -> str:
    param = dotted_param(error.get("loc", ()))
    msg = str(error.get("msg", "invalid value"))
    return f"{param}: {msg}" if param else msg
