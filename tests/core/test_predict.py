import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.engine import RunPaths, run
from core.predict import predict
from core.sink import ListSink
from core.spec import JobSpec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, sentiment_files, tmp_path_factory):
    spec = JobSpec(model="tiny", training_file="t", hyperparameters={"n_epochs": 6, "learning_rate_multiplier": 40})
    paths = RunPaths(str(tiny_bert_dir), sentiment_files["train"], None, None, tmp_path_factory.mktemp("work"))
    return run(spec, paths, ListSink()).model_dir


def test_predict_in_process(trained):
    out = predict(trained, ["what a great wonderful film", "boring terrible waste"], top_k=2)
    assert [p[0]["label"] for p in out] == ["1", "0"]
    assert all(len(p) == 2 and abs(sum(x["score"] for x in p) - 1) < 1e-5 for p in out)


def test_predict_cli_round_trip(trained):
    proc = subprocess.run(
        [sys.executable, "-m", "core.predict", str(trained)],
        input=json.dumps({"inputs": ["love this fun movie"], "top_k": 1}),
        capture_output=True, text=True, cwd=ROOT, check=True,
    )
    assert json.loads(proc.stdout)["predictions"][0][0]["label"] == "1"


def test_predict_cli_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "core.predict", str(tmp_path / "missing")],
        input=json.dumps({"inputs": ["x"]}), capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 1 and json.loads(proc.stdout)["error"]["code"] == "model_not_found"
