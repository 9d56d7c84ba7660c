"""A worker-local cache of prepared inputs, keyed by content, bounded, least recently used out.

What a job spends before its first step and the next job on the same inputs would spend again:
a GGUF base model dequantized into a safetensors folder (core.loading.convert_gguf), and the
expensive encoding of each dataset split (tokenization, image decoding and resizing). An entry's
key is a JSON-able dict naming what it was made from by content hash (the file's bytes, the
texts, the tokenizer's own definition) and every option that shaped it, so a search trial, an
ensemble member or a retry on the same data finds it, and a change to any input misses.

Entries are folders under `root/entries`, named by the sha256 of their key. Safe under concurrent
jobs and processes: an entry is built in a private folder and renamed into place (the first
builder wins; a loser uses the winner's); a reader holds a shared flock on the entry while it
loads; eviction (oldest use first, until the entries fit in `max_bytes`) holds the cache's own
lock and skips any entry someone is reading. An entry that fails to load is dropped and rebuilt.
Stored values are arrays (.npy, never pickled), ragged int lists and JSON.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from core.durable import fsync_tree

T = TypeVar("T")
FORMAT = 1  # bump when what an entry holds changes meaning: every older entry then misses
STALE_BUILD_SECONDS = 3600  # a private build folder this old belongs to a builder that died


def digest(parts: Iterable[str | bytes]) -> str:
    """sha256 of a sequence of strings, each length-prefixed (so ["ab", "c"] != ["a", "bc"])."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **key}, sort_keys=True, default=str).encode()).hexdigest()


class InputCache:
    """Content-keyed entries under `root`, at most `max_bytes` of them (the entry just made aside)."""

    def __init__(self, root: Path, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.entries = self.root / "entries"
        self.building = self.root / "building"
        for folder in (self.entries, self.building, self.root / "hashes"):
            folder.mkdir(parents=True, exist_ok=True)
        self.hits: list[str] = []  # the `kind` of each key found / built, in order
        self.misses: list[str] = []

    # --- values --------------------------------------------------------------------------------

    def get(self, key: dict[str, Any], build: Callable[[Path], None], load: Callable[[Path], T]) -> T:
        """`load(folder)` of the entry for `key`, built first by `build(empty folder)` if missing.

        `key["kind"]` names the entry in hits/misses. Exceptions from `build` propagate and store
        nothing; an entry `load` fails on is dropped and built again.
        """
        name = key_digest(key)
        damaged = False
        with self._reading(name) as folder:
            if folder is not None:
                try:
                    value = load(folder)
                except Exception:  # noqa: BLE001 - a damaged entry is a miss: drop it and rebuild
                    damaged = True
                else:
                    self.hits.append(str(key.get("kind")))
                    return value
        if damaged:
            self._drop(name)
        with self._fresh(name, key, build) as folder:
            return load(folder)

    @contextmanager
    def held(self, key: dict[str, Any], build: Callable[[Path], None]) -> Iterator[Path]:
        """The entry's folder for `key` (built first by `build` if missing), safe from eviction
        for the block: for a value read from its files over a while (a model's weights)."""
        name = key_digest(key)
        with self._reading(name) as folder:
            if folder is not None:
                self.hits.append(str(key.get("kind")))
                yield folder
                return
        with self._fresh(name, key, build) as folder:
            yield folder

    @contextmanager
    def _fresh(self, name: str, key: dict[str, Any], build: Callable[[Path], None]) -> Iterator[Path]:
        """Build the entry, then hold it for the block; make room for it afterwards."""
        self._build(name, key, build)
        self.misses.append(str(key.get("kind")))
        with self._reading(name) as folder:
            if folder is None:  # evicted between our rename and our read: only with a tiny max_bytes
                scratch = self.building / f"{name}.{os.getpid()}.{uuid.uuid4().hex}"
                scratch.mkdir()
                try:
                    build(scratch)
                    yield scratch
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
            else:
                yield folder
        self.evict()

    def arrays(self, key: dict[str, Any], compute: Callable[[], T], *, dump: Callable[[T], dict[str, Any]],
               restore: Callable[[dict[str, Any]], T]) -> T:
        """A computed value kept as named parts (`dump`: name -> numpy array, ragged list of int
        lists, or JSON-able value) and rebuilt from them (`restore`), computed once per key."""
        computed: list[T] = []

        def build(folder: Path) -> None:
            computed.append(compute())
            save_parts(folder, dump(computed[0]))

        value = self.get(key, build, lambda folder: restore(load_parts(folder)))
        return computed[0] if computed else value

    def file_hash(self, path: Path) -> str:
        """sha256 of a file's bytes, remembered by (path, size, mtime, inode): a file is read once."""
        path = Path(path).resolve()
        st = path.stat()
        memo = self.root / "hashes" / digest([str(path), str(st.st_size), str(st.st_mtime_ns), str(st.st_ino)])
        try:
            return memo.read_text().strip()
        except OSError:
            pass
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        tmp = memo.with_name(f"{memo.name}.{uuid.uuid4().hex}")
        tmp.write_text(h.hexdigest())
        os.replace(tmp, memo)
        return h.hexdigest()

    # --- entries -------------------------------------------------------------------------------

    @contextmanager
    def _reading(self, name: str) -> Iterator[Path | None]:
        """The entry's folder, held against eviction (a shared lock) for the block; None when absent."""
        folder = self.entries / name
        try:
            fd = os.open(folder / ".lock", os.O_RDONLY)
        except OSError:
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:  # still the entry we opened, not evicted (and perhaps rebuilt) before our lock
                current = os.stat(folder / ".lock").st_ino == os.fstat(fd).st_ino
            except OSError:
                current = False
            if current:
                os.utime(folder / ".lock")  # its last use, for least-recently-used eviction
            yield folder if current else None
        finally:
            os.close(fd)

    def _build(self, name: str, key: dict[str, Any], build: Callable[[Path], None]) -> None:
        scratch = self.building / f"{name}.{os.getpid()}.{uuid.uuid4().hex}"
        scratch.mkdir()
        try:
            build(scratch)
            (scratch / "key.json").write_text(json.dumps(key, sort_keys=True, default=str))
            size = sum(p.stat().st_size for p in scratch.rglob("*") if p.is_file())
            (scratch / "size").write_text(str(size))
            (scratch / ".lock").touch()
            fsync_tree(scratch)
            try:
                os.rename(scratch, self.entries / name)
            except OSError:  # another builder got there first: theirs is the same value
                pass
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _drop(self, name: str) -> None:
        trash = self.building / f"{name}.dropped.{uuid.uuid4().hex}"
        try:
            os.rename(self.entries / name, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def evict(self) -> None:
        """Remove least recently used entries that nobody is reading until the rest fit in max_bytes;
        clear build folders left by builders that died."""
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            now = time.time()
            for scratch in self.building.iterdir():
                try:
                    if now - scratch.stat().st_mtime > STALE_BUILD_SECONDS:
                        shutil.rmtree(scratch, ignore_errors=True)
                except OSError:
                    pass
            entries = []
            for folder in self.entries.iterdir():
                try:
                    entries.append(((folder / ".lock").stat().st_mtime, int((folder / "size").read_text()), folder))
                except (OSError, ValueError):
                    continue
            total = sum(size for _, size, _ in entries)
            for _, size, folder in sorted(entries, key=lambda e: e[0]):
                if total <= self.max_bytes:
                    break
                if self._remove_unless_read(folder):
                    total -= size

    def _remove_unless_read(self, folder: Path) -> bool:
        try:
            fd = os.open(folder / ".lock", os.O_RDONLY)
        except OSError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # being read
            trash = self.building / f"{folder.name}.evicted.{uuid.uuid4().hex}"
            os.rename(folder, trash)
        finally:
            os.close(fd)
        shutil.rmtree(trash, ignore_errors=True)
        return True


# --- stored parts ---------------------------------------------------------------------------------


def save_parts(folder: Path, parts: dict[str, Any]) -> None:
    """Write named parts: arrays as .npy, ragged int lists as flat values + offsets, the rest as JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    plain: dict[str, Any] = {}
    for name, value in parts.items():
        if hasattr(value, "numpy") and callable(value.numpy):  # a torch tensor
            value = value.numpy()
        if isinstance(value, np.ndarray):
            np.save(folder / f"{name}.npy", value, allow_pickle=False)
        elif isinstance(value, Ragged):
            lengths = np.fromiter((len(row) for row in value.rows), dtype=np.int64, count=len(value.rows))
            flat = np.fromiter((x for row in value.rows for x in row), dtype=np.int64, count=int(lengths.sum()))
            np.save(folder / f"{name}.ragged.npy", flat, allow_pickle=False)
            np.save(folder / f"{name}.lengths.npy", lengths, allow_pickle=False)
        else:
            plain[name] = value
    (folder / "parts.json").write_text(json.dumps(plain))


def load_parts(folder: Path) -> dict[str, Any]:
    """The parts `save_parts` wrote: arrays, ragged lists as list[list[int]], JSON values."""
    parts: dict[str, Any] = json.loads((folder / "parts.json").read_text())
    for path in folder.glob("*.npy"):
        name = path.name[: -len(".npy")]
        if name.endswith(".lengths"):
            continue
        if name.endswith(".ragged"):
            name = name[: -len(".ragged")]
            flat = np.load(path, allow_pickle=False).tolist()
            lengths = np.load(folder / f"{name}.lengths.npy", allow_pickle=False)
            ends = np.cumsum(lengths).tolist()
            parts[name] = [flat[end - n : end] for end, n in zip(ends, lengths.tolist())]
        else:
            parts[name] = np.load(path, allow_pickle=False)
    return parts


class Ragged:
    """Marks a list of int lists (token ids per example) for compact storage in `save_parts`."""

    def __init__(self, rows: list[list[int]]):
        self.rows = rows


def processor_fingerprint(processor: Any) -> str:
    """What a tokenizer or image processor does, as a hash: a fast tokenizer's full definition
    (vocabulary, normalizer, pre-tokenizer, post-processor, added tokens) with its special tokens
    and chat template, or an image processor's settings. Where it was loaded from is left out:
    two copies of one tokenizer share their encodings."""
    backend = getattr(processor, "backend_tokenizer", None)
    if backend is not None:
        return digest([type(processor).__name__, _definition(backend),
                       json.dumps(processor.special_tokens_map, sort_keys=True, default=str),
                       str(getattr(processor, "chat_template", None)), str(processor.truncation_side)])
    settings = json.loads(processor.to_json_string())
    settings.pop("processor_class", None)
    return digest([type(processor).__name__, json.dumps(settings, sort_keys=True, default=str)])


def _definition(backend: Any) -> str:
    """A `tokenizers.Tokenizer`'s serialised definition without its truncation and padding, which
    are what the last call asked for (transformers sets them again on every call), not what the
    tokenizer is. Read with them switched off and put back: re-serialising the parsed JSON instead
    costs ~150 ms for a 30k vocabulary, against ~5 ms."""
    truncation, padding = backend.truncation, backend.padding
    backend.no_truncation()
    backend.no_padding()
    try:
        return backend.to_str()
    finally:
        if truncation is not None:
            backend.enable_truncation(**truncation)
        if padding is not None:
            backend.enable_padding(**padding)
