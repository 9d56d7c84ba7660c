"""Domain errors with an HTTP status and OpenAI's error body, rendered by one handler."""

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
