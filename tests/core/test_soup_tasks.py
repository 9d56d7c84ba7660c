"""A greedy soup (core.soup) of the tasks only a soup combines: causal LMs and token classifiers.
Two tiny members each; the soup is measured with the task's own evaluation, keeps a member only if
validation does not get worse, and exports an ordinary model whose weights are the chosen members'
mean and which core.predict answers for."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from core.adapters import DataFiles
from core.combine import Member, combine
from core.engine import RunPaths, run
from core.predict import predict
from core.sink import ListSink
from core.spec import JobSpec
from tests.core.test_token_classification import ner_rows, write_jsonl
from tests.tiny_causal import chat_rows, save_tiny_llama
from tests.tiny_models import save_tiny_bert


def soup_of(tmp_path, base, files: DataFiles, body: dict, multipliers=(1.0, 3.0)):
    members = []
    for i, multiplier in enumerate(multipliers):
        spec = JobSpec.model_validate({**body, "hyperparameters": {**body["hyperparameters"],
                                                                    "learning_rate_multiplier": multiplier}})
        result = run(spec, RunPaths(model=str(base), train_file=files.train, validation_file=files.validation,
                                    test_file=files.test, work_dir=tmp_path / f"m{i}"), ListSink(), archive=False)
        members.append(Member(i, f"job-{i}", result.model_dir, spec))
    parent = JobSpec.model_validate({**body, "config": {**body["config"], "ensemble": {"method": "soup", "members": 2}}})
    sink = ListSink()
    result = combine(parent, members, files, tmp_path / "parent", sink)
    return members, result, sink


def assert_mean_of_ingredients(members, result):
    report = json.loads((result.model_dir / "eval_report.json").read_text())
    chosen = [load_file(str(members[i].model_dir / "model.safetensors")) for i in report["ingredients"]]
    souped = load_file(str(result.model_dir / "model.safetensors"))
    assert souped.keys() == chosen[0].keys()
    for name, value in souped.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, torch.stack([c[name] for c in chosen]).mean(0), rtol=0, atol=1e-6)
    assert not (result.model_dir / "ensemble.json").exists()  # an ordinary model
    return report


def test_a_causal_lm_soup_is_one_model_of_the_chosen_members_mean(tmp_path):
    base = save_tiny_llama(tmp_path / "llama")
    files = DataFiles(write_jsonl(tmp_path / "train.jsonl", chat_rows(24)),
                      write_jsonl(tmp_path / "valid.jsonl", chat_rows(8, seed=1)),
                      write_jsonl(tmp_path / "test.jsonl", chat_rows(8, seed=2)))
    body = {"model": "m", "training_file": "t", "validation_file": "v", "test_file": "x", "task": "causal-lm",
            "hyperparameters": {"n_epochs": 1, "batch_size": 4}, "config": {"device": "cpu", "max_length": 64}}
    members, result, sink = soup_of(tmp_path, base, files, body)
    report = assert_mean_of_ingredients(members, result)
    assert report["ingredients"][0] in (0, 1) and set(report["ensemble"]) == {"validation", "test"}
    best_member = min(m["validation"]["loss"] for m in report["members"])
    assert report["ensemble"]["validation"]["loss"] <= best_member + 1e-9  # never worse than the best member
    assert predict(result.model_dir, ["hello"], max_new_tokens=3)[0][0]["generated_text"] is not None


def test_a_token_classification_soup_answers_predict(tmp_path, tiny_bert_dir):
    files = DataFiles(write_jsonl(tmp_path / "train.jsonl", ner_rows(48, seed=0)),
                      write_jsonl(tmp_path / "valid.jsonl", ner_rows(16, seed=1)))
    body = {"model": "m", "training_file": "t", "validation_file": "v", "task": "token-classification",
            "hyperparameters": {"n_epochs": 1, "batch_size": 8},
            "config": {"device": "cpu", "max_length": 32, "metric_for_best_model": "f1"}}
    members, result, _ = soup_of(tmp_path, tiny_bert_dir, files, body)
    report = assert_mean_of_ingredients(members, result)
    assert "test" not in report["ensemble"]  # no test file: validation only
    assert isinstance(predict(result.model_dir, ["alice went to paris"]), list)


def test_a_soup_of_members_with_different_heads_is_refused(tmp_path, tiny_bert_dir):
    from core.errors import EngineError
    from tests.tiny_models import sentiment_rows, write_text_dataset

    files = DataFiles(write_text_dataset(tmp_path / "train.csv", sentiment_rows(24)),
                      write_text_dataset(tmp_path / "valid.csv", sentiment_rows(8, seed=1)))
    body = {"model": "m", "training_file": "t", "validation_file": "v", "task": "text-classification",
            "hyperparameters": {"n_epochs": 1, "batch_size": 8}, "config": {"device": "cpu", "max_length": 16}}
    members = []
    for i, head in enumerate(({}, {"type": "mlp", "hidden_sizes": [8]})):
        spec = JobSpec.model_validate({**body, "config": {**body["config"], "head": head}})
        result = run(spec, RunPaths(model=str(tiny_bert_dir), train_file=files.train, validation_file=files.validation,
                                    test_file=None, work_dir=tmp_path / f"m{i}"), ListSink(), archive=False)
        members.append(Member(i, f"job-{i}", result.model_dir, spec))
    parent = JobSpec.model_validate({**body, "config": {**body["config"], "ensemble": {"method": "soup"}}})
    with pytest.raises(EngineError) as e:
        combine(parent, members, files, tmp_path / "parent", ListSink())
    assert e.value.param == "config.ensemble.members" and "member 1 (job-1)" in e.value.message
