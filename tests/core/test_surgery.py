"""Model surgery: dropout overrides, heads, freezing, gradual unfreezing, LoRA, checkpointing
(core.dropout, core.heads, core.freezing, core.lora and their composition, core.surgery)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from core.callbacks import Control, TrainState
from core.dropout import apply_dropout
from core.errors import EngineError
from core.freezing import GradualUnfreezing, apply_freezing
from core.heads import ClassifierHead, replace_head, restore_head
from core.layers import layer_map, original_name
from core.lora import apply_lora, export_weights
from core.spec import (
    DropoutConfig,
    FreezeConfig,
    GradualUnfreezingConfig,
    HeadConfig,
    LoraConfig,
    Task,
    TrainingConfig,
)
from core.surgery import enable_gradient_checkpointing, prepare_model
from tests.tiny_surgery_models import tiny_bert_classifier, tiny_bert_tagger, tiny_llama, tiny_resnet, token_batch


def _save(model: nn.Module, out_dir) -> None:
    model.save_pretrained(out_dir)


def _train(model: nn.Module, steps: int, *, lr: float = 1e-2, callbacks=(), state: TrainState | None = None) -> None:
    """AdamW (weight decay 0.01) steps on random labels, zeroing grads to None as the engine does."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    state = state or TrainState(max_steps=steps)
    control = Control()
    for cb in callbacks:
        cb.on_train_begin(state, control)
    model.train()
    for step in range(steps):
        batch = token_batch(seed=step)
        out = model(**batch, labels=_labels(model, batch, seed=step))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        for cb in callbacks:
            cb.on_step_end(state, control)


def _labels(model: nn.Module, batch: dict[str, torch.Tensor], *, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + seed)
    architecture = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
    if architecture.endswith("CausalLM"):
        return batch["input_ids"]
    shape = batch["input_ids"].shape if architecture.endswith("TokenClassification") else batch["input_ids"].shape[:1]
    return torch.randint(0, model.config.num_labels, shape, generator=generator)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@torch.no_grad()
def _logits(model: nn.Module, batch: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    model.eval()
    return model(**(batch or token_batch(seed=99))).logits


# --- Dropout -------------------------------------------------------------------------------------


def test_dropout_overrides_reach_bert_config_and_modules():
    model = tiny_bert_classifier()
    apply_dropout(model, DropoutConfig(hidden=0.21, attention=0.32, classifier=0.43))

    assert (model.config.hidden_dropout_prob, model.config.attention_probs_dropout_prob) == (0.21, 0.32)
    assert model.config.classifier_dropout == 0.43
    expected = {"bert.embeddings.dropout": 0.21, "dropout": 0.43}
    for i in range(2):
        expected |= {f"bert.encoder.layer.{i}.attention.self.dropout": 0.32,
                     f"bert.encoder.layer.{i}.attention.output.dropout": 0.21,
                     f"bert.encoder.layer.{i}.output.dropout": 0.21}
    found = {name: m.p for name, m in model.named_modules() if isinstance(m, nn.Dropout)}
    assert found == expected


def test_dropout_overrides_llama_attention_float_and_refuses_missing_hidden_dropout():
    model = tiny_llama(attention_dropout=0.3)
    apply_dropout(model, DropoutConfig(attention=0.05, hidden=0.0))
    assert model.config.attention_dropout == 0.05
    assert [layer.self_attn.attention_dropout for layer in model.model.layers] == [0.05, 0.05]

    with pytest.raises(EngineError) as e:
        apply_dropout(model, DropoutConfig(hidden=0.1))
    assert e.value.param == "config.dropout.hidden"


@pytest.mark.parametrize("build", [
    lambda: tiny_bert_classifier(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3, classifier_dropout=0.3),
    lambda: tiny_llama(attention_dropout=0.3),
], ids=["bert", "llama"])
def test_zero_dropout_makes_train_mode_equal_eval_mode(build):
    model = build()
    batch = token_batch()

    def outputs(train: bool) -> torch.Tensor:
        model.train(train)
        torch.manual_seed(1)
        with torch.no_grad():
            return model(**batch).logits

    assert not torch.equal(outputs(True), outputs(False))  # the dropout was live
    hidden = 0.0 if hasattr(model.config, "hidden_dropout_prob") else None
    apply_dropout(model, DropoutConfig(hidden=hidden, attention=0.0, classifier=0.0))
    assert torch.equal(outputs(True), outputs(False))


def test_head_dropout_set_by_head_config_is_kept():
    model = tiny_bert_classifier()
    replace_head(model, HeadConfig(type="linear", dropout=0.5), num_outputs=3, classifier_dropout=None)
    apply_dropout(model, DropoutConfig(classifier=0.2))
    assert [m.p for m in model.classifier.modules() if isinstance(m, nn.Dropout)] == [0.5]
    assert model.dropout.p == 0.2

    other = tiny_bert_classifier()
    replace_head(other, HeadConfig(type="mlp", hidden_sizes=[8]), num_outputs=3, classifier_dropout=0.3)
    assert [m.p for m in other.classifier.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.3]
    apply_dropout(other, DropoutConfig(classifier=0.2))
    assert [m.p for m in other.classifier.modules() if isinstance(m, nn.Dropout)] == [0.2, 0.2]


# --- Head ----------------------------------------------------------------------------------------

MLP_BN = HeadConfig(type="mlp", hidden_sizes=[16, 8], activation="relu", batch_norm=True)


@pytest.mark.parametrize("build, shape", [
    (lambda: tiny_bert_classifier(num_labels=3), (4, 3)),
    (lambda: tiny_bert_tagger(num_labels=5), (4, 6, 5)),
], ids=["sequence", "token"])
def test_mlp_head_with_batch_norm_round_trips_through_save_pretrained(build, shape, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    model = build()
    replace_head(model, MLP_BN, num_outputs=shape[-1], classifier_dropout=None)
    head = model.classifier
    assert isinstance(head, ClassifierHead)
    assert [type(m).__name__ for m in head.layers] == [
        "Dropout", "Linear", "_BatchNorm", "ReLU", "Dropout", "Linear", "_BatchNorm", "ReLU", "Dropout", "Linear"]
    assert [m.out_features for m in head.layers if isinstance(m, nn.Linear)] == [16, 8, shape[-1]]
    assert all(name.startswith("classifier.layers.") for name in layer_map(model).head)
    model.train()
    with torch.no_grad():
        model(**token_batch(seed=5))  # moves the batch norm running statistics off their initial values
    assert _logits(model).shape == shape
    assert not torch.equal(head.layers[2].running_mean, torch.zeros(16))

    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["lathe_head"] == MLP_BN.model_dump()
    auto = AutoModelForTokenClassification if len(shape) == 3 else AutoModelForSequenceClassification
    loaded = auto.from_pretrained(tmp_path)
    restore_head(loaded)
    loaded.load_state_dict(load_file(tmp_path / "model.safetensors"))
    assert torch.equal(_logits(loaded), _logits(model))


def test_batch_norm_head_trains_on_a_batch_of_one():
    model = tiny_bert_classifier()
    replace_head(model, MLP_BN, num_outputs=3, classifier_dropout=None)
    model.train()
    out = model(**token_batch(batch=1), labels=torch.tensor([1]))
    assert out.logits.shape == (1, 3) and torch.isfinite(out.loss)


def test_head_replaces_the_linear_inside_resnet_sequential_and_default_changes_nothing():
    model = tiny_resnet(num_labels=3)
    replace_head(model, HeadConfig(type="linear"), num_outputs=3, classifier_dropout=0.2)
    assert isinstance(model.classifier[0], nn.Flatten) and isinstance(model.classifier[1], ClassifierHead)
    assert [m.p for m in model.classifier[1].modules() if isinstance(m, nn.Dropout)] == [0.2]
    model.eval()
    assert model(pixel_values=torch.randn(2, 3, 32, 32)).logits.shape == (2, 3)

    plain = tiny_bert_classifier()
    before = _snapshot(plain)
    replace_head(plain, HeadConfig(), num_outputs=3, classifier_dropout=0.2)
    assert isinstance(plain.classifier, nn.Linear) and not hasattr(plain.config, "lathe_head")
    assert before.keys() == _snapshot(plain).keys()


# --- Freezing ------------------------------------------------------------------------------------


def _expected_frozen(layers, kind: str) -> set[str]:
    every = {n for g in layers.groups() for n in g}
    return {
        "embeddings": set(layers.embeddings),
        "first_n_layers": set(layers.blocks[0]),
        "patterns": {n for n in every if "attention.self.query" in n or n.endswith("LayerNorm.bias")},
        "backbone": every - set(layers.head),
    }[kind]


@pytest.mark.parametrize("kind, config", [
    ("embeddings", FreezeConfig(embeddings=True)),
    ("first_n_layers", FreezeConfig(first_n_layers=1)),
    ("patterns", FreezeConfig(patterns=[r"attention\.self\.query", r"LayerNorm\.bias$"])),
    ("backbone", FreezeConfig(backbone=True)),
])
def test_frozen_parameters_stay_bit_identical_under_adamw_weight_decay(kind, config):
    model = tiny_bert_classifier()
    layers = layer_map(model)
    frozen = apply_freezing(model, config, layers)
    assert set(frozen) == _expected_frozen(layers, kind)
    before = _snapshot(model)
    # Every parameter in the optimizer, as an engine that builds it before freezing would have.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    for step in range(3):
        batch = token_batch(seed=step)
        model(**batch, labels=_labels(model, batch, seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = _snapshot(model)
    for name in before:
        assert torch.equal(before[name], after[name]) == (name in frozen), name


@pytest.mark.parametrize("config, param", [
    # The spec refuses a regex that does not compile; apply_freezing still names the field for one
    # that got past it (a config built without validation).
    (FreezeConfig.model_construct(patterns=["attention.(query"]), "config.freeze.patterns"),
    (FreezeConfig(patterns=["encoder", "no_such_parameter"]), "config.freeze.patterns"),
    (FreezeConfig(first_n_layers=3), "config.freeze.first_n_layers"),
    (FreezeConfig(patterns=["."]), "config.freeze"),
    (FreezeConfig(backbone=True, patterns=["classifier"]), "config.freeze"),
])
def test_bad_freeze_configs_name_the_field(config, param):
    model = tiny_bert_classifier()
    with pytest.raises(EngineError) as e:
        apply_freezing(model, config, layer_map(model))
    assert e.value.param == param
    assert all(p.requires_grad for p in model.parameters())  # nothing half-done


# --- Gradual unfreezing --------------------------------------------------------------------------


def _trainable_groups(model: nn.Module, layers, frozen: set[str] = frozenset()) -> list[int]:
    """Indices of the groups whose parameters (but the permanently frozen) all train; the others
    must have none training."""
    params = dict(model.named_parameters())
    states = [{params[n].requires_grad for n in group if n not in frozen} for group in layers.groups()]
    assert all(len(s) == 1 for s in states)
    return [i for i, s in enumerate(states) if s == {True}]


@pytest.mark.parametrize("every_steps, steps_per_epoch", [(2, 5), (None, 3)])
def test_gradual_unfreezing_follows_the_schedule_and_resumes_exactly(every_steps, steps_per_epoch):
    model = tiny_bert_classifier()
    layers = layer_map(model)  # groups: embeddings, block 0, block 1, head
    frozen = set(apply_freezing(model, FreezeConfig(patterns=["word_embeddings"]), layers))
    callback = GradualUnfreezing(model, layers, GradualUnfreezingConfig(every_steps=every_steps), frozen)
    state, control = TrainState(max_steps=12, steps_per_epoch=steps_per_epoch), Control()
    callback.on_train_begin(state, control)
    every = every_steps or steps_per_epoch
    seen, saved = [], {}
    for step in range(13):
        if step:
            state.step = step
            callback.on_step_end(state, control)
        stage = min(step // every, 3)
        seen.append(_trainable_groups(model, layers, frozen))
        assert seen[-1] == list(range(3 - stage, 4)), step
        # The permanently frozen stay frozen, whatever the stage.
        assert not model.bert.embeddings.word_embeddings.weight.requires_grad
        assert model.bert.embeddings.position_embeddings.weight.requires_grad == (stage == 3)
        saved[step] = callback.state_dict()

    for step in (1, every + 1, 2 * every):
        fresh = tiny_bert_classifier()
        fresh_frozen = set(apply_freezing(fresh, FreezeConfig(patterns=["word_embeddings"]), layers))
        resumed = GradualUnfreezing(fresh, layers, GradualUnfreezingConfig(every_steps=every_steps), fresh_frozen)
        resumed.load_state_dict(saved[step])
        assert _trainable_groups(fresh, layers, fresh_frozen) == seen[step]
        resumed.on_train_begin(TrainState(step=step, steps_per_epoch=steps_per_epoch), control)
        assert _trainable_groups(fresh, layers, fresh_frozen) == seen[step]
        assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
            n for g in layers.groups()[3 - min(step // every, 3):] for n in g} - fresh_frozen


def test_parameters_frozen_by_the_schedule_get_no_adamw_update():
    model = tiny_bert_classifier()
    layers = layer_map(model)
    callback = GradualUnfreezing(model, layers, GradualUnfreezingConfig(every_steps=2), set())
    block0 = "bert.encoder.layer.0.attention.self.query.weight"
    start = _snapshot(model)
    # Steps 1-4 run at stages 0, 0, 1, 1: block 0 (stage 2) is frozen; steps 5-6 train it.
    _train(model, 4, callbacks=[callback])
    after_four = _snapshot(model)
    assert torch.equal(after_four[block0], start[block0])
    embeddings, block1 = "bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.output.dense.weight"
    assert torch.equal(after_four[embeddings], start[embeddings])
    assert not torch.equal(after_four[block1], start[block1])

    model = tiny_bert_classifier()
    callback = GradualUnfreezing(model, layers, GradualUnfreezingConfig(every_steps=2), set())
    _train(model, 6, callbacks=[callback])
    assert not torch.equal(dict(model.named_parameters())[block0], start[block0])
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, start[embeddings])


def test_gradual_unfreezing_with_lora_manages_adapters_and_head_only():
    config = TrainingConfig(lora=LoraConfig(target_modules=["query", "value"]))
    model, layers, frozen = prepare_model(tiny_bert_classifier(), config, task=Task.TEXT_CLASSIFICATION)
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    callback = GradualUnfreezing(model, layers, GradualUnfreezingConfig(every_steps=1), frozen)
    state, control = TrainState(max_steps=4), Control()
    callback.on_train_begin(state, control)
    expected = [
        {n for n in adapters if "modules_to_save" in n},
        {n for n in adapters if "modules_to_save" in n or ".layer.1." in n},
        adapters,  # block 0 joins
        adapters,  # the embeddings have no adapter
    ]
    for step, names in enumerate(expected):
        if step:
            state.step = step
            callback.on_step_end(state, control)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == names, step


# --- LoRA ----------------------------------------------------------------------------------------


def test_original_name_maps_peft_names_back():
    assert original_name("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight") == (
        "bert.encoder.layer.0.attention.self.query.weight")
    assert original_name("base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias") == (
        "bert.encoder.layer.0.attention.self.query.bias")
    assert original_name("base_model.model.classifier.modules_to_save.default.layers.1.weight") == (
        "classifier.layers.1.weight")
    assert original_name("base_model.model.classifier.original_module.bias") == "classifier.bias"
    assert original_name("bert.pooler.dense.weight") == "bert.pooler.dense.weight"


def test_lora_bert_classifier_exports_merged_weights_and_adapter(tmp_path):
    import peft
    from transformers import AutoModelForSequenceClassification

    base_dir = tmp_path / "base"
    tiny_bert_classifier().save_pretrained(base_dir)
    model = apply_lora(AutoModelForSequenceClassification.from_pretrained(base_dir),
                       LoraConfig(target_modules=["query", "value"], dropout=0.0), task=Task.TEXT_CLASSIFICATION)
    trainable = {original_name(n) for n, p in model.named_parameters() if p.requires_grad}
    adapted_weights = {f"bert.encoder.layer.{i}.attention.self.{m}.weight" for i in (0, 1) for m in ("query", "value")}
    assert trainable == adapted_weights | {"classifier.weight", "classifier.bias"}
    _train(model, 3)
    trained = _logits(model)
    assert not torch.allclose(trained, _logits(AutoModelForSequenceClassification.from_pretrained(base_dir)), atol=1e-3)

    out = tmp_path / "out"
    saved = export_weights(model, out, _save, lora=LoraConfig(), base_model_name="tiny/bert")
    assert not isinstance(saved, peft.PeftModel) and isinstance(model, peft.PeftModel)
    assert torch.equal(_logits(model), trained)  # the training model keeps its unmerged adapter
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    torch.testing.assert_close(_logits(merged), trained, atol=1e-5, rtol=1e-5)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny/bert"
    base = AutoModelForSequenceClassification.from_pretrained(base_dir)
    adapted = peft.PeftModel.from_pretrained(base, out / "adapter")
    torch.testing.assert_close(_logits(adapted), trained, atol=1e-5, rtol=1e-5)


def test_lora_llama_causal_lm_with_default_targets_exports_merged_weights(tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(dropout=0.0), task=Task.CAUSAL_LM)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and (".q_proj." in n or ".v_proj." in n) for n in trainable)
    _train(model, 3)
    trained = _logits(model)

    out = tmp_path / "out"
    export_weights(model, out, _save, lora=LoraConfig())
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out)), trained, atol=1e-5, rtol=1e-5)
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter")
    torch.testing.assert_close(_logits(adapted), trained, atol=1e-5, rtol=1e-5)


def test_lora_with_mlp_head_and_all_linear_trains_the_head_and_rebuilds_it(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = tiny_bert_classifier()
    replace_head(model, HeadConfig(type="mlp", hidden_sizes=[8]), num_outputs=3, classifier_dropout=0.0)
    model = apply_lora(model, LoraConfig(target_modules="all-linear", dropout=0.0), task=Task.TEXT_CLASSIFICATION)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    head = [n for n in names if original_name(n).startswith("classifier.")]
    # layers 1 and 4 are the Linears of [Dropout, Linear, GELU, Dropout, Linear]
    linears = {f"classifier.layers.{i}.{k}" for i in (1, 4) for k in ("weight", "bias")}
    assert {original_name(n) for n in head} == linears
    assert not any(".lora_" in n for n in head)  # the head trains in full, not through an adapter
    _train(model, 2)
    trained = _logits(model)

    export_weights(model, tmp_path, _save, lora=LoraConfig())
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    restore_head(loaded)
    loaded.load_state_dict(load_file(tmp_path / "model.safetensors"))
    torch.testing.assert_close(_logits(loaded), trained, atol=1e-5, rtol=1e-5)


def test_lora_without_merge_exports_only_the_adapter(tmp_path):
    import peft

    model = apply_lora(tiny_bert_classifier(), LoraConfig(target_modules=["query"]), task=Task.TEXT_CLASSIFICATION)
    saved = export_weights(model, tmp_path, _save, lora=LoraConfig(merge_on_export=False), base_model_name="org/bert")
    assert saved is model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "org/bert"
    assert isinstance(saved, peft.PeftModel)


def test_lora_target_errors_name_the_field():
    with pytest.raises(EngineError) as e:
        apply_lora(tiny_bert_classifier(), LoraConfig(target_modules=["query", "q_proj"]),
                   task=Task.TEXT_CLASSIFICATION)
    assert e.value.param == "config.lora.target_modules" and "q_proj" in e.value.message
    with pytest.raises(EngineError) as e:
        apply_lora(tiny_resnet(), LoraConfig(), task=Task.IMAGE_CLASSIFICATION)
    assert e.value.param == "config.lora.target_modules" and "resnet" in e.value.message


def test_plain_model_export_saves_the_model_itself(tmp_path):
    model = tiny_bert_classifier()
    assert export_weights(model, tmp_path, _save, lora=None) is model
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "adapter").exists()


# --- prepare_model and gradient checkpointing ----------------------------------------------------


def test_prepare_model_freezes_lora_adapters_of_frozen_blocks():
    config = TrainingConfig(dropout=DropoutConfig(hidden=0.0), freeze=FreezeConfig(first_n_layers=1),
                            lora=LoraConfig(target_modules=["query", "value"]))
    model, layers, frozen = prepare_model(tiny_bert_classifier(), config, task=Task.TEXT_CLASSIFICATION)
    assert frozen == set(layers.blocks[0]) and "bert.encoder.layer.0.attention.self.query.weight" in frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".layer.1." in n or "modules_to_save" in n for n in trainable)
    assert any(".layer.1.attention.self.query.lora_A" in n for n in trainable)
    assert model.base_model.model.bert.embeddings.dropout.p == 0.0


def _loss_and_grads(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    batch = token_batch()
    loss = model(**batch, labels=_labels(model, batch, seed=0)).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("lora", [None, LoraConfig(target_modules=["query", "value"], dropout=0.0)],
                         ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(lora):
    zero = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = TrainingConfig(lora=lora)
    reference, _, _ = prepare_model(tiny_bert_classifier(**zero), config, task=Task.TEXT_CLASSIFICATION)
    with_checkpointing = config.model_copy(update={"gradient_checkpointing": True})
    checkpointed, _, _ = prepare_model(tiny_bert_classifier(**zero), with_checkpointing, task=Task.TEXT_CLASSIFICATION)
    base = checkpointed.get_base_model() if lora else checkpointed
    assert all(layer.gradient_checkpointing for layer in base.bert.encoder.layer)
    loss, grads = _loss_and_grads(reference)
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed)
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_refused_where_unsupported():
    with pytest.raises(EngineError) as e:
        enable_gradient_checkpointing(tiny_resnet())
    assert e.value.param == "config.gradient_checkpointing"
