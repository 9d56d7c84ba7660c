"""Two images (Dockerfile's `api` and `worker` targets, built by docker-compose.yml): the API's
holds `lathe` without the engine extra, so no torch, and the API must work that way; the worker's
holds `lathe[engine]`. (No Docker daemon is needed: the files are read, and the API is run with the
engine packages made unimportable.)"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
import uuid
from pathlib import Path

import redis
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
ENGINE = ("torch", "transformers", "peft", "accelerate", "safetensors", "scikit-learn", "kornia", "seqeval", "gguf")
# Import names of the engine's packages (and of what they bring: huggingface_hub, tokenizers).
ENGINE_MODULES = ("torch", "transformers", "peft", "accelerate", "safetensors", "sklearn", "kornia", "seqeval",
                  "gguf", "huggingface_hub", "tokenizers")


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def _stages() -> dict[str, str]:
    """Dockerfile stage name -> its instructions."""
    text = (ROOT / "Dockerfile").read_text()
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", text, flags=re.MULTILINE | re.IGNORECASE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_the_engine_is_an_extra_the_api_does_without():
    base = _names(PYPROJECT["project"]["dependencies"])
    engine = _names(PYPROJECT["project"]["optional-dependencies"]["engine"])
    assert set(ENGINE) <= engine and not base & engine
    makefile = (ROOT / "Makefile").read_text()
    assert '-e ".[engine,dev]"' in makefile  # make test / make run / .ci/run install both


def test_compose_builds_an_api_image_and_a_worker_image():
    stages = _stages()
    api, worker = COMPOSE["services"]["api"], COMPOSE["services"]["worker"]
    assert api["build"]["target"] == "api" and worker["build"]["target"] == "worker"
    assert api["image"] != worker["image"]
    assert re.search(r"pip install -e \.(\s|$)", stages["api"]) and "torch" in stages["api"]  # checked absent
    assert "engine" not in stages["api"] and "TORCH_SPEC" not in stages["api"]
    assert 'pip install -e ".[engine]"' in stages["worker"] and 'pip install "${TORCH_SPEC}"' in stages["worker"]
    assert list(stages)[-1] == "api"  # a plain `docker build .` gives the API, as the one image did


def test_the_api_serves_without_the_engine_packages(tmp_path):
    """The API's routes (uploads of a dataset and of a model archive, a job's create and reads, the
    models, /predict's tenant check, a dry run up to the workers' queue) run in a process where no
    engine package can be imported."""
    import numpy as np

    from tests.api.test_archives import CONFIG, make_zip

    header = b'{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}'
    weights = len(header).to_bytes(8, "little") + header + np.arange(4, dtype=np.float32).tobytes()
    (tmp_path / "model.zip").write_bytes(make_zip({"m/config.json": CONFIG, "m/model.safetensors": weights}))
    queue = f"lathe-images-{uuid.uuid4().hex[:8]}"
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        BLOCKED = {ENGINE_MODULES!r}

        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is not installed in the API image")

        sys.meta_path.insert(0, Blocker())
        from pathlib import Path
        from fastapi.testclient import TestClient
        from api.main import create_app
        from lathe.db.session import engine_for, session_scope
        from lathe.db.tables import Base
        from lathe.keys import create_key
        from lathe.settings import Settings

        tmp = Path({str(tmp_path)!r})
        settings = Settings(data_dir=tmp / "data", database_url=f"sqlite:///{{tmp / 'lathe.db'}}",
                            redis_url="redis://127.0.0.1:6379/14", queue={queue!r}, allow_hub_models=False,
                            predict_timeout_seconds=0.5)
        Base.metadata.create_all(engine_for(settings.sqlalchemy_url))
        with session_scope(settings.sqlalchemy_url) as s:
            headers = {{"Authorization": "Bearer " + create_key(s, tenant_name="acme")}}
        with TestClient(create_app(settings)) as client:
            def ok(r):
                assert r.status_code == 200, r.text
                return r.json()
            csv = "text,label\\ngreat movie,pos\\nawful film,neg\\nloved it,pos\\nhated it,neg\\n"
            train = ok(client.post("/v1/files", headers=headers, files={{"file": ("t.csv", csv)}},
                                   data={{"purpose": "fine-tune"}}))["id"]
            model = ok(client.post("/v1/files", headers=headers, files={{"file": ("m.zip", (tmp / "model.zip").read_bytes())}},
                                   data={{"purpose": "model"}}))["id"]
            job = ok(client.post("/v1/fine_tuning/jobs", headers=headers, json={{"model": model, "training_file": train}}))
            assert ok(client.get(f"/v1/fine_tuning/jobs/{{job['id']}}", headers=headers))["status"] == "validating_files"
            assert ok(client.get("/v1/models", headers=headers))["data"] == []
            r = client.post("/v1/models/ft:x:y:z:ftjob-1/predict", headers=headers, json={{"inputs": ["x"]}})
            assert r.status_code == 404, r.text
            # A dry run is checked here and counted by a worker: with none serving, a 503, not an ImportError.
            r = client.post("/v1/fine_tuning/jobs", headers=headers,
                            json={{"model": model, "training_file": train, "dry_run": True}})
            assert r.status_code == 503 and r.json()["error"]["code"] == "dry_run_unavailable", r.text
        loaded = [m for m in BLOCKED if m in sys.modules]
        assert not loaded, loaded
        print("served without the engine")
    """)
    try:
        proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        client = redis.Redis.from_url("redis://127.0.0.1:6379/14")
        keys = list(client.scan_iter(f"*{queue}*"))
        if keys:
            client.delete(*keys)
        client.close()
    assert proc.returncode == 0 and "served without the engine" in proc.stdout, proc.stdout + proc.stderr[-3000:]
