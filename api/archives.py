"""Model archives (`purpose=model`): a .zip or .tar(.gz) of a Hugging Face folder.

Everything is checked from the archive's index BEFORE a byte is extracted: member names (no
absolute paths, `..`, NUL or backslashes), member types (regular files and folders only), count,
total size and compression ratio (zip bombs), and the weights format (safetensors only: pickled
weights run code when loaded). Extraction then writes each member by hand (never `extractall`) into
a fresh folder, re-checking the sizes the index promised."""

from __future__ import annotations

import lzma
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lathe.errors import BadRequest

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_RATIO = 100  # uncompressed/compressed for one zip member; weights barely compress
RATIO_MIN_BYTES = 1024 * 1024  # small text files (configs, vocabularies) may compress well
_CHUNK = 1024 * 1024


def archive_kind(filename: str) -> str:
    """"zip" or "tar" from the upload's name; anything else is a 400."""
    name = filename.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        return "tar"
    raise BadRequest("A model must be uploaded as a .zip, .tar, .tar.gz or .tgz of a Hugging Face model folder.",
                     param="file", code="invalid_file_format")


@dataclass(frozen=True)
class Member:
    name: str  # the archive's own name, to read it back
    parts: tuple[str, ...]  # the checked relative path
    size: int
    is_dir: bool


def _bad(message: str, code: str = "invalid_model_archive") -> BadRequest:
    return BadRequest(message, param="file", code=code)


def safe_parts(name: str) -> tuple[str, ...]:
    """The path components of a member name, or a 400 for anything that could escape the folder."""
    if "\x00" in name or "\\" in name:
        raise _bad(f"Archive member {name!r} has a NUL or backslash in its name.")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise _bad(f"Archive member {name!r} has an absolute path.")
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if ".." in parts:
        raise _bad(f"Archive member {name!r} points outside the archive ('..').")
    if not parts:
        raise _bad(f"Archive member {name!r} has an empty name.")
    return parts


def _zip_members(path: Path) -> list[Member]:
    members = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            mode = info.external_attr >> 16
            parts = safe_parts(info.filename)  # first: ZipInfo.is_dir() raises IndexError on an empty name
            is_dir = info.filename.endswith("/")
            if stat.S_ISLNK(mode):
                raise _bad(f"Archive member {info.filename!r} is a symbolic link; only regular files are allowed.")
            if mode and stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise _bad(f"Archive member {info.filename!r} is not a regular file.")
            if info.flag_bits & 0x1:
                raise _bad(f"Archive member {info.filename!r} is encrypted.")
            if (not is_dir and info.file_size >= RATIO_MIN_BYTES
                    and info.file_size > MAX_RATIO * max(info.compress_size, 1)):
                raise _bad(f"Archive member {info.filename!r} expands more than {MAX_RATIO}x (zip bomb?).")
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
    """Check an archive without extracting it. Returns the members to extract (paths relative to
    the model folder, a single top folder stripped) and their total size.

    Raises:
        BadRequest: any unsafe or unusable content (code "unsafe_model_weights" for pickled weights).
    """
    try:
        members = _zip_members(path) if kind == "zip" else _tar_members(path)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, NotImplementedError, ValueError) as exc:
        raise _bad(f"Not a readable {kind} archive: {exc}") from None
    if len(members) > max_members:
        raise _bad(f"Archive has {len(members)} members; at most {max_members} are allowed.")
    total = sum(m.size for m in members)
    if total > max_bytes:
        raise _bad(f"Archive expands to {total} bytes; at most {max_bytes} are allowed.")

    files = [m for m in members if not m.is_dir]
    seen: set[tuple[str, ...]] = set()
    for m in files:
        if m.parts in seen:
            raise _bad(f"Archive member {m.name!r} appears twice.")
        seen.add(m.parts)
    # A path can't be a file and a folder at once ("d" and "d/x", or "v/" and "v"): extraction would fail.
    folders = {m.parts for m in members if m.is_dir} | {m.parts[:i] for m in members for i in range(1, len(m.parts))}
    for m in files:
        if m.parts in folders:
            raise _bad(f"Archive member {m.name!r} is a file, but other members use it as a folder.")
    tops = {m.parts[0] for m in members}
    if len(tops) == 1 and (next(iter(tops)), "config.json") in seen:
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
    """Write the checked `members` under `dest` (which must not exist). On error nothing is left."""
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
