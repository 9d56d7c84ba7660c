"""core.archives: one set of checks for image-dataset zips and model archives, refusing the same
things with the same words; only the request field and the code differ."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import pytest

from core import archives
from core.datasets import images
from core.errors import DataError
from core.spec import TrainingConfig
from tests.tiny_vision import png_bytes


def write_zip(path: Path, members: dict[str, bytes], *, links: tuple[str, ...] = ()) -> Path:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    path.write_bytes(buffer.getvalue())
    return path


def image_error(path: Path) -> DataError:
    with pytest.raises(DataError) as info:
        images.inspect(path, param="training_file", config=TrainingConfig())
    return info.value


def model_error(path: Path, **limits) -> DataError:
    with pytest.raises(DataError) as info:
        archives.inspect_archive(path, "zip", **({"max_bytes": 10**9, "max_members": 1000} | limits))
    return info.value


@pytest.fixture
def png() -> bytes:
    from PIL import Image

    return png_bytes(Image.new("L", (8, 8)))


def test_both_uploads_refuse_links_bombs_and_escapes_alike(tmp_path, png):
    cases = {
        "link": ({}, ("cat/evil.png",), "is a symbolic link"),
        "bomb": ({"cat/zeros.png": bytes(4 * 1024 * 1024)}, (), "zip bomb"),
        "dotdot": ({"../cat/x.png": png}, (), "points outside the archive"),
    }
    for case, (extra, links, words) in cases.items():
        dataset = write_zip(tmp_path / f"{case}-images.zip", {"cat/a.png": png, "dog/b.png": png, **extra}, links=links)
        model = write_zip(tmp_path / f"{case}-model.zip", {"config.json": b"{}", "w.safetensors": b"x", **extra},
                          links=links)
        from_images, from_model = image_error(dataset), model_error(model)
        assert from_images.message == from_model.message and words in from_images.message, case
        assert (from_images.param, from_images.code) == ("training_file", "invalid_training_file")
        assert (from_model.param, from_model.code) == ("file", "invalid_model_archive")


def test_member_count_and_size_caps_read_the_same(tmp_path, png, monkeypatch):
    dataset = write_zip(tmp_path / "images.zip", {"cat/a.png": png, "dog/b.png": png, "dog/c.png": png})
    model = write_zip(tmp_path / "model.zip", {"config.json": b"{}", "w.safetensors": b"x", "vocab.txt": b"a"})
    monkeypatch.setattr(images, "MAX_MEMBERS", 2)
    assert image_error(dataset).message == model_error(model, max_members=2).message == (
        "The archive has 3 members; at most 2 are allowed.")
    monkeypatch.setattr(images, "MAX_MEMBERS", 1000)
    monkeypatch.setattr(images, "MAX_TOTAL_BYTES", 3)
    assert "expands to" in image_error(dataset).message and "at most 3 are allowed" in image_error(dataset).message
    assert "at most 3 are allowed" in model_error(model, max_bytes=3).message


def test_the_same_path_twice_is_refused(tmp_path, png):
    dataset = write_zip(tmp_path / "images.zip", {"cat/a.png": png, "dog/b.png": png, "cat/./a.png": png})
    assert image_error(dataset).message == "Archive member 'cat/./a.png' appears twice."


@pytest.mark.parametrize("name", ["/abs", "a/../../b", "..", "a\\b", "nul\x00", "C:/x", ""])
def test_safe_parts_names_the_request_field(name):
    with pytest.raises(DataError) as info:
        archives.safe_parts(name, param="training_file", code=None)
    assert info.value.param == "training_file" and info.value.code == "invalid_training_file"
