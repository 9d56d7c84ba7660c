"""causal-lm: the torch-free reader, label masking, packing without cross-example attention, the
loss/units contract, metrics, and whole engine runs on a tiny Llama (tests/tiny_causal.py).

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/core/test_causal_lm.py
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.adapters import DataFiles, adapter_for
from core.adapters.causal_data import IGNORE, encode, pack
from core.adapters.causal_lm import CausalLM
from core.callbacks import Callback
from core.datasets import chat, infer_task
from core.engine import RunPaths, run
from core.errors import DataError, ModelError
from core.loading import gguf_source
from core.sink import ListSink
from core.spec import CAUSAL_LM_METRICS, JobSpec, Task, TrainingConfig
from tests.tiny_causal import (
    CHATML_GENERATION_TEMPLATE,
    build_tokenizer,
    chat_rows,
    corpus_of,
    save_tiny_llama,
    write_jsonl,
)
from tests.tiny_models import write_text_dataset

ALPACA = Path(__file__).resolve().parents[3] / "shared" / "data" / "alpaca_en_demo" / "train.jsonl"

MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "You answer with one fruit."},
        {"role": "user", "content": "what goes with red?"},
        {"role": "assistant", "content": "apple goes with red."},
        {"role": "user", "content": "and green?"},
        {"role": "assistant", "content": "lime."},
    ]
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return CausalLM(_spec(tiny_llama)).load_processor(str(tiny_llama))


def _spec(model: Path | str, **config) -> JobSpec:
    return JobSpec(task="causal-lm", model=str(model), training_file="train.jsonl",
                   config={"device": "cpu", "precision": "fp32", **config})


def _conversations(rows, config: TrainingConfig | None = None) -> list[chat.Conversation]:
    config = config or TrainingConfig()
    return [chat._conversation(r, where=f"line {i + 1}", param="training_file", config=config) for i, r in enumerate(rows)]


def _targets(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded runs of consecutive target tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


# --- reader --------------------------------------------------------------------------------


def test_reader_reads_every_row_shape_and_summarizes(tmp_path):
    rows = [
        MULTI_TURN,
        {"prompt": "2 + 2 =", "completion": " 4"},
        {"instruction": "Name a fruit.", "input": "", "output": "apple"},
        {"instruction": "Translate.", "input": "rouge", "output": "red"},
        {"text": "plain text is learned in full."},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    summary = chat.inspect(path, param="training_file", config=TrainingConfig())
    assert summary.task == Task.CAUSAL_LM and summary.rows == 5 and summary.labels is None
    assert summary.details == {
        "shapes": {"messages": 1, "prompt_completion": 1, "alpaca": 2, "text": 1},
        "messages": 5 + 2 + 2 + 2,
        "assistant_messages": 2 + 1 + 1 + 1,
    }
    conversations = chat.read(path, param="training_file", config=TrainingConfig())
    assert conversations[3].messages == (chat.Message("user", "Translate.\n\nrouge"), chat.Message("assistant", "red"))
    assert conversations[2].messages[0].content == "Name a fruit."
    assert conversations[4].text == "plain text is learned in full." and conversations[4].messages == ()
    assert infer_task(path, TrainingConfig()) == Task.CAUSAL_LM
    chat.check_split(summary, summary, param="validation_file")


def test_reader_reads_csv_cells_and_parquet_structs(tmp_path):
    rows = [{"messages": json.dumps(MULTI_TURN["messages"])}]
    csv_summary = chat.inspect(write_text_dataset(tmp_path / "t.csv", rows), param="training_file", config=TrainingConfig())
    assert csv_summary.details["messages"] == 5
    # Parquet gives every message every struct field: a missing weight arrives as None.
    structs = [{"messages": [{"role": "user", "content": "hi", "weight": None},
                             {"role": "assistant", "content": "hello", "weight": 0}]},
               {"messages": [{"role": "user", "content": "yo", "weight": None},
                             {"role": "assistant", "content": "hey", "weight": 1}]}]
    read = chat.read(write_text_dataset(tmp_path / "t.parquet", structs), param="training_file", config=TrainingConfig())
    assert [m.weight for c in read for m in c.messages] == [1, 0, 1, 1]
    assert read[1].where == "row 2"


def test_reader_reads_the_alpaca_demo():
    if not ALPACA.is_file():
        pytest.skip(f"no {ALPACA}")
    summary = chat.inspect(ALPACA, param="training_file", config=TrainingConfig())
    lines = sum(1 for line in ALPACA.open() if line.strip())
    assert summary.rows == lines and summary.details["shapes"] == {"alpaca": lines}


def _message_row(*messages) -> dict:
    return {"messages": list(messages)}


USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize(
    "row, fragment",
    [
        (_message_row(USER, {"role": "robot", "content": "x"}), "unknown role 'robot'"),
        (_message_row({"role": "user", "content": "  "}, ASSISTANT), "'content' is empty"),
        (_message_row(USER, {"role": "assistant", "content": 5}), "'content' must be a string, not int"),
        (_message_row(USER, {"role": "assistant"}), "'content' must be a string, not null"),
        (_message_row(USER), "no assistant message"),
        (_message_row(USER, ASSISTANT, USER), "must end with the assistant"),
        (_message_row(USER, {**ASSISTANT, "weight": 2}), "must be 0 or 1"),
        (_message_row({**USER, "weight": 1}, ASSISTANT), "assistant messages only"),
        (_message_row(USER, {**ASSISTANT, "tool_calls": []}), "unsupported key(s) 'tool_calls'"),
        (_message_row(USER, "hello"), "must be an object"),
        ({"messages": []}, "non-empty list"),
        ({"messages": "[not json"}, "not valid JSON"),
        ({"prompt": "a", "completion": ["b"]}, "'completion' must be a string, not a list"),
        ({"instruction": "a", "input": 3, "output": "b"}, "'input' must be a string, not int"),
        ({"instruction": "a", "output": ""}, "'output' is empty"),
        ({"body": "no known keys"}, "not a causal-lm row (keys: body)"),
    ],
)
def test_reader_names_the_line_of_a_bad_row(tmp_path, row, fragment):
    path = write_jsonl(tmp_path / "train.jsonl", [MULTI_TURN, row])
    with pytest.raises(DataError) as e:
        chat.inspect(path, param="validation_file", config=TrainingConfig())
    assert e.value.param == "validation_file"
    assert e.value.message.startswith("line 2") and fragment in e.value.message, e.value.message


def test_reader_refuses_an_empty_file_and_a_foreign_extension(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no data rows"):
        chat.inspect(tmp_path / "empty.jsonl", param="training_file", config=TrainingConfig())
    (tmp_path / "data.txt").write_text("hello\n")
    with pytest.raises(DataError) as e:
        chat.read(tmp_path / "data.txt", param="test_file", config=TrainingConfig())
    assert e.value.param == "test_file" and e.value.code == "invalid_file_format"


def test_reader_does_not_import_torch():
    code = "import sys, core.datasets.chat; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


# --- encoding and masking --------------------------------------------------------------------


def _encode(tokenizer, rows, **options):
    settings = {"max_length": 256, "truncation_side": "right", "train_on_inputs": False, "param": "training_file"}
    settings |= options
    return encode(tokenizer, _conversations(rows), **settings)


def test_only_the_assistant_content_and_its_end_of_turn_are_targets(tokenizer):
    encoded = _encode(tokenizer, [MULTI_TURN])
    ids, labels = encoded.input_ids[0], encoded.labels[0]
    assert _targets(tokenizer, ids, labels) == ["apple goes with red.<|im_end|>", "lime.<|im_end|>"]
    assert labels[0] == IGNORE
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(MULTI_TURN["messages"], tokenize=False)


def test_mask_equals_transformers_assistant_mask_of_a_generation_template(tokenizer):
    """An independent reference: {% generation %} marks exactly what the assistant says."""
    marked = build_tokenizer(corpus_of(chat_rows(64)), chat_template=CHATML_GENERATION_TEMPLATE)
    rows = chat_rows(12, seed=3)
    encoded = _encode(marked, rows)
    for row, ids, labels in zip(rows, encoded.input_ids, encoded.labels):
        reference = marked.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
        assert ids == list(reference["input_ids"])
        assert [label != IGNORE for label in labels] == [bool(m) for m in reference["assistant_masks"]]


def test_weight_zero_turns_are_not_learned_even_with_train_on_inputs(tokenizer):
    messages = [dict(m) for m in MULTI_TURN["messages"]]
    messages[2]["weight"] = 0
    encoded = _encode(tokenizer, [{"messages": messages}])
    assert _targets(tokenizer, encoded.input_ids[0], encoded.labels[0]) == ["lime.<|im_end|>"]
    everything = _encode(tokenizer, [{"messages": messages}], train_on_inputs=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    start = full.index("apple goes")
    end = start + len("apple goes with red.<|im_end|>")
    # Everything but the first token (<|im_start|>) and the weight-0 turn.
    expected = [full[len("<|im_start|>"):start], full[end:]]
    assert _targets(tokenizer, everything.input_ids[0], everything.labels[0]) == expected


def test_prompt_completion_alpaca_and_text_rows(tokenizer):
    rows = [{"prompt": "what goes with red?", "completion": "apple."},
            {"instruction": "what goes with red?", "input": "", "output": "apple."},
            {"text": "apple goes with red."}]
    templated = _encode(tokenizer, rows)
    chat_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "what goes with red?"}, {"role": "assistant", "content": "apple."}],
        tokenize=True, return_dict=True)["input_ids"]
    assert templated.input_ids[0] == templated.input_ids[1] == list(chat_ids)
    assert _targets(tokenizer, templated.input_ids[0], templated.labels[0]) == ["apple.<|im_end|>"]
    text_ids, text_labels = templated.input_ids[2], templated.labels[2]
    assert tokenizer.decode(text_ids) == "apple goes with red.<|im_end|>"  # text + eos
    assert text_labels == [IGNORE] + text_ids[1:]

    plain = build_tokenizer(corpus_of(chat_rows(64)), chat_template=None)
    untemplated = _encode(plain, rows[:2])
    eos = plain.eos_token
    assert tokenizer.decode(untemplated.input_ids[0]) == "what goes with red?apple." + eos
    assert _targets(plain, untemplated.input_ids[0], untemplated.labels[0]) == ["apple." + eos]
    assert plain.decode(untemplated.input_ids[1]) == "what goes with red?\n\napple." + eos
    with pytest.raises(ModelError, match="no chat template"):
        _encode(plain, [MULTI_TURN])


def test_an_eos_the_tokenizer_adds_itself_is_learned_once(tokenizer):
    from tokenizers import processors

    adds_eos = build_tokenizer(corpus_of(chat_rows(64)), chat_template=None)
    eos = adds_eos.eos_token
    adds_eos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", special_tokens=[(eos, adds_eos.eos_token_id)])
    assert adds_eos("red")["input_ids"][-1] == adds_eos.eos_token_id
    encoded = _encode(adds_eos, [{"text": "apple goes with red."}, {"prompt": "red?", "completion": "apple."}])
    assert [adds_eos.decode(ids) for ids in encoded.input_ids] == [f"apple goes with red.{eos}", f"red?apple.{eos}"]
    assert _targets(adds_eos, encoded.input_ids[1], encoded.labels[1]) == [f"apple.{eos}"]
    assert encoded.labels[0][-1] == adds_eos.eos_token_id


def test_truncation_keeps_the_chosen_end_and_drops_rows_without_targets(tokenizer):
    long_question = {"messages": [{"role": "user", "content": " ".join(["what goes with red?"] * 20)},
                                  {"role": "assistant", "content": "apple."}]}
    short = {"messages": [{"role": "user", "content": "red?"}, {"role": "assistant", "content": "apple."}]}
    right = _encode(tokenizer, [long_question, short], max_length=24)
    assert right.dropped == 1 and len(right.input_ids) == 1 and len(right.input_ids[0]) <= 24
    left = _encode(tokenizer, [long_question], max_length=24, truncation_side="left")
    assert left.dropped == 0 and len(left.input_ids[0]) == 24
    assert _targets(tokenizer, left.input_ids[0], left.labels[0]) == ["apple.<|im_end|>"]


def test_prepare_counts_dropped_rows_and_refuses_a_split_with_nothing_left(tiny_llama, tokenizer, tmp_path):
    long_question = {"messages": [{"role": "user", "content": " ".join(["what goes with red?"] * 20)},
                                  {"role": "assistant", "content": "apple."}]}
    short = [{"messages": [{"role": "user", "content": f"{color}?"}, {"role": "assistant", "content": "apple."}]}
             for color in ("red", "green", "blue", "black", "white")]
    train = write_jsonl(tmp_path / "train.jsonl", [long_question] + short)
    adapter = CausalLM(_spec(tiny_llama, max_length=24))
    data = adapter.prepare(DataFiles(train), tokenizer)
    details = data.summaries["training_file"].details
    assert details["dropped_after_truncation"] == 1 and len(data.train) == 5 and data.labels is None
    assert details["target_tokens"] == sum(t != IGNORE for labels in data.train.targets for t in labels)
    only_long = write_jsonl(tmp_path / "long.jsonl", [long_question])
    with pytest.raises(DataError) as e:
        adapter.prepare(DataFiles(train, validation=only_long), tokenizer)
    assert e.value.param == "config.max_length" and "validation file" in e.value.message


# --- packing ---------------------------------------------------------------------------------


def test_pack_places_every_example_once_within_capacity():
    lengths = [5, 3, 7, 2, 8, 1, 10, 4, 4, 6]
    rows = pack(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == math.ceil(sum(lengths) / 10)  # 50 tokens fit 5 rows exactly here
    assert pack([12, 3], 10)[0] == [0]  # an over-long example (never after truncation) gets its own row


@pytest.fixture(scope="module")
def packed(tiny_llama, tokenizer, tmp_path_factory):
    """(adapter, model in eval mode, unpacked data, packed data) of 24 chat rows."""
    train = write_jsonl(tmp_path_factory.mktemp("packed") / "train.jsonl", chat_rows(24, seed=5))
    plain = CausalLM(_spec(tiny_llama, max_length=96))
    adapter = CausalLM(_spec(tiny_llama, max_length=96, packing=True))
    unpacked_data = plain.prepare(DataFiles(train), tokenizer)
    packed_data = adapter.prepare(DataFiles(train), tokenizer)
    torch.manual_seed(0)
    model = adapter.build_model(str(tiny_llama), packed_data, tokenizer).eval()
    return adapter, model, unpacked_data, packed_data


def _segments(position_ids: list[int]) -> list[tuple[int, int]]:
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return list(itertools.pairwise(starts))


def test_packed_rows_restart_positions_and_hide_example_boundaries(packed):
    _, _, unpacked, data = packed
    assert len(unpacked.train) // 2  # 24 short chats fill few 96-token rows
    assert sorted(len(ids) for ids in unpacked.train.features["input_ids"]) == sorted(
        e - s for row in data.train.features["position_ids"] for s, e in _segments(row))
    for positions, labels in zip(data.train.features["position_ids"], data.train.targets):
        assert all(labels[s] == IGNORE for s, _ in _segments(positions))
        assert len(positions) <= 96
    assert data.summaries["training_file"].details["packed_rows"] == len(data.train)


@torch.no_grad()
def test_packed_logits_equal_each_example_alone(packed):
    adapter, model, _, data = packed
    indices = list(range(len(data.train)))
    batch = adapter.collate(data.train, indices, pad_to_multiple_of=8)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    checked = 0
    for row, index in enumerate(indices):
        ids, positions = data.train.features["input_ids"][index], data.train.features["position_ids"][index]
        for start, end in _segments(positions):
            alone = model(input_ids=torch.tensor([ids[start:end]]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[row, start:end], alone, atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked == 24
    # The check can fail: the same row read as one sequence attends across examples.
    crossed = model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1], use_cache=False).logits
    assert not torch.allclose(crossed, logits[:1], atol=1e-3)


@torch.no_grad()
def test_packed_loss_is_the_token_weighted_mean_of_per_example_losses(packed, tokenizer):
    adapter, model, unpacked, data = packed
    batch = adapter.collate(data.train, list(range(len(data.train))))
    loss_sum, _ = adapter.loss_sum(model, batch)
    units = adapter.units(batch)
    total, tokens = 0.0, 0
    for ids, labels in zip(unpacked.train.features["input_ids"], unpacked.train.targets):
        # transformers' own shifted loss, a reference independent of loss_sum.
        mean = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]), use_cache=False).loss
        n = sum(label != IGNORE for label in labels)
        total, tokens = total + float(mean) * n, tokens + n
    assert units == tokens == unpacked.summaries["training_file"].details["target_tokens"]
    assert float(loss_sum) / units == pytest.approx(total / tokens, rel=1e-5)
    # The padded, unpacked batch of the same examples gives the same sum.
    unpacked_batch = adapter.collate(unpacked.train, list(range(len(unpacked.train))))
    assert "position_ids" not in unpacked_batch
    unpacked_sum, _ = adapter.loss_sum(model, unpacked_batch)
    assert float(unpacked_sum) == pytest.approx(float(loss_sum), rel=1e-5)


@torch.no_grad()
def test_first_token_of_a_packed_example_is_not_predicted_from_the_previous_one(packed, tiny_llama, tokenizer, tmp_path):
    """Text rows learn every token; in a packed row only the boundary rule keeps each example's
    first token out of the loss, as it is out of the loss of the example alone."""
    _, model, _, _ = packed
    pairs = [("apple", "red"), ("lime", "green"), ("plum", "purple")]
    texts = [{"text": f"{fruit} goes with {color}."} for fruit, color in pairs]
    train = write_jsonl(tmp_path / "train.jsonl", texts)
    adapter = CausalLM(_spec(tiny_llama, packing=True, max_length=64))
    data = adapter.prepare(DataFiles(train), tokenizer)
    assert len(data.train) == 1
    batch = adapter.collate(data.train, [0])
    loss_sum, _ = adapter.loss_sum(model, batch)
    lengths = [len(tokenizer(t["text"])["input_ids"]) + 1 for t in texts]  # + eos
    assert adapter.units(batch) == sum(n - 1 for n in lengths)
    alone = 0.0
    for ids in torch.split(batch["input_ids"][0], lengths):
        alone += float(model(input_ids=ids[None], labels=ids[None], use_cache=False).loss) * (len(ids) - 1)
    assert float(loss_sum) == pytest.approx(alone, rel=1e-5)


def test_collate_pads_right_and_counts_trained_tokens(packed, tokenizer):
    adapter, _, unpacked, data = packed
    for split, packed_rows in ((unpacked.train, False), (data.train, True)):
        indices = [0, len(split) - 1]
        batch = adapter.collate(split, indices, pad_to_multiple_of=16)
        lengths = [split.lengths[i] for i in indices]
        assert batch["input_ids"].shape[1] % 16 == 0 and batch["input_ids"].shape[1] >= max(lengths)
        assert batch["attention_mask"].sum(1).tolist() == lengths
        for row, n in enumerate(lengths):
            assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
            assert (batch["labels"][row, n:] == IGNORE).all()
            assert batch["input_ids"][row, :n].tolist() == split.features["input_ids"][indices[row]]
        assert adapter.trained_tokens(batch) == sum(lengths)
        assert ("position_ids" in batch) == packed_rows
        if packed_rows:  # the padding tail is a segment of its own
            n = lengths[0]
            assert batch["position_ids"][0, n:].tolist() == list(range(batch["input_ids"].shape[1] - n))


# --- metrics ---------------------------------------------------------------------------------


def test_compute_metrics_counts_target_tokens_only():
    adapter = CausalLM(_spec("unused"))
    targets = [torch.tensor([[IGNORE, 5, 6, IGNORE], [IGNORE, 7, IGNORE, IGNORE]]), torch.tensor([[IGNORE, 1, 2, 3]])]
    predictions = [torch.tensor([[IGNORE, 5, 0, 9], [4, 7, 1, 1]]), torch.tensor([[IGNORE, 1, 9, 9]])]
    metrics = adapter.compute_metrics(predictions, targets, loss=1.25, report=True)
    assert metrics == {"loss": 1.25, "perplexity": math.exp(1.25), "token_accuracy": 3 / 6, "tokens": 6}
    assert set(adapter.compute_metrics(predictions, targets, loss=0.5, report=False)) == set(CAUSAL_LM_METRICS)
    assert adapter.metrics == CAUSAL_LM_METRICS


@torch.no_grad()
def test_evaluate_matches_a_manual_computation(packed):
    adapter, model, unpacked, _ = packed
    metrics = adapter.evaluate(model, unpacked.train, device=torch.device("cpu"),
                               precision=_fp32(), batch_size=5, report=True)
    nll, correct, tokens = 0.0, 0, 0
    for ids, labels in zip(unpacked.train.features["input_ids"], unpacked.train.targets):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1]
        target = torch.tensor(labels[1:])
        keep = target != IGNORE
        nll += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
        correct += int((logits[keep].argmax(-1) == target[keep]).sum())
        tokens += int(keep.sum())
    assert metrics["tokens"] == tokens
    assert metrics["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-12)
    assert metrics["token_accuracy"] == pytest.approx(correct / tokens)


def _fp32():
    from core.device import Precision

    return Precision("fp32", None)


# --- models ----------------------------------------------------------------------------------


def test_gguf_sources(tmp_path):
    folder = tmp_path / "gguf"
    folder.mkdir()
    assert gguf_source(str(folder)) is None
    (folder / "model.Q4_1.gguf").write_bytes(b"GGUF")
    assert gguf_source(str(folder)) == (folder, "model.Q4_1.gguf")
    assert gguf_source(str(folder / "model.Q4_1.gguf")) == (folder, "model.Q4_1.gguf")
    (folder / "model.Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="several GGUF files"):
        gguf_source(str(folder))
    with pytest.raises(ModelError) as e:
        gguf_source(str(tmp_path / "missing.gguf"))
    assert e.value.code == "model_not_found"
    (folder / "model.safetensors").write_bytes(b"")
    assert gguf_source(str(folder)) is None  # safetensors win


def test_build_model_refuses_pickles_and_turns_the_cache_off(tiny_llama, tokenizer, tmp_path):
    adapter = adapter_for(Task.CAUSAL_LM, _spec(tiny_llama))
    assert isinstance(adapter, CausalLM)
    model = adapter.build_model(str(tiny_llama), None, tokenizer)
    assert model.config.use_cache is False and model.config.pad_token_id == tokenizer.pad_token_id
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="safetensors"):
        adapter.build_model(str(tmp_path / "pickled"), None, tokenizer)


# --- the engine --------------------------------------------------------------------------------


class _Losses(Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_step_end(self, state, control):
        self.losses.append(state.loss)


def _run(tiny_llama, tmp_path, files, *, name, hyperparameters, **config):
    spec = JobSpec(task="causal-lm", model=str(tiny_llama), training_file="train.jsonl",
                   validation_file="validation.jsonl" if files.get("validation") else None,
                   hyperparameters=hyperparameters,
                   config={"device": "cpu", "precision": "fp32", "max_length": 64, **config}, seed=7)
    losses, sink = _Losses(), ListSink()
    paths = RunPaths(model=str(tiny_llama), train_file=files["train"], validation_file=files.get("validation"),
                     test_file=None, work_dir=tmp_path / name)
    result = run(spec, paths, sink, callbacks=[losses])
    return result, sink, losses.losses


def test_engine_trains_a_tiny_llama_and_validation_loss_falls(tiny_llama, tmp_path):
    files = {"train": write_jsonl(tmp_path / "train.jsonl", chat_rows(48, seed=1)),
             "validation": write_jsonl(tmp_path / "validation.jsonl", chat_rows(16, seed=2))}
    result, sink, _ = _run(tiny_llama, tmp_path, files, name="plain",
                           hyperparameters={"n_epochs": 4, "batch_size": 8, "learning_rate_multiplier": 1},
                           optimizer={"learning_rate": 3e-3}, eval_every_steps=6)
    valid = sink.series("valid", "loss")
    assert len(valid) >= 4 and valid[-1] < valid[0] - 0.5, valid
    perplexities = sink.series("valid", "perplexity")
    assert perplexities[-1] == pytest.approx(math.exp(valid[-1]), rel=1e-6)
    assert result.trained_tokens > 0 and (result.model_dir / "model.safetensors").is_file()
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(result.model_dir).use_cache is True


def test_engine_packed_and_unpacked_train_the_same_when_batches_hold_the_same_examples(tiny_llama, tmp_path):
    """One batch per epoch holding every example: packing changes the layout, not the gradient."""
    files = {"train": write_jsonl(tmp_path / "train.jsonl", chat_rows(20, seed=4))}
    common = {"hyperparameters": {"n_epochs": 3, "batch_size": 64}, "optimizer": {"learning_rate": 3e-3},
              "group_by_length": False}
    plain, _, plain_losses = _run(tiny_llama, tmp_path, files, name="plain", **common)
    packed, _, packed_losses = _run(tiny_llama, tmp_path, files, name="packed", packing=True, **common)
    assert len(plain_losses) == len(packed_losses) == 3
    assert packed_losses == pytest.approx(plain_losses, rel=1e-4)
    assert packed_losses[-1] < packed_losses[0]
    assert packed.trained_tokens == plain.trained_tokens
