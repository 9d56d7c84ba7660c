"""Attacks on the upload and download paths that the other API tests do not already make.

- Downloads: a `Range` header with 10,000 ranges on a dataset and on a fine-tuned model's archive
  is answered at once, without building a huge multipart answer (Starlette's Range DoS).
- Multipart abuse, streamed chunk by chunk with no Content-Length: thousands of parts, a huge part
  header, thousands of headers, a huge plain field, parts without a name. Each is a 4xx that the
  server gives after reading only the first few chunks of a body far larger than it, and nothing
  is left on disk.
- A chunked upload without Content-Length past the size cap: 413 once the cap is crossed (the rest
  of the body is never read) and the partial file, which existed on disk meanwhile, is removed.
- Client file names as RFC 5987 `filename*`, and the download's Content-Disposition for stored names
  with quotes and non-ASCII characters (no header injection). Plain `../`, NUL and unicode tricks
  in `filename` are property-tested in test_fuzz.
- The installed python-multipart and Starlette, and pyproject's floors, are past the known DoS fixes.

Everything runs in-process through httpx's ASGI transport, which (unlike Starlette's TestClient)
pulls the request body lazily, so the bytes the server read can be counted.
"""

from __future__ import annotations

import ast
import asyncio
import email.message
import importlib.metadata
import secrets
import tarfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from lathe.db.tables import ApiKey, Base, Job, JobStatus, Model, new_id, now
from lathe.db.session import engine_for, session_scope
from lathe.settings import Settings
from tests.api.conftest import upload
from tests.api.test_basics import assert_error
from tests.api.test_fuzz import post_raw

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
CHUNK = 64 * 1024
QUICK_SECONDS = 1.0
# python-multipart >= 0.0.31 and Starlette >= 0.49.1 (CVE-2025-62727: O(n^2) Range header parsing
# in FileResponse) carry the fixes for the known multipart and Range denials of service.
FIXED = {"python-multipart": Version("0.0.31"), "starlette": Version("0.49.1")}


# --- helpers -------------------------------------------------------------------------------------

@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only (the conftest also runs PostgreSQL): upload and download handling doesn't depend on it."""
    url = f"sqlite:///{tmp_path / 'lathe.db'}"
    Base.metadata.create_all(engine_for(url))
    yield url
    engine_for(url).dispose()


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    """No rate limits (these tests upload a lot) and nothing published: Redis (db 12) is only named."""
    return Settings(data_dir=tmp_path / "data", database_url=db_url, redis_url="redis://127.0.0.1:6379/12",
                    queue=f"lathe-attacks-{secrets.token_hex(4)}", models_dir=tmp_path / "models",
                    rate_limit=None, upload_rate_limit=None)


class Body:
    """A request body made of generated chunks, counting what the server pulled (httpx sends it
    chunked, without Content-Length)."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks = chunks
        self.sent = 0
        self.on_chunk = None

    async def __aiter__(self):
        for chunk in self.chunks:
            self.sent += len(chunk)
            if self.on_chunk is not None:
                self.on_chunk(self.sent)
            yield chunk


def stream_post(app, headers: dict[str, str], body: Body, boundary: str) -> tuple[httpx.Response, float]:
    """POST /v1/files with `body` streamed; the response and the seconds it took."""

    async def go() -> tuple[httpx.Response, float]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            start = time.perf_counter()
            r = await client.post("/v1/files", content=body,
                                  headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"})
            return r, time.perf_counter() - start

    return asyncio.run(go())


def part_head(boundary: str, disposition: bytes, extra: bytes = b"") -> bytes:
    return f"--{boundary}\r\n".encode() + b"Content-Disposition: " + disposition + b"\r\n" + extra + b"\r\n"


def purpose_part(boundary: str) -> bytes:
    return part_head(boundary, b'form-data; name="purpose"') + b"fine-tune\r\n"


def repeat(piece: bytes, total: int) -> Iterator[bytes]:
    """`total` bytes of `piece` repeated, in CHUNK-sized chunks, never all in memory."""
    block = piece * max(1, CHUNK // len(piece))
    left = total
    while left > 0:
        yield block[:left]
        left -= len(block)


def nothing_stored(settings) -> bool:
    return not settings.files_dir.exists() or not any(settings.files_dir.rglob("*"))


# --- oversized and abusive multipart bodies --------------------------------------------------------

def test_chunked_upload_over_the_cap_is_413_and_leaves_nothing(app, client, acme, settings):
    """No Content-Length, 64 MiB of rows against a 1 MiB cap: 413 right after the cap is crossed,
    the rest never read; the partial file existed while streaming and is gone afterwards."""
    cap = 1 * MiB
    app.state.settings = settings.model_copy(update={"max_upload_bytes": cap})
    boundary = "b" + secrets.token_hex(8)
    head = purpose_part(boundary) + part_head(boundary, b'form-data; name="file"; filename="big.csv"') + b"text,label\n"
    body = Body(iter([head, *repeat(b"a fine row,pos\n", 64 * MiB)]))
    partial_seen: list[Path] = []

    def look(sent: int) -> None:
        if sent > cap // 2 and not partial_seen and settings.files_dir.exists():
            partial_seen.extend(settings.files_dir.glob("*/upload.part"))

    body.on_chunk = look
    r, seconds = stream_post(app, acme, body, boundary)
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert_error(r, 413, param="file", code="file_too_large")
    assert cap < body.sent <= cap + 4 * CHUNK, body.sent  # stopped reading just past the cap
    assert partial_seen, "the upload was not being written to disk while streaming"
    assert not any(p.exists() for p in partial_seen) and nothing_stored(settings)
    assert client.get("/v1/files", headers=acme).json()["data"] == []
    assert seconds < 10, seconds


ABUSE = {
    # name: (the start of the body, what repeats after it up to 64 MiB, expected param, words in the message)
    "100k parts": (lambda b: b"", lambda b: purpose_part(b), None, "too many parts"),
    "huge part header": (lambda b: purpose_part(b) + f"--{b}\r\n".encode()
                         + b'Content-Disposition: form-data; name="file"; filename="a.csv"\r\nX-Junk: ',
                         lambda b: b"a", "file", "header size"),
    "100k part headers": (lambda b: purpose_part(b) + f"--{b}\r\n".encode()
                          + b'Content-Disposition: form-data; name="file"; filename="a.csv"\r\n',
                          lambda b: b"X-A: 1\r\n", "file", "header count"),
    "huge plain field": (lambda b: part_head(b, b'form-data; name="purpose"'), lambda b: b"fine-tune", "purpose",
                         "too long"),
    "huge field without a name": (lambda b: purpose_part(b) + part_head(b, b"form-data"), lambda b: b"x", None,
                                  "too long"),
    "file part without a name": (lambda b: purpose_part(b) + part_head(b, b'form-data; filename="a.csv"'),
                                 lambda b: b"text,label\n", None, "too long"),
}


@pytest.mark.parametrize("case", sorted(ABUSE))
def test_multipart_abuse_is_a_fast_4xx(app, acme, settings, case):
    """Each abusive body is 64 MiB; the server answers 400 having read at most 1 MiB of it."""
    start, piece, param, words = ABUSE[case]
    boundary = "b" + secrets.token_hex(8)
    body = Body(iter([start(boundary), *repeat(piece(boundary), 64 * MiB)]))
    r, seconds = stream_post(app, acme, body, boundary)
    err = assert_error(r, 400)
    assert words in err["message"].lower(), err
    if param is not None:
        assert err["param"] == param, err
    assert body.sent <= 1 * MiB, f"read {body.sent} bytes before refusing"
    assert seconds < QUICK_SECONDS, seconds
    assert nothing_stored(settings)


def test_rfc5987_filename_is_never_a_path(client, acme, settings):
    """`filename*=UTF-8''..%2F..` is not read as the file's name: alone it is no file part (400),
    next to a plain `filename` the plain one is the metadata, and the bytes go under the file's id."""
    boundary = "b" + secrets.token_hex(8)
    ctype = {"Content-Type": f"multipart/form-data; boundary={boundary}"}

    def body(disposition: bytes) -> bytes:
        return (purpose_part(boundary) + part_head(boundary, disposition) + b"text,label\na,b\nc,d\n\r\n"
                + f"--{boundary}--\r\n".encode())

    escape = b"form-data; name=\"file\"; filename*=UTF-8''..%2F..%2F..%2Fevil.csv"
    r = client.post("/v1/files", headers={**acme, **ctype}, content=body(escape))
    assert_error(r, 400, param="file")
    r = client.post("/v1/files", headers={**acme, **ctype}, content=body(escape + b'; filename="x.csv"'))
    assert r.status_code == 200, r.text
    assert r.json()["filename"] == "x.csv"
    stored = {p.relative_to(settings.resolved_data_dir) for p in settings.resolved_data_dir.rglob("*") if p.is_file()}
    assert Path("files", r.json()["id"], "data.csv") in stored
    assert not any("evil" in str(p) for p in stored)


@pytest.mark.parametrize("name", ['quote"d.csv', "naïve résumé ✓.csv", "semi;colon=1; x=y.csv",
                                  b"esc\x1b[31m\tred\x7f\x85.csv", b"bad utf-8 \xff\xfe.csv"])
def test_download_content_disposition_is_one_safe_header(client, acme, name):
    """The stored name comes back in Content-Disposition as one header that decodes to that name:
    control characters were dropped at upload, quotes and non-ASCII are RFC 5987-encoded, nothing
    splits the header. (bytes: sent as they are; str: through httpx's own multipart encoding.)"""
    content = b"text,label\na,b\nc,d\n"
    if isinstance(name, bytes):
        r = post_raw(client, acme, name, content)
    else:
        r = client.post("/v1/files", headers=acme, files={"file": (name, content)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    stored_name = r.json()["filename"]
    assert stored_name.isprintable(), stored_name
    d = client.get(f"/v1/files/{r.json()['id']}/content", headers=acme)
    assert d.status_code == 200
    assert "set-cookie" not in d.headers
    values = d.headers.get_list("content-disposition")
    assert len(values) == 1 and values[0].isascii(), values
    msg = email.message.Message()
    msg["Content-Disposition"] = values[0]
    assert msg.get_filename() == stored_name, (values[0], stored_name)


# --- Range headers -------------------------------------------------------------------------------

def _dataset(client, headers) -> tuple[str, bytes]:
    content = b"text,label\n" + b"".join(b"row number %06d,pos\n" % i for i in range(20_000))  # ~420 KB
    r = upload(client, headers, name="big.csv", content=content)
    assert r.status_code == 200, r.text
    return r.json()["id"], content


def _model(settings, key: str) -> tuple[str, bytes]:
    """A fine-tuned model of the key's tenant with a ~512 KB archive, as a finished job leaves it."""
    folder = settings.models_store / "m"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(secrets.token_bytes(512 * 1024))
    archive = folder.parent / "m.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(folder / "model.safetensors", arcname="model.safetensors")
    job_id, model_id = new_id("ftjob"), "ft:tiny:acme:ranges:x"
    with session_scope(settings.sqlalchemy_url) as s:
        tenant_id = s.get(ApiKey, key.split("_")[1]).tenant_id  # lathe_<id>_<secret>
        s.add(Job(id=job_id, tenant_id=tenant_id, status=JobStatus.SUCCEEDED, spec={}, model="tiny",
                  training_file="file-x", fine_tuned_model=model_id, seed=0, created_at=now(), finished_at=now()))
        s.flush()
        s.add(Model(id=model_id, tenant_id=tenant_id, job_id=job_id, task="text-classification", path=str(folder),
                    archive_path=str(archive), bytes=archive.stat().st_size, created_at=now()))
    return model_id, archive.read_bytes()


RANGE_HEADERS = {
    "10k disjoint": "bytes=" + ",".join(f"{3 * i}-{3 * i + 1}" for i in range(10_000)),
    "10k overlapping": "bytes=" + ",".join(f"0-{i}" for i in range(10_000)),
    "10k suffixes": "bytes=" + ",".join(f"-{i + 1}" for i in range(10_000)),
    "10k empty": "bytes=" + "," * 10_000,
}


@pytest.mark.parametrize("what", ["dataset", "model"])
@pytest.mark.parametrize("ranges", sorted(RANGE_HEADERS))
def test_many_ranges_are_answered_quickly(client, keys, acme, settings, what, ranges):
    """10,000 ranges: 200 with the file, or 206/416, in well under a second, and never a multipart
    answer much larger than the file (each part would repeat headers: an amplification)."""
    if what == "dataset":
        file_id, content = _dataset(client, acme)
        url = f"/v1/files/{file_id}/content"
    else:
        model_id, content = _model(settings, keys["acme"])
        url = f"/v1/models/{model_id}/content"
    header = RANGE_HEADERS[ranges]
    assert header.count(",") >= 9_999
    start = time.perf_counter()
    r = client.get(url, headers={**acme, "Range": header})
    seconds = time.perf_counter() - start
    assert seconds < QUICK_SECONDS, seconds
    assert r.status_code in (200, 206, 400, 416), r.status_code
    assert len(r.content) <= len(content) + 64 * 1024, len(r.content)
    if r.status_code == 200:
        assert r.content == content
    # The control: one ordinary range is honoured, so the many-range answers are not an accident.
    one = client.get(url, headers={**acme, "Range": "bytes=0-9"})
    assert one.status_code == 206 and one.content == content[:10]


# --- versions ------------------------------------------------------------------------------------

def _floor(requirement: Requirement) -> Version | None:
    """The lowest version a requirement allows (from >=, ==, ~= or >), None when unbounded below."""
    floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=", ">")]
    return max(floors) if floors else None


@pytest.mark.parametrize("package", sorted(FIXED))
def test_installed_and_pinned_versions_have_the_dos_fixes(package):
    installed = Version(importlib.metadata.version(package))
    assert installed >= FIXED[package], f"{package} {installed} predates the fix in {FIXED[package]}"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [Requirement(d) for d in deps if Requirement(d).name == package]
    assert pins, f"pyproject.toml does not pin {package}"
    assert _floor(pins[0]) is not None and _floor(pins[0]) >= FIXED[package], str(pins[0])


# --- nothing user-supplied is executed -----------------------------------------------------------

UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("joblib", "load"), ("dill", "load"), ("dill", "loads"),
              ("marshal", "load"), ("marshal", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads")}


def _calls(tree: ast.AST) -> Iterator[tuple[ast.Call, str, str]]:
    """Every call with its dotted target split as (object, attribute), e.g. ("torch", "load")."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute):
                owner = func.value.id if isinstance(func.value, ast.Name) else ast.unparse(func.value)
                yield node, owner, func.attr
            elif isinstance(func, ast.Name):
                yield node, "", func.id


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def risks(source: str, where: str) -> list[str]:
    """What in `source` could run code from a file: a non-False `trust_remote_code`, `torch.load`
    without `weights_only=True`, `numpy.load(allow_pickle=...)`, an unpickler imported or called."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules = {(node.module or "").split(".")[0]}
        else:
            continue
        if modules & {"pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}:
            found.append(f"{where}:{node.lineno} imports an unpickler")
    for call, owner, attr in _calls(tree):
        remote = _keyword(call, "trust_remote_code")
        if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
            found.append(f"{where}:{call.lineno} trust_remote_code={ast.unparse(remote)}")
        if (owner, attr) == ("torch", "load"):
            weights_only = _keyword(call, "weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{where}:{call.lineno} torch.load without weights_only=True")
        if attr == "load" and owner in ("np", "numpy"):
            allow = _keyword(call, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{where}:{call.lineno} numpy.load(allow_pickle=...)")
        if (owner, attr) in UNPICKLERS:
            found.append(f"{where}:{call.lineno} {owner}.{attr}")
    return found


def test_the_scan_sees_each_risk():
    source = "\n".join([
        "import pickle", "from joblib import load", "M.from_pretrained(p, trust_remote_code=True)",
        "M.from_pretrained(p, trust_remote_code=flag)", "torch.load(f)", "torch.load(f, weights_only=False)",
        "np.load(f, allow_pickle=True)", "pickle.loads(b)",
        "M.from_pretrained(p, trust_remote_code=False)", "torch.load(f, weights_only=True)", "np.load(f)",
    ])
    assert [r.split(" ", 1)[0] for r in risks(source, "x")] == [f"x:{i}" for i in range(1, 9)]


def test_no_code_runs_from_model_files():
    """Across api/, worker/, core/ and lathe/ nothing can run code from a file a user sent: weights
    are safetensors only (core.loading and api.archives refuse .bin/.pt), and this scan keeps it so."""
    found = []
    for package in ("api", "worker", "core", "lathe"):
        for path in sorted((ROOT / package).rglob("*.py")):
            found += risks(path.read_text(), str(path.relative_to(ROOT)))
    assert found == []
