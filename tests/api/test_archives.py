"""Model archives (purpose=model): attacks are refused from the index, before any extraction."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from api.archives import safe_parts
from lathe.errors import BadRequest
from tests.api.conftest import upload
from tests.api.test_basics import assert_error

CONFIG = json.dumps({"model_type": "bert", "hidden_size": 32}).encode()
WEIGHTS = save({"w": np.arange(64, dtype=np.float32).reshape(8, 8)})


def make_zip(members: dict[str, bytes], *, compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_tar(members: dict[str, bytes], *, gz: bool = False, extra=()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return buf.getvalue()


def model_dir_empty(settings) -> bool:
    return not settings.files_dir.exists() or not any(settings.files_dir.rglob("*"))


def test_valid_zip_with_top_folder_is_extracted(client, acme, settings):
    data = make_zip({"tiny/config.json": CONFIG, "tiny/model.safetensors": WEIGHTS, "tiny/vocab.txt": b"a\nb\n"})
    r = upload(client, acme, name="tiny.zip", content=data, purpose="model")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["purpose"] == "model" and body["bytes"] == len(data)
    model = settings.files_dir / body["id"] / "model"
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    assert (model / "model.safetensors").read_bytes() == WEIGHTS
    assert not (settings.files_dir / body["id"] / "upload.part").exists()
    assert_error(client.get(f"/v1/files/{body['id']}/content", headers=acme), 400)
    # and it names a base model
    train = upload(client, acme).json()["id"]
    r = client.post("/v1/fine_tuning/jobs", headers=acme, json={"model": body["id"], "training_file": train})
    assert r.status_code == 200, r.text


def test_valid_tgz_flat(client, acme, settings):
    data = make_tar({"config.json": CONFIG, "model.safetensors": WEIGHTS}, gz=True)
    r = upload(client, acme, name="m.tar.gz", content=data, purpose="model")
    assert r.status_code == 200, r.text
    assert (settings.files_dir / r.json()["id"] / "model" / "config.json").read_bytes() == CONFIG


def _symlink() -> tarfile.TarInfo:
    info = tarfile.TarInfo("evil")
    info.type = tarfile.SYMTYPE
    info.linkname = "/etc/passwd"
    return info


def _hardlink() -> tarfile.TarInfo:
    info = tarfile.TarInfo("hard")
    info.type = tarfile.LNKTYPE
    info.linkname = "config.json"
    return info


def _device() -> tarfile.TarInfo:
    info = tarfile.TarInfo("dev")
    info.type = tarfile.CHRTYPE
    return info


GOOD = {"config.json": CONFIG, "model.safetensors": WEIGHTS}

ATTACKS = {
    "zip-dotdot": ("m.zip", make_zip({**GOOD, "../../escape.txt": b"x"}), None),
    "zip-absolute": ("m.zip", make_zip({**GOOD, "/tmp/abs.txt": b"x"}), None),
    "zip-backslash": ("m.zip", make_zip({**GOOD, "..\\..\\win.txt": b"x"}), None),
    "zip-bomb": ("m.zip", make_zip({**GOOD, "zeros.safetensors": bytes(20 * 1024 * 1024)}), None),
    "zip-pickle": ("m.zip", make_zip({**GOOD, "pytorch_model.bin": b"\x80\x04"}), "unsafe_model_weights"),
    "tar-symlink": ("m.tar", make_tar(GOOD, extra=[_symlink()]), None),
    "tar-hardlink": ("m.tar", make_tar(GOOD, extra=[_hardlink()]), None),
    "tar-device": ("m.tar", make_tar(GOOD, extra=[_device()]), None),
    "tar-dotdot": ("m.tgz", make_tar({**GOOD, "a/../../x": b"x"}, gz=True), None),
    "tar-pickle": ("m.tar", make_tar({**GOOD, "sub/optimizer.pt": b"x"}), "unsafe_model_weights"),
    "no-config": ("m.zip", make_zip({"model.safetensors": WEIGHTS}), None),
    "no-safetensors": ("m.zip", make_zip({"config.json": CONFIG}), None),
    "not-an-archive": ("m.zip", b"this is not a zip file at all", None),
    "wrong-extension": ("m.rar", b"whatever", "invalid_file_format"),
}


@pytest.mark.parametrize("case", sorted(ATTACKS))
def test_archive_attacks_are_400_and_nothing_extracted(client, acme, settings, case, tmp_path):
    name, data, code = ATTACKS[case]
    err = assert_error(upload(client, acme, name=name, content=data, purpose="model"), 400, param="file")
    if code:
        assert err["code"] == code
    assert model_dir_empty(settings)
    assert not Path("/tmp/abs.txt").exists()
    assert client.get("/v1/files", headers=acme).json()["data"] == []


def test_archive_limits(client, acme, settings):
    client.app.state.settings = settings.model_copy(update={"max_archive_members": 2})
    data = make_zip({**GOOD, "vocab.txt": b"a"})
    assert "members" in assert_error(upload(client, acme, name="m.zip", content=data, purpose="model"), 400)["message"]
    client.app.state.settings = settings.model_copy(update={"max_archive_bytes": 100})
    assert_error(upload(client, acme, name="m.zip", content=make_zip(GOOD), purpose="model"), 400)
    assert model_dir_empty(settings)


@pytest.mark.parametrize("name", ["/abs", "a/../../b", "..", "a\\b", "nul\x00", "C:/x", ""])
def test_safe_parts_rejects(name):
    with pytest.raises(BadRequest):
        safe_parts(name)


def test_safe_parts_accepts():
    assert safe_parts("./a/b/c.json") == ("a", "b", "c.json")
