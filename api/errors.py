"""One place turns every failure into OpenAI's error body (the classes live in lathe.errors)."""

from __future__ import annotations

from typing import Any

from lathe.errors import LatheError, dotted_param, error_body, validation_message

_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_STATUS_CODES = {404: "not_found", 405: "method_not_allowed", 409: "invalid_state", 413: "file_too_large"}


def install_handlers(app: Any) -> None:
    """Register the handlers that render every error as `{"error": {...}}`."""
    import logging

    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from sqlalchemy.exc import DataError as SQLDataError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    log = logging.getLogger("lathe.api")

    async def lathe_error(_request, exc: LatheError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    async def http_error(_request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        body = error_body(detail, type=_STATUS_TYPES.get(exc.status_code, "invalid_request_error"),
                          code=_STATUS_CODES.get(exc.status_code))
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def request_validation_error(_request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        message = validation_message(first) if first else "malformed request"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        body = error_body(message, param=dotted_param(first.get("loc", ())), code="invalid_payload")
        return JSONResponse(body, status_code=422)

    async def data_error(_request, exc: Exception) -> JSONResponse:
        # The database refused a value taken from the request: PostgreSQL rejects a NUL character in
        # any text parameter (an id in the path, a cursor, a metadata filter) and integers past a
        # column's range. Bad input, not a server fault (schemathesis found ~20 such 500s).
        log.info("database refused a request value: %s", getattr(exc, "orig", exc))
        body = error_body("A value in the request can't be used (e.g. it contains a NUL character or a number "
                          "out of range).", code="invalid_value")
        return JSONResponse(body, status_code=400)

    async def server_error(_request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body("internal server error", type="server_error"), status_code=500)

    app.add_exception_handler(LatheError, lathe_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, request_validation_error)
    app.add_exception_handler(SQLDataError, data_error)
    app.add_exception_handler(Exception, server_error)
