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


def _exported(folder: Path, task: str) -> Path:
    (folder / "lathe_job.json").write_text(json.dumps({"reproducibility": {"task": task}, "spec": {"config": {}}}))
    return folder


def test_predict_token_classification_groups_entities(tmp_path):
    import torch
    from transformers import AutoTokenizer, BertForTokenClassification

    from tests.tiny_models import save_tiny_bert
    from tests.tiny_surgery_models import tiny_bert_config

    folder = save_tiny_bert(tmp_path / "m")
    config = tiny_bert_config(num_labels=3, vocab_size=AutoTokenizer.from_pretrained(folder).vocab_size,
                              id2label={0: "O", 1: "B-PER", 2: "I-PER"}, label2id={"O": 0, "B-PER": 1, "I-PER": 2})
    model = BertForTokenClassification(config)
    with torch.no_grad():  # always "B-PER": every word is an entity of its own
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    model.save_pretrained(folder)
    [entities] = predict(_exported(folder, "token-classification"), ["the movie was good"])
    assert [e["word"] for e in entities] == ["the", "movie", "was", "good"]
    assert all(e["label"] == "PER" and 0 <= e["start"] < e["end"] for e in entities)


def test_predict_causal_lm_generates(tmp_path):
    from tests.tiny_causal import save_tiny_llama

    folder = _exported(save_tiny_llama(tmp_path / "m"), "causal-lm")
    out = predict(folder, ["hello", "how are you"], max_new_tokens=5)
    assert len(out) == 2 and all(isinstance(p[0]["generated_text"], str) for p in out)


def test_predict_image_classification_reads_base64(tmp_path):
    import base64

    from core.adapters.image_classification import default_processor
    from tests.tiny_vision import digits, png_bytes, save_tiny_resnet

    folder = save_tiny_resnet(tmp_path / "m", num_labels=10)
    default_processor(16).save_pretrained(folder)
    images, _ = digits(16)
    encoded = [base64.b64encode(png_bytes(images[0])).decode(), "data:image/png;base64," +
               base64.b64encode(png_bytes(images[1])).decode()]
    out = predict(_exported(folder, "image-classification"), encoded, top_k=3)
    assert [len(p) for p in out] == [3, 3] and all(0 <= x["score"] <= 1 for p in out for x in p)
    with pytest.raises(Exception) as e:
        predict(folder, ["not an image"])
    assert getattr(e.value, "param", None) == "inputs"
