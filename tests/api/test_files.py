"""Files: upload (streamed, capped, checked), list, retrieve, delete, content; through the SDK too."""

from __future__ import annotations

import io

import openai
import pytest

from tests.api.conftest import CSV, upload
from tests.api.test_basics import assert_error


def test_upload_csv(client, acme, settings):
    r = upload(client, acme, name="../../etc/passwd.csv")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("file-") and body["object"] == "file"
    assert body["bytes"] == len(CSV) and body["purpose"] == "fine-tune" and body["status"] == "processed"
    assert body["filename"] == "passwd.csv"  # metadata only
    assert body["status_details"] is None
    stored = settings.files_dir / body["id"] / "data.csv"
    assert stored.read_text() == CSV
    assert client.get(f"/v1/files/{body['id']}/content", headers=acme).text == CSV


@pytest.mark.parametrize("name, content, needle", [
    ("bad.csv", "text,label\nok,1\nbroken,row,extra\n", "line 3"),
    ("bad.jsonl", '{"text": "a", "label": "x"}\nnot json\n', "line 2"),
])
def test_malformed_dataset_is_400_naming_the_line(client, acme, settings, name, content, needle):
    err = assert_error(upload(client, acme, name=name, content=content), 400, param="file")
    assert needle in err["message"]
    assert not any(settings.files_dir.glob("*/*"))


def test_bad_purpose_and_extension(client, acme, settings):
    assert_error(upload(client, acme, purpose="assistants"), 400, param="purpose")
    assert_error(upload(client, acme, name="train.txt"), 400, param="file", code="invalid_file_format")
    r = client.post("/v1/files", headers=acme, files={"file": ("a.csv", b"x")})
    assert_error(r, 400, param="purpose")
    r = client.post("/v1/files", headers=acme, data={"purpose": "fine-tune"}, files={"other": ("a.csv", b"x")})
    assert_error(r, 400, param="file")
    assert_error(client.post("/v1/files", headers=acme, json={"purpose": "fine-tune"}), 400, param="file")
    assert not any(settings.files_dir.glob("*/*"))


def test_over_cap_upload_is_413_and_leaves_nothing(client, acme, settings):
    client.app.state.settings = settings.model_copy(update={"max_upload_bytes": 64})
    assert_error(upload(client, acme, content=CSV * 10), 413, param="file")
    # Declared length far over the cap: refused before reading the body.
    client.app.state.settings = settings.model_copy(update={"max_upload_bytes": 1})
    assert_error(upload(client, acme, content=b"x" * (2 * 1024 * 1024)), 413)
    assert not settings.files_dir.exists() or not any(settings.files_dir.rglob("*"))
    assert client.get("/v1/files", headers=acme).json()["data"] == []


def test_list_retrieve_delete_and_isolation(client, acme, other, settings):
    ids = [upload(client, acme, name=f"f{i}.csv").json()["id"] for i in range(3)]
    page = client.get("/v1/files?limit=2", headers=acme).json()
    assert page["object"] == "list" and page["has_more"] is True and len(page["data"]) == 2
    rest = client.get(f"/v1/files?limit=2&after={page['last_id']}", headers=acme).json()
    assert rest["has_more"] is False
    assert sorted(f["id"] for f in page["data"] + rest["data"]) == sorted(ids)
    assert client.get("/v1/files?purpose=model", headers=acme).json()["data"] == []

    assert client.get("/v1/files", headers=other).json()["data"] == []
    for method, path in [("GET", ""), ("GET", "/content"), ("DELETE", "")]:
        assert_error(client.request(method, f"/v1/files/{ids[0]}{path}", headers=other), 404)

    r = client.delete(f"/v1/files/{ids[0]}", headers=acme)
    assert r.json() == {"id": ids[0], "object": "file", "deleted": True}
    assert not (settings.files_dir / ids[0]).exists()
    assert_error(client.get(f"/v1/files/{ids[0]}", headers=acme), 404)


def test_delete_refused_while_a_job_uses_it(client, acme, train_file):
    r = client.post("/v1/fine_tuning/jobs", headers=acme, json={"model": "bert-base-uncased", "training_file": train_file})
    assert r.status_code == 200, r.text
    assert_error(client.delete(f"/v1/files/{train_file}", headers=acme), 409)
    client.post(f"/v1/fine_tuning/jobs/{r.json()['id']}/cancel", headers=acme)
    assert client.delete(f"/v1/files/{train_file}", headers=acme).status_code == 200


def test_sdk_files(sdk, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    with open(path, "rb") as fh:
        created = sdk.files.create(file=fh, purpose="fine-tune")
    assert created.id.startswith("file-") and created.filename == "train.jsonl" and created.bytes == path.stat().st_size
    assert [f.id for f in sdk.files.list()] == [created.id]
    assert sdk.files.retrieve(created.id).purpose == "fine-tune"
    assert sdk.files.content(created.id).read() == path.read_bytes()
    assert sdk.files.delete(created.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(created.id)
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.files.create(file=("x.csv", io.BytesIO(b"text,label\na,b,c\n")), purpose="fine-tune")
    assert "line 2" in exc.value.body["message"] or "line 2" in str(exc.value)
