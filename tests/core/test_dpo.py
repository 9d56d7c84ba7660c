"""DPO (method.type "dpo"): the reader of OpenAI's preference rows, the objective against TRL's
DPOTrainer on the same batch, the invariants of the reference model, and whole engine runs on a
tiny Llama (tests/tiny_causal.py).

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/core/test_dpo.py
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from core import dpo
from core.adapters import DataFiles, adapter_for
from core.datasets import chat, infer_task
from core.device import resolve_precision
from core.engine import RunPaths, run
from core.errors import DataError
from core.sink import ListSink
from core.spec import JobSpec, Task, TrainingConfig
from core.surgery import prepare_model
from tests.tiny_causal import chat_rows, preference_rows, save_tiny_llama, write_jsonl

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", preference_rows(24, seed=3))


def _spec(model, *, lora: bool, beta: float = 0.1, loss_type: str = "sigmoid", **config) -> JobSpec:
    body = {"model": str(model), "training_file": "t", "task": "causal-lm", "method": "dpo",
            "hyperparameters": {"beta": beta}, "config": {"max_length": 64, "dpo": {"loss_type": loss_type}, **config}}
    if lora:
        body["config"]["lora"] = {"r": 4, "dropout": 0.0}
    return JobSpec.model_validate(body)


def _prepared(spec: JobSpec, model_dir, pairs_file):
    """(adapter, data, model) as core.engine.build_job makes them, on the CPU in fp32."""
    adapter = adapter_for(Task.CAUSAL_LM, spec)
    processor = adapter.load_processor(str(model_dir))
    data = adapter.prepare(DataFiles(pairs_file), processor)
    model, _, _ = prepare_model(adapter.build_model(str(model_dir), data, processor), spec.config, task=Task.CAUSAL_LM)
    return adapter, data, model


def _perturb(model: torch.nn.Module, *, only: str | None = None, seed: int = 1) -> None:
    """Move the trainable weights (LoRA's only, when `only` names them) so the policy differs from the reference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (only is None or only in name):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


# --- reading -----------------------------------------------------------------------------------


def test_preference_rows_are_read_with_their_prompt_and_both_answers(pairs_file):
    assert infer_task(pairs_file, TrainingConfig()) == Task.CAUSAL_LM
    parsed = chat.parse(pairs_file, param="training_file", config=TrainingConfig())
    assert parsed.summary.details["shapes"] == {"preference": 24}
    pair = parsed.rows[1]  # preference_rows: row 1 has an earlier exchange in its prompt
    chosen, rejected = pair.conversations()
    assert chosen.messages[:-1] == rejected.messages[:-1]
    assert [m.weight for m in chosen.messages if m.role == "assistant"] == [0, 1]  # only the answer is learned
    assert chosen.messages[-1].content != rejected.messages[-1].content


@pytest.mark.parametrize("row, message", [
    ({"input": {"messages": [{"role": "user", "content": "hi"}]}, "preferred_output": [{"role": "assistant", "content": "a"}]},
     "needs 'non_preferred_output'"),
    ({"input": {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
      "preferred_output": [{"role": "assistant", "content": "a"}], "non_preferred_output": [{"role": "assistant", "content": "b"}]},
     "input.tools"),
    ({"input": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
      "preferred_output": [{"role": "assistant", "content": "a"}], "non_preferred_output": [{"role": "assistant", "content": "b"}]},
     "ends with the assistant"),
    ({"input": {"messages": [{"role": "user", "content": "hi"}]}, "preferred_output": [{"role": "user", "content": "a"}],
      "non_preferred_output": [{"role": "assistant", "content": "b"}]},
     "\"preferred_output\" must be exactly one assistant message"),
    ({"input": {"messages": [{"role": "user", "content": "hi"}]}, "preferred_output": [{"role": "assistant", "content": "a"}],
      "non_preferred_output": [{"role": "assistant", "content": ""}]},
     "non_preferred_output message 1: 'content' is empty"),
])
def test_a_bad_preference_row_is_refused_naming_its_line_and_field(tmp_path, row, message):
    good = preference_rows(1)[0]
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError) as e:
        chat.read(path, param="validation_file", config=TrainingConfig())
    assert e.value.param == "validation_file"
    assert e.value.message.startswith("line 2") and message in e.value.message, e.value.message


def test_rows_must_match_the_method(tmp_path, pairs_file):
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_rows(4))
    summaries = {"training_file": chat.inspect(chats, param="training_file", config=TrainingConfig())}
    with pytest.raises(DataError, match="trains on preference rows") as e:
        chat.check_method("dpo", summaries)
    assert e.value.param == "training_file"
    pairs = {"validation_file": chat.inspect(pairs_file, param="validation_file", config=TrainingConfig())}
    with pytest.raises(DataError, match="method.type dpo") as e:
        chat.check_method("supervised", pairs)
    assert e.value.param == "validation_file"


def test_only_the_answer_tokens_are_scored(tiny_llama, pairs_file):
    adapter, data, _ = _prepared(_spec(tiny_llama, lora=True), tiny_llama, pairs_file)
    tokenizer = adapter.load_processor(str(tiny_llama))
    parsed = chat.read(pairs_file, param="training_file", config=TrainingConfig())
    for i in (0, 1):
        chosen_labels, _ = data.train.targets[i]
        scored = tokenizer.decode([t for t in chosen_labels if t != -100])
        assert scored == parsed[i].preferred.content + "<|im_end|>"


# --- the objective ----------------------------------------------------------------------------


def _trl_trainer(policy, reference, tokenizer, *, beta: float, loss_type: str, tmp_path):
    """TRL's DPOTrainer around our model. With LoRA, TRL keeps a copy of the adapter as it is now as
    its reference (adapter "ref"); it is still the identity here, so that reference is the base model,
    as ours is (adapters disabled)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = Dataset.from_list([{"prompt": [{"role": "user", "content": "what goes with red?"}],
                               "chosen": [{"role": "assistant", "content": "apple."}],
                               "rejected": [{"role": "assistant", "content": "lime."}]}])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], report_to="none",
                     use_cpu=True, bf16=False, max_length=None, precompute_ref_log_probs=False)
    return DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=rows, processing_class=tokenizer)


def _trl_metrics(trainer, batch) -> tuple[float, dict[str, float]]:
    """TRL's loss and logged metrics on exactly our batch (its completion mask = our scored labels)."""
    trainer.model.train()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long()}
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("lora, loss_type", [(True, "sigmoid"), (False, "sigmoid"), (True, "ipo")])
def test_loss_and_rewards_equal_trl_dpo_trainer_on_the_same_batch(tiny_llama, pairs_file, tmp_path, lora, loss_type):
    spec = _spec(tiny_llama, lora=lora, beta=0.3, loss_type=loss_type)
    adapter, data, model = _prepared(spec, tiny_llama, pairs_file)
    reference = None if lora else copy.deepcopy(model).eval()
    adapter.on_model_ready(model, data, device=CPU, precision=resolve_precision(spec.config, CPU), batch_size=8)
    tokenizer = adapter.load_processor(str(tiny_llama))
    trainer = _trl_trainer(model, reference, tokenizer, beta=0.3, loss_type=loss_type, tmp_path=tmp_path)
    _perturb(model, only="lora_" if lora else None)  # the policy moves; both references stay the base model
    model.train()
    batch = adapter.collate(data.train, list(range(6)))
    with torch.no_grad():
        loss_sum, pairs = adapter.loss_sum(model, batch)
    ours = {"loss": float(loss_sum) / adapter.units(batch), **dpo.metrics(pairs, beta=0.3)}
    assert abs(ours["rewards/margins"]) > 1e-3  # the policy is not the reference: the comparison means something

    trl_loss, trl = _trl_metrics(trainer, batch)
    assert ours["loss"] == pytest.approx(trl_loss, abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"):
        assert ours[name] == pytest.approx(trl[name], abs=1e-5), name


def test_the_reference_never_changes_and_the_first_loss_is_log_2(tiny_llama, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", preference_rows(16, seed=4))
    spec = _spec(tiny_llama, lora=True)
    adapter, data, model = _prepared(spec, tiny_llama, train)
    adapter.on_model_ready(model, data, device=CPU, precision=resolve_precision(spec.config, CPU), batch_size=8)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    batch = adapter.collate(data.train, list(range(8)))
    with torch.no_grad():
        loss, _ = adapter.loss_sum(model, batch)
    assert float(loss) / 8 == pytest.approx(math.log(2), abs=1e-6)  # LoRA starts as the identity: policy == reference
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss, _ = adapter.loss_sum(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "lora_" not in n)
    with torch.no_grad(), model.disable_adapter():
        reference, _ = adapter.logps(model, batch)
    _, pairs = adapter.loss_sum(model, batch)
    assert torch.allclose(pairs[:, dpo.REF_CHOSEN], reference.view(2, -1)[0])  # still the base model's


def test_the_gradient_vanishes_as_beta_goes_to_zero_and_a_swap_flips_the_margin():
    g = torch.Generator().manual_seed(0)
    policy = torch.randn(5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    fixed = torch.cat([torch.randn(5, 2, generator=g, dtype=torch.float64), torch.full((5, 2), 4.0, dtype=torch.float64)], 1)
    norms = []
    for beta in (1.0, 1e-2, 1e-4):
        loss = dpo.losses(torch.cat([policy, fixed], 1), beta=beta, loss_type="sigmoid").sum()
        (grad,) = torch.autograd.grad(loss, policy)
        norms.append(float(grad.norm()))
    assert norms[0] > norms[1] > norms[2] and norms[2] < 1e-4 * norms[0] * 10
    pairs = torch.cat([policy.detach(), fixed], 1)
    swapped = pairs[:, [1, 0, 3, 2, 5, 4]]
    assert dpo.metrics(swapped, beta=0.1)["rewards/margins"] == pytest.approx(-dpo.metrics(pairs, beta=0.1)["rewards/margins"])


# --- whole runs --------------------------------------------------------------------------------


@pytest.mark.parametrize("lora, lr, beta, epochs", [(True, 2e-2, 1.0, 10), (False, 1e-2, 0.5, 6)])
def test_a_dpo_run_makes_the_preferred_answers_win(tiny_llama, tmp_path, lora, lr, beta, epochs):
    train = write_jsonl(tmp_path / "train.jsonl", preference_rows(64, seed=1))
    test = write_jsonl(tmp_path / "test.jsonl", preference_rows(32, seed=2))
    spec = _spec(tiny_llama, lora=lora, beta=beta, optimizer={"learning_rate": lr})
    spec = spec.model_copy(update={"hyperparameters": spec.hyperparameters.model_copy(update={"n_epochs": epochs})})
    sink = ListSink()
    result = run(spec, RunPaths(str(tiny_llama), train, None, test, tmp_path / "work"), sink, archive=False)
    before, after = result.metrics["baseline_test"], result.metrics["test"]
    assert before["rewards/margins"] == 0 and before["rewards/accuracies"] == 0  # the policy is the reference
    assert after["rewards/margins"] > 0.3 and after["rewards/accuracies"] > 0.75, after
    assert after["preference_accuracy"] >= before["preference_accuracy"] + 0.3, (before, after)
    assert after["pairs"] == 32 and result.hyperparameters["beta"] == beta
    assert any("Reference log-probabilities of 96 pairs" in e[1] for e in sink.events)
    exported = json.loads((result.model_dir / "config.json").read_text())
    assert exported["architectures"] == ["LlamaForCausalLM"]
