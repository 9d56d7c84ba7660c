"""Errors the engine raises for problems in the user's input (never retried).

Each carries a stable `code`, a human message and the offending `param` (a request field such as
`training_file` or `config.max_length`, with a line number in the message where there is one), so
that a failed job can say why in OpenAI's `error = {code, message, param}` shape.
"""

from __future__ import annotations


class EngineError(Exception):
    """A problem with the job's input: bad data, bad model, bad hyperparameters."""

    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "param": self.param}


class DataError(EngineError):
    """A dataset that can't be parsed or doesn't fit the task."""

    code = "invalid_training_file"


class ModelError(EngineError):
    """A base model that can't be found or loaded safely."""

    code = "invalid_model"


class InapplicableFieldError(EngineError):
    """A field the request set that cannot take effect for its job (see core.applicability)."""

    code = "inapplicable_field"


class OutOfMemoryError(EngineError):
    """The job's configuration does not fit the device's memory."""

    code = "out_of_memory"
