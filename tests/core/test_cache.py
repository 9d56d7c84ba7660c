"""The input cache (core.cache): content keys, what a hit gives back, LRU bounds, concurrency."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core.adapters import DataFiles, adapter_for
from core.cache import InputCache, Ragged, key_digest, processor_fingerprint
from core.engine import RunPaths, run
from core.sink import ListSink
from core.spec import JobSpec
from tests.core.test_token_classification import VOCAB_WORDS, ner_rows
from tests.core.test_token_classification import write_jsonl as write_ner
from tests.tiny_causal import chat_rows, save_tiny_llama, write_jsonl
from tests.tiny_models import save_tiny_bert
from tests.tiny_vision import digits_files, save_tiny_resnet


def _parts(value: dict) -> dict:
    return {"ids": Ragged(value["ids"]), "pixels": value["pixels"], "count": value["count"]}


def _value() -> dict:
    return {"ids": [[1, 2, 3], [], [4]], "pixels": np.arange(12, dtype=np.uint8).reshape(3, 4), "count": 3}


def test_a_value_is_computed_once_per_key_and_comes_back_the_same(tmp_path):
    cache = InputCache(tmp_path, 10**6)
    calls = []

    def compute():
        calls.append(1)
        return _value()

    first = cache.arrays({"kind": "k", "n": 1}, compute, dump=_parts, restore=dict)
    again = InputCache(tmp_path, 10**6).arrays({"kind": "k", "n": 1}, compute, dump=_parts, restore=dict)
    assert len(calls) == 1
    assert again["ids"] == first["ids"] == [[1, 2, 3], [], [4]]
    assert again["pixels"].dtype == np.uint8 and (again["pixels"] == first["pixels"]).all()
    assert again["count"] == 3
    cache.arrays({"kind": "k", "n": 2}, compute, dump=_parts, restore=dict)  # another key: computed again
    assert len(calls) == 2
    assert cache.misses == ["k", "k"]


def test_a_failed_build_stores_nothing(tmp_path):
    cache = InputCache(tmp_path, 10**6)

    def fail():
        raise ValueError("bad row")

    with pytest.raises(ValueError):
        cache.arrays({"kind": "k"}, fail, dump=_parts, restore=dict)
    assert not any(cache.entries.iterdir()) and not any(cache.building.iterdir())


def test_a_damaged_entry_is_built_again(tmp_path):
    cache = InputCache(tmp_path, 10**6)
    cache.arrays({"kind": "k"}, _value, dump=_parts, restore=dict)
    entry = cache.entries / key_digest({"kind": "k"})
    (entry / "pixels.npy").write_bytes(b"garbage")
    value = cache.arrays({"kind": "k"}, _value, dump=_parts, restore=dict)
    assert (value["pixels"] == _value()["pixels"]).all()
    assert cache.misses == ["k", "k"]


def _blob(n: int):
    return lambda: {"data": np.zeros(n, dtype=np.uint8)}


def _get(cache: InputCache, name: str, n: int = 4000):
    return cache.arrays({"kind": name}, _blob(n), dump=lambda v: v, restore=dict)


def test_least_recently_used_entries_go_first_and_held_ones_stay(tmp_path):
    cache = InputCache(tmp_path, 10_000)  # room for two 4 kB entries
    _get(cache, "a")
    time.sleep(0.02)
    _get(cache, "b")
    time.sleep(0.02)
    _get(cache, "a")  # a hit: now a is newer than b
    time.sleep(0.02)
    _get(cache, "c")
    names = {p.name for p in cache.entries.iterdir()}
    assert names == {key_digest({"kind": "a"}), key_digest({"kind": "c"})}

    with cache.held({"kind": "a"}, lambda out: None) as folder:  # a is being read: eviction skips it
        assert folder.name == key_digest({"kind": "a"})
        time.sleep(0.02)
        _get(cache, "d")
        _get(cache, "e")
        assert (cache.entries / key_digest({"kind": "a"})).is_dir()
    assert not (cache.entries / key_digest({"kind": "c"})).exists()


def _build_in_another_process(root: str, queue) -> None:
    cache = InputCache(Path(root), 10**6)

    def slow():
        time.sleep(0.3)
        return {"pid": os.getpid(), "ids": Ragged([[os.getpid()]])}

    value = cache.arrays({"kind": "shared"}, slow, dump=lambda v: v, restore=dict)
    queue.put((value["pid"], value["ids"]))


def test_concurrent_builders_agree_on_one_entry(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_another_process, args=(str(tmp_path), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = [queue.get(timeout=5) for _ in procs]
    assert all(p.exitcode == 0 for p in procs)
    assert len(list((tmp_path / "entries").iterdir())) == 1
    assert not list((tmp_path / "building").iterdir())
    # Each got its own value or the stored one; a later reader gets the stored one, which is one of them.
    stored = InputCache(tmp_path, 10**6).arrays({"kind": "shared"}, lambda: pytest.fail("rebuilt"),
                                                  dump=lambda v: v, restore=dict)
    assert stored["ids"] == [[stored["pid"]]] and stored["pid"] in {pid for pid, _ in results}


def test_file_hashes_are_remembered_until_the_file_changes(tmp_path):
    cache = InputCache(tmp_path / "cache", 10**6)
    data = tmp_path / "train.csv"
    data.write_text("text,label\na,b\n")
    first = cache.file_hash(data)
    assert cache.file_hash(data) == first and len(list((tmp_path / "cache" / "hashes").iterdir())) == 1
    time.sleep(0.01)
    data.write_text("text,label\na,c\n")
    assert cache.file_hash(data) != first


# --- through the adapters: a hit gives exactly what encoding gives ----------------------------------


def _text(tmp: Path):
    model = save_tiny_bert(tmp / "bert")
    from tests.tiny_models import sentiment_rows, write_text_dataset

    files = DataFiles(write_text_dataset(tmp / "train.csv", sentiment_rows(60, seed=0)),
                      write_text_dataset(tmp / "validation.csv", sentiment_rows(20, seed=1)))
    return JobSpec(task="text-classification", model=str(model), training_file="t"), files


def _tokens(tmp: Path):
    model = save_tiny_bert(tmp / "bert", vocab_words=VOCAB_WORDS)
    files = DataFiles(write_ner(tmp / "train.jsonl", ner_rows(40, seed=0)), write_ner(tmp / "v.jsonl", ner_rows(10, seed=1)))
    return JobSpec(task="token-classification", model=str(model), training_file="t"), files


def _causal(tmp: Path):
    model = save_tiny_llama(tmp / "llama")
    files = DataFiles(write_jsonl(tmp / "train.jsonl", chat_rows(20, seed=0)), write_jsonl(tmp / "v.jsonl", chat_rows(6, seed=1)))
    return JobSpec(task="causal-lm", model=str(model), training_file="t", config={"packing": True}), files


def _images(tmp: Path):
    model = save_tiny_resnet(tmp / "resnet")
    paths = digits_files(tmp / "digits", n_train=40, n_validation=20, n_test=0)
    return (JobSpec(task="image-classification", model=str(model), training_file="t"),
            DataFiles(paths["train"], paths["validation"]))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("make", [_text, _tokens, _causal, _images], ids=["text", "tokens", "causal", "images"])
def test_every_task_gets_the_same_splits_from_the_cache(make, tmp_path):
    spec, files = make(tmp_path)

    def prepare(cache):
        adapter = adapter_for(spec.task, spec, cache=cache)
        processor = adapter.load_processor(spec.model)
        return adapter, adapter.prepare(files, processor)

    plain_adapter, plain = prepare(None)
    cache = InputCache(tmp_path / "cache", 10**8)
    prepare(cache)
    assert cache.hits == [] and len(cache.misses) == 2  # training and validation split
    cached_adapter, cached = prepare(cache)
    assert len(cache.hits) == 2
    for split in ("train", "validation"):
        a, b = getattr(plain, split), getattr(cached, split)
        assert _same(a.features, b.features) and _same(a.targets, b.targets) and a.lengths == b.lengths
    assert _same(plain.summaries, cached.summaries)
    assert getattr(plain_adapter, "image_shape", None) == getattr(cached_adapter, "image_shape", None)

    other = spec.model_copy(update={"config": spec.config.model_copy(update={"max_length": 16})})
    if spec.task != "image-classification":  # another max_length encodes differently: a miss
        adapter = adapter_for(other.task, other, cache=cache)
        adapter.prepare(files, adapter.load_processor(spec.model))
        assert len(cache.misses) == 4


def test_a_tokenizer_fingerprint_follows_its_definition_not_its_folder(tmp_path):
    from core.loading import load_tokenizer

    first = save_tiny_bert(tmp_path / "a")
    copy = save_tiny_bert(tmp_path / "b")
    other = save_tiny_bert(tmp_path / "c", vocab_words=VOCAB_WORDS)
    assert processor_fingerprint(load_tokenizer(str(first))) == processor_fingerprint(load_tokenizer(str(copy)))
    assert processor_fingerprint(load_tokenizer(str(first))) != processor_fingerprint(load_tokenizer(str(other)))


def test_a_second_run_reuses_the_encodings_and_trains_the_same(tmp_path):
    spec, files = _text(tmp_path)
    spec = spec.model_copy(update={"hyperparameters": spec.hyperparameters.model_copy(update={"n_epochs": 1})})
    cache = InputCache(tmp_path / "cache", 10**8)
    results = []
    for i, use in enumerate((None, cache, cache)):
        sink = ListSink()
        paths = RunPaths(model=spec.model, train_file=files.train, validation_file=files.validation, test_file=None,
                         work_dir=tmp_path / f"run{i}")
        run(spec, paths, sink, archive=False, cache=use)
        results.append((sink.series("train", "loss"), sink))
    assert results[0][0] == results[1][0] == results[2][0]
    reused = [data["cache"] for _, message, data in results[2][1].events if data and "cache" in data]
    assert reused == [{"hits": ["tokenized texts", "tokenized texts"], "misses": []}]


def test_a_gguf_model_is_converted_once(tmp_path, monkeypatch):
    """The conversion (dequantize, save as safetensors) runs on the first job only; later ones get
    the folder. The real GGUF path is in the slow tier (tests/e2e/test_slow_smollm2.py)."""
    import core.loading as loading
    from tests.tiny_causal import build_tokenizer, corpus_of

    llama = save_tiny_llama(tmp_path / "llama")
    gguf = tmp_path / "model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF not really")
    conversions = []

    def fake_model(source):
        conversions.append(source)
        return loading.load_causal_model(str(llama)) if source == str(llama) else original_model(str(llama))

    original_model = loading.load_causal_model
    monkeypatch.setattr(loading, "load_causal_model", fake_model)
    monkeypatch.setattr(loading, "load_causal_tokenizer",
                        lambda source: build_tokenizer(corpus_of(chat_rows(10))))
    cache = InputCache(tmp_path / "cache", 10**8)
    for _ in range(2):
        with loading.cached_source(str(gguf), cache) as source:
            assert (Path(source) / "model.safetensors").is_file() and (Path(source) / "tokenizer.json").is_file()
    assert conversions == [str(gguf)] and cache.hits == ["dequantized gguf"]
    with loading.cached_source(str(llama), cache) as source:  # a safetensors folder is used where it is
        assert source == str(llama)


def test_a_fingerprint_leaves_the_tokenizer_as_it_found_it(tmp_path):
    from core.loading import load_tokenizer

    tokenizer = load_tokenizer(str(save_tiny_bert(tmp_path / "bert")))
    before = processor_fingerprint(tokenizer)
    tokenizer(["good movie"], truncation=True, max_length=8, padding="max_length")
    truncation, padding = tokenizer.backend_tokenizer.truncation, tokenizer.backend_tokenizer.padding
    assert processor_fingerprint(tokenizer) == before  # the last call's settings are not the tokenizer
    assert tokenizer.backend_tokenizer.truncation == truncation and tokenizer.backend_tokenizer.padding == padding
