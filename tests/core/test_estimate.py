"""core.estimate: a dry run's counts are what a training run counts (causal-lm chat rows truncated
and dropped, packed rows, DPO pairs), and parameter counts read off safetensors headers equal the
model's own, lookup tables out of the compute count and a tied output layer in."""

from __future__ import annotations

import pytest

from core.engine import RunPaths, run
from core.estimate import count_inputs, model_parameters, weight_parameters
from core.sink import ListSink
from core.spec import JobSpec, Task
from tests.tiny_causal import chat_rows, preference_rows, save_tiny_llama, write_jsonl
from tests.tiny_models import save_tiny_bert


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("estimate") / "llama")


@pytest.mark.parametrize("method, config", [
    ("supervised", {"max_length": 24}),  # long rows cut, some left with no answer token: dropped
    ("supervised", {"packing": True, "max_length": 64}),
    ("dpo", {}),
], ids=["truncated", "packed", "dpo"])
def test_counts_are_what_training_counts(tiny_llama, tmp_path, method, config):
    rows = preference_rows(12, seed=1) if method == "dpo" else chat_rows(24, seed=1)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    body = {"model": str(tiny_llama), "training_file": "f", "task": "causal-lm", "seed": 3,
            "hyperparameters": {"n_epochs": 2, "batch_size": 4}, "config": config}
    spec = JobSpec.model_validate(body | ({"method": "dpo"} if method == "dpo" else {}))
    [counted] = count_inputs(str(tiny_llama), Task.CAUSAL_LM, {"training_file": train}, [spec])
    sink = ListSink()
    result = run(spec, RunPaths(str(tiny_llama), train, None, None, tmp_path / "work"), sink, archive=False)
    assert result.trained_tokens == 2 * counted["training_file"]["tokens"] > 0
    described = next(m for _, m, _ in sink.events if m.startswith("Training "))
    assert f"on {counted['training_file']['examples']} examples" in described
    if "max_length" in config and not config.get("packing"):
        assert counted["training_file"]["examples"] < len(rows)  # the rows truncation left without a target


def test_parameter_counts_from_headers_equal_the_models(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, BertModel

    llama = AutoModelForCausalLM.from_pretrained(tiny_llama)
    counts = weight_parameters(tiny_llama, causal_lm=True)
    table = llama.get_input_embeddings().weight.numel()
    assert counts["total"] == sum(p.numel() for p in llama.parameters())
    assert counts["compute"] == counts["total"]  # the table out as a lookup, back in as the tied output layer
    assert model_parameters(str(tiny_llama), Task.CAUSAL_LM) == counts
    as_classifier = weight_parameters(tiny_llama, causal_lm=False)
    assert as_classifier["compute"] == counts["total"] - table

    bert_dir = save_tiny_bert(tmp_path / "bert")
    bert = BertModel.from_pretrained(bert_dir)
    counts = weight_parameters(bert_dir, causal_lm=False)
    lookups = sum(m.weight.numel() for m in (bert.embeddings.word_embeddings, bert.embeddings.position_embeddings,
                                              bert.embeddings.token_type_embeddings))
    assert counts == {"total": sum(p.numel() for p in bert.parameters()),
                      "compute": sum(p.numel() for p in bert.parameters()) - lookups}
    assert weight_parameters(tmp_path, causal_lm=False) is None  # no weights


def test_local_files_only_counts_a_cached_hub_model_without_asking_the_hub(tmp_path, monkeypatch):
    """A worker counting for a hub model the hub cannot deliver now loads it from its local cache,
    per call (local_files_only), not by setting HF_HUB_OFFLINE in a process that serves others too."""
    import shutil

    import huggingface_hub.constants as hub

    from tests.hub_stub import StubHub

    folder = save_tiny_bert(tmp_path / "bert")
    cached = tmp_path / "hf-cache" / "models--org--tiny-bert"
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text("0123abcd")
    shutil.copytree(folder, cached / "snapshots" / "0123abcd")
    stub = StubHub()  # a hub that answers every request with an empty 200: asking it breaks the load
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hub, "ENDPOINT", stub.url)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    # huggingface_hub's user-agent telemetry fetches a registry of its own (once a day); not a load.
    monkeypatch.setattr(hub, "HF_HUB_DISABLE_TELEMETRY", True)
    train = tmp_path / "train.csv"
    train.write_text("text,label\ngreat movie,pos\nawful film,neg\nloved it,pos\nhated it,neg\n")
    spec = JobSpec.model_validate({"model": "org/tiny-bert", "training_file": "f", "task": "text-classification"})
    try:
        counted = count_inputs("org/tiny-bert", Task.TEXT_CLASSIFICATION, {"training_file": train}, [spec],
                               local_files_only=True)
        params = model_parameters("org/tiny-bert", Task.TEXT_CLASSIFICATION, local_files_only=True)
        assert stub.requests == []
        assert counted == count_inputs(str(folder), Task.TEXT_CLASSIFICATION, {"training_file": train}, [spec])
        assert params == weight_parameters(folder, causal_lm=False)
        # The same calls without it ask the hub (which is why a worker passes it when the hub is away).
        model_parameters("org/tiny-bert", Task.TEXT_CLASSIFICATION)
        assert stub.requests
    finally:
        stub.close()


def _gguf(path, tensors: dict[str, tuple[int, ...]]):
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    for name, shape in tensors.items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_parameter_counts_of_a_gguf_model_from_its_tensor_index(tmp_path):
    folder = tmp_path / "uploaded"  # an uploaded purpose=model archive holding one .gguf
    folder.mkdir()
    layers = {"token_embd.weight": (16, 8), "blk.0.attn_q.weight": (8, 8), "output_norm.weight": (8,)}
    _gguf(folder / "m.Q8_0.gguf", layers)
    tied = model_parameters(str(folder), Task.CAUSAL_LM)
    assert tied == {"total": 200, "compute": 200}  # the table out as a lookup, back in as the tied output
    assert model_parameters(str(folder / "m.Q8_0.gguf"), Task.CAUSAL_LM) == tied
    (folder / "m.Q8_0.gguf").unlink()
    _gguf(folder / "m.gguf", {**layers, "output.weight": (16, 8)})
    assert model_parameters(str(folder), Task.CAUSAL_LM) == {"total": 328, "compute": 200}
    _gguf(folder / "other.gguf", layers)
    assert model_parameters(str(folder), Task.CAUSAL_LM) is None  # two files: which one is unknown
