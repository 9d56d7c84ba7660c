"""Model archives (`purpose=model`) for the files routes: core.archives' checks, refusals as 400s.

The checks themselves (member names and types, count, size, compression ratio, weights format) and
the extraction live in core.archives, shared with image datasets; here each refusal becomes a
BadRequest with the same message, param and code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core import archives
from core.archives import Member
from core.errors import DataError
from lathe.errors import BadRequest

__all__ = ["Member", "archive_kind", "extract_archive", "inspect_archive", "safe_parts"]


@contextmanager
def _as_bad_request() -> Iterator[None]:
    try:
        yield
    except DataError as exc:
        raise BadRequest(exc.message, param=exc.param, code=exc.code) from None


def archive_kind(filename: str) -> str:
    """"zip" or "tar" from the upload's name; anything else is a 400."""
    with _as_bad_request():
        return archives.archive_kind(filename)


def safe_parts(name: str) -> tuple[str, ...]:
    """The path components of a member name, or a 400 for anything that could escape the folder."""
    with _as_bad_request():
        return archives.safe_parts(name)


def inspect_archive(path: Path, kind: str, *, max_bytes: int, max_members: int) -> tuple[list[Member], int]:
    """core.archives.inspect_archive; a 400 for any unsafe or unusable content."""
    with _as_bad_request():
        return archives.inspect_archive(path, kind, max_bytes=max_bytes, max_members=max_members)


def extract_archive(path: Path, kind: str, dest: Path, members: list[Member]) -> None:
    """core.archives.extract_archive; a 400 for a corrupt archive (nothing is left under dest)."""
    with _as_bad_request():
        archives.extract_archive(path, kind, dest, members)
