"""Streaming multipart upload: the request body goes to disk chunk by chunk (hashed on the way),
so memory stays flat for multi-GB files and the size cap is enforced before the bytes land."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import anyio
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from lathe.errors import BadRequest, TooLarge

MAX_FIELD_BYTES = 4096  # a plain form field (purpose) is a short string
MAX_PARTS = 16
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    path: Path | None = None
    bytes: int = 0
    sha256: str = ""


def clean_filename(raw: str) -> str:
    """The client's name reduced to metadata: last path component, no control characters."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = _CONTROL.sub("", name).strip()
    if len(name) > 255:  # keep the end, where the extension (.csv, .tar.gz) is
        name = name[:239] + name[-16:]
    return name or "upload"


class _Receiver:
    """Callbacks for python-multipart: headers per part, file bytes to `dest`, fields to memory."""

    def __init__(self, dest: Path, max_bytes: int):
        self.dest, self.max_bytes = dest, max_bytes
        self.result = Upload()
        self._hash = hashlib.sha256()
        self._out: BinaryIO | None = None
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._is_file = False
        self._field = bytearray()
        self._parts = 0

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin, "on_header_field": self._hfield, "on_header_value": self._hvalue,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_done,
            "on_part_data": self._data, "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise BadRequest("Too many parts in the multipart body.")
        self._headers, self._name, self._is_file, self._field = {}, None, False, bytearray()

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _hvalue(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_done(self) -> None:
        _, opts = parse_options_header(self._headers.get(b"content-disposition", b"").decode("latin-1"))
        self._name = opts.get(b"name", b"").decode("utf-8", "replace")
        if self._name == "file" and b"filename" in opts:
            if self._out is not None:
                raise BadRequest("Send exactly one file.", param="file")
            self._is_file = True
            self.result.filename = clean_filename(opts[b"filename"].decode("utf-8", "replace"))
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            self._out = open(self.dest, "wb")
            self.result.path = self.dest

    def _data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._is_file:
            self.result.bytes += len(chunk)
            if self.result.bytes > self.max_bytes:
                raise TooLarge(f"File exceeds the upload limit of {self.max_bytes} bytes.", param="file")
            self._hash.update(chunk)
            assert self._out is not None
            self._out.write(chunk)
        else:
            self._field += chunk
            if len(self._field) > MAX_FIELD_BYTES:
                raise BadRequest(f"Form field {self._name!r} is too long.", param=self._name or None)

    def _part_end(self) -> None:
        if self._is_file:
            assert self._out is not None
            self._out.flush()
        elif self._name:
            self.result.fields[self._name] = self._field.decode("utf-8", "replace")

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
        self.result.sha256 = self._hash.hexdigest()


async def receive_upload(request: Request, *, dest: Path, max_bytes: int) -> Upload:
    """Parse a multipart body, writing its `file` part to `dest`. On any error the partial file is
    removed and the error propagates (413 past `max_bytes`)."""
    ctype, opts = parse_options_header(request.headers.get("content-type"))
    if ctype != b"multipart/form-data" or not opts.get(b"boundary"):
        raise BadRequest("Expected a multipart/form-data body with `file` and `purpose`.", param="file")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes + 1024 * 1024:
        raise TooLarge(f"File exceeds the upload limit of {max_bytes} bytes.", param="file")
    receiver = _Receiver(dest, max_bytes)
    parser = MultipartParser(opts[b"boundary"], receiver.callbacks(), max_size=max_bytes + 1024 * 1024)
    try:
        async for chunk in request.stream():
            if chunk:
                # Hashing and the disk write happen off the event loop.
                await anyio.to_thread.run_sync(parser.write, chunk)
        parser.finalize()
    except MultipartParseError as exc:
        receiver.close()
        dest.unlink(missing_ok=True)
        raise BadRequest(f"Malformed multipart body: {exc}", param="file") from None
    except BaseException:
        receiver.close()
        dest.unlink(missing_ok=True)
        raise
    receiver.close()
    return receiver.result
