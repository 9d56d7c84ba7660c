"""Archives from users, judged from their index before a byte is extracted. Torch-free.

Two uploads are archives: an image dataset (a .zip of label folders, read into memory member by
member by core.datasets.images) and a base model (a .zip or .tar(.gz) of a Hugging Face folder,
extracted to disk for the files API). Both go through the same checks: member names (no absolute
paths, `..`, NUL or backslashes), member types (regular files and folders only: no links, devices or
encrypted members), member count and total size, compression ratio (zip bombs), no member twice.
A model archive must then hold safetensors (or GGUF) weights and no pickled ones (they run code
when loaded), and is extracted by hand (never `extractall`) into a fresh folder, re-checking the
sizes the index promised.

Every refusal is a DataError naming `param`, with `code`: the model upload's "invalid_model_archive"
(api.archives turns it into a 400), an image dataset's default "invalid_training_file".
"""

from __future__ import annotations

import lzma
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from core.errors import DataError

MAX_RATIO = 100  # uncompressed / compressed for one member; encoded images and weights barely compress
RATIO_MIN_BYTES = 1024 * 1024  # below this a high ratio is harmless (a flat PNG, a config, a vocabulary)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MODEL_ARCHIVE = "invalid_model_archive"  # the code of a refused model upload
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Member:
    name: str  # the archive's own name, to read it back
    parts: tuple[str, ...]  # the checked relative path
    size: int
    is_dir: bool


# --- Checks of any archive ------------------------------------------------------------------------


def safe_parts(name: str, *, param: str = "file", code: str | None = MODEL_ARCHIVE) -> tuple[str, ...]:
    """The path components of a member name.

    Raises:
        DataError: a name that could point outside the folder it is extracted to (absolute, with
            `..`, a NUL or a backslash), or an empty one.
    """
    if "\x00" in name or "\\" in name:
        raise DataError(f"Archive member {name!r} has a NUL or backslash in its name.", param=param, code=code)
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"Archive member {name!r} has an absolute path.", param=param, code=code)
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if ".." in parts:
        raise DataError(f"Archive member {name!r} points outside the archive ('..').", param=param, code=code)
    if not parts:
        raise DataError(f"Archive member {name!r} has an empty name.", param=param, code=code)
    return parts


def check_size(members: int, total: int, *, max_members: int, max_bytes: int, param: str = "file",
               code: str | None = MODEL_ARCHIVE) -> None:
    """Refuse an archive of more than `max_members` members or `max_bytes` uncompressed bytes.

    Raises:
        DataError: naming the count or size and the limit.
    """
    if members > max_members:
        raise DataError(f"The archive has {members} members; at most {max_members} are allowed.",
                        param=param, code=code)
    if total > max_bytes:
        raise DataError(f"The archive expands to {total} bytes; at most {max_bytes} are allowed.",
                        param=param, code=code)


def check_zip_member(info: zipfile.ZipInfo, *, param: str = "file", code: str | None = MODEL_ARCHIVE) -> None:
    """Refuse a zip member that is a link or device, is encrypted, or expands more than MAX_RATIO times.

    Raises:
        DataError: naming the member.
    """
    name = info.filename
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise DataError(f"Archive member {name!r} is a symbolic link; only regular files are allowed.",
                        param=param, code=code)
    if mode and stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise DataError(f"Archive member {name!r} is not a regular file.", param=param, code=code)
    if info.flag_bits & 0x1:
        raise DataError(f"Archive member {name!r} is encrypted.", param=param, code=code)
    if (not name.endswith("/") and info.file_size >= RATIO_MIN_BYTES
            and info.file_size > MAX_RATIO * max(info.compress_size, 1)):
        raise DataError(f"Archive member {name!r} expands more than {MAX_RATIO}x (zip bomb?).", param=param, code=code)


def check_unique(files: Iterable[tuple[str, tuple[str, ...]]], *, param: str = "file",
                 code: str | None = MODEL_ARCHIVE) -> None:
    """Refuse two files (name, checked parts) at one path ("a/b" and "a/./b" are one).

    Raises:
        DataError: naming the second one.
    """
    seen: set[tuple[str, ...]] = set()
    for name, parts in files:
        if parts in seen:
            raise DataError(f"Archive member {name!r} appears twice.", param=param, code=code)
        seen.add(parts)


# --- Model archives -------------------------------------------------------------------------------


def archive_kind(filename: str) -> str:
    """"zip" or "tar" from the upload's name.

    Raises:
        DataError: code "invalid_file_format" for any other name.
    """
    name = filename.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        return "tar"
    raise DataError("A model must be uploaded as a .zip, .tar, .tar.gz or .tgz of a Hugging Face model folder.",
                    param="file", code="invalid_file_format")


def _bad(message: str, code: str = MODEL_ARCHIVE) -> DataError:
    return DataError(message, param="file", code=code)


def _zip_members(path: Path) -> list[Member]:
    members = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            parts = safe_parts(info.filename)  # first: ZipInfo.is_dir() raises IndexError on an empty name
            check_zip_member(info)
            is_dir = info.filename.endswith("/")
            members.append(Member(info.filename, parts, 0 if is_dir else info.file_size, is_dir))
    return members


def _tar_members(path: Path) -> list[Member]:
    members = []
    with tarfile.open(path, "r:*") as tf:
        for info in tf:
            if info.issym() or info.islnk():
                raise _bad(f"Archive member {info.name!r} is a link; only regular files are allowed.")
            if not (info.isreg() or info.isdir()) or info.issparse():
                raise _bad(f"Archive member {info.name!r} is not a regular file.")
            members.append(Member(info.name, safe_parts(info.name), info.size if info.isreg() else 0, info.isdir()))
    return members


def inspect_archive(path: Path, kind: str, *, max_bytes: int, max_members: int) -> tuple[list[Member], int]:
    """Check a model archive without extracting it.

    Returns:
        The members to extract (paths relative to the model folder, a single top folder stripped)
        and their total size.

    Raises:
        DataError: param "file", any unsafe or unusable content (code "unsafe_model_weights" for
            pickled weights, else "invalid_model_archive").
    """
    try:
        members = _zip_members(path) if kind == "zip" else _tar_members(path)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, NotImplementedError, ValueError) as exc:
        raise _bad(f"Not a readable {kind} archive: {exc}") from None
    total = sum(m.size for m in members)
    check_size(len(members), total, max_members=max_members, max_bytes=max_bytes)

    files = [m for m in members if not m.is_dir]
    check_unique((m.name, m.parts) for m in files)
    # A path can't be a file and a folder at once ("d" and "d/x", or "v/" and "v"): extraction would fail.
    folders = {m.parts for m in members if m.is_dir} | {m.parts[:i] for m in members for i in range(1, len(m.parts))}
    for m in files:
        if m.parts in folders:
            raise _bad(f"Archive member {m.name!r} is a file, but other members use it as a folder.")
    tops = {m.parts[0] for m in members}
    if len(tops) == 1 and any(m.parts == (*tops, "config.json") for m in files):
        members = [Member(m.name, m.parts[1:], m.size, m.is_dir) for m in members if len(m.parts) > 1]
        files = [m for m in members if not m.is_dir]

    pickled = [m.name for m in files if m.parts[-1].lower().endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise _bad(f"Archive holds pickled weights ({pickled[0]!r}); upload safetensors only.", "unsafe_model_weights")
    gguf = any(m.parts[-1].lower().endswith(".gguf") for m in files)  # a GGUF file carries its own config
    if not gguf and not any(m.parts == ("config.json",) for m in files):
        raise _bad("Archive has no config.json at its top (or in a single top folder).")
    if not gguf and not any(m.parts[-1].endswith(".safetensors") for m in files):
        raise _bad("Archive has no *.safetensors (or .gguf) weights.")
    return members, total


def _copy(src, dest: Path, limit: int, name: str) -> None:
    written = 0
    with open(dest, "wb") as out:
        while True:
            try:  # reading the archive: an OSError here is corrupt input (a bad offset, a bad bz2 stream)
                chunk = src.read(_CHUNK)
            except OSError as exc:
                raise _bad(f"Archive member {name!r} is corrupt: {exc}") from None
            if not chunk:
                break
            written += len(chunk)
            if written > limit:
                raise _bad(f"Archive member {name!r} is larger than its header says.")
            out.write(chunk)


def extract_archive(path: Path, kind: str, dest: Path, members: list[Member]) -> None:
    """Write the checked `members` under `dest` (which must not exist). On error nothing is left.

    Raises:
        DataError: param "file", code "invalid_model_archive": a corrupt archive or member.
    """
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    root = tmp.resolve()
    try:
        archive = zipfile.ZipFile(path) if kind == "zip" else tarfile.open(path, "r:*")
        with archive:
            # By exact name: tarfile.getmember() strips a trailing '/' and misses a file named "d/".
            tar_infos = {i.name: i for i in archive.getmembers()} if kind == "tar" else {}
            for m in members:
                target = root.joinpath(*m.parts)
                if not target.resolve().is_relative_to(root):
                    raise _bad(f"Archive member {m.name!r} points outside the archive.")
                if m.is_dir:
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                if kind == "zip":
                    try:
                        src = archive.open(m.name)
                    except OSError as exc:  # a local header offset that points nowhere
                        raise _bad(f"Archive member {m.name!r} is corrupt: {exc}") from None
                else:
                    info = tar_infos.get(m.name)
                    src = archive.extractfile(info) if info is not None else None
                    if src is None:
                        raise _bad(f"Archive member {m.name!r} is not a regular file.")
                with src:
                    _copy(src, target, m.size, m.name)
        tmp.rename(dest)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, NotImplementedError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _bad(f"Archive is corrupt: {exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
