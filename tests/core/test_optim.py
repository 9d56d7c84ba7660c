"""core.optim: param groups (weight decay, layer-wise LR decay, peft names), optimizers, L1 and
clipping invariants."""

from __future__ import annotations

import math
import warnings
from collections import Counter

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from core.layers import layer_map
from core.optim import (
    build_optimizer,
    build_param_groups,
    clip_gradients,
    decayed_parameters,
    l1_penalty,
)
from core.spec import OptimizerConfig


def tiny_bert(layers: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=2,
    )
    return BertForSequenceClassification(config)


def group_of(groups: list[dict], param: torch.nn.Parameter) -> dict:
    (group,) = [g for g in groups if any(p is param for p in g["params"])]
    return group


def assert_partition(model: torch.nn.Module, groups: list[dict]) -> None:
    """Every trainable parameter in exactly one group, nothing else in any."""
    counts = Counter(id(p) for g in groups for p in g["params"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(counts) == trainable
    assert set(counts.values()) == {1}
    assert all(g["params"] for g in groups)


# --- Param groups -------------------------------------------------------------------------------


def test_layerwise_lr_decay_on_bert():
    model = tiny_bert(layers=3)
    config = OptimizerConfig(layerwise_lr_decay=0.5, head_learning_rate=1e-2, weight_decay=0.1)
    groups = build_param_groups(model, config, lr=1e-3)
    assert_partition(model, groups)
    lrs = {g["name"].split("/")[0]: g["lr"] for g in groups}
    assert lrs == {
        "embeddings": 1e-3 * 0.5**3,
        "block0": 1e-3 * 0.5**2,
        "block1": 1e-3 * 0.5,
        "block2": 1e-3,
        "head": 1e-2,
    }
    assert min(lrs.values()) == lrs["embeddings"]
    for group in groups:
        expected_decay = 0.1 if group["name"].endswith("/decay") else 0.0
        assert group["weight_decay"] == expected_decay
        assert all((p.ndim >= 2) == group["name"].endswith("/decay") for p in group["params"])
    params = dict(model.named_parameters())
    assert group_of(groups, params["bert.encoder.layer.0.attention.self.query.weight"])["name"] == "block0/decay"
    assert group_of(groups, params["bert.encoder.layer.2.output.LayerNorm.weight"])["name"] == "block2/no_decay"
    assert group_of(groups, params["bert.embeddings.LayerNorm.bias"])["name"] == "embeddings/no_decay"
    assert group_of(groups, params["bert.pooler.dense.weight"])["name"] == "block2/decay"
    assert group_of(groups, params["classifier.weight"])["name"] == "head/decay"
    head_bias = group_of(groups, params["classifier.bias"])
    assert (head_bias["name"], head_bias["lr"], head_bias["weight_decay"]) == ("head/no_decay", 1e-2, 0.0)


def test_without_decay_two_groups_and_frozen_parameters_left_out():
    model = tiny_bert(layers=2)
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    groups = build_param_groups(model, OptimizerConfig(weight_decay=0.05), lr=3e-4)
    assert_partition(model, groups)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("body/decay", 3e-4, 0.05), ("body/no_decay", 3e-4, 0.0)
    ]
    groups = build_param_groups(model, OptimizerConfig(head_learning_rate=1e-2), lr=3e-4)
    assert_partition(model, groups)
    assert {g["name"]: g["lr"] for g in groups} == {
        "body/decay": 3e-4, "body/no_decay": 3e-4, "head/decay": 1e-2, "head/no_decay": 1e-2
    }


@pytest.fixture(scope="module")
def lora_bert():
    """A peft LoRA-wrapped tiny BERT and the layer map of the model before wrapping."""
    from peft import LoraConfig, get_peft_model

    model = tiny_bert(layers=2)
    unwrapped_map = layer_map(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    return wrapped, unwrapped_map


@pytest.mark.parametrize("given_map", [False, True])
def test_lora_parameters_land_in_their_block(lora_bert, given_map):
    model, unwrapped_map = lora_bert
    config = OptimizerConfig(layerwise_lr_decay=0.5, head_learning_rate=1e-2)
    groups = build_param_groups(model, config, lr=1e-3, layers=unwrapped_map if given_map else None)
    assert_partition(model, groups)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n, _ in trainable)
    for name, param in trainable:
        group = group_of(groups, param)
        if "classifier" in name:
            assert group["name"].startswith("head/") and group["lr"] == 1e-2
        else:
            index = int(name.split("encoder.layer.")[1].split(".")[0])
            assert "lora_" in name
            assert group["name"] == f"block{index}/decay"
            assert group["lr"] == 1e-3 * 0.5 ** (1 - index)


# --- Optimizers ---------------------------------------------------------------------------------


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hidden = torch.nn.Linear(4, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.out = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.hidden(x))))


def regression_loss(model: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=generator)
    y = x.sum(dim=1, keepdim=True)
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "adafactor"])
def test_each_optimizer_reduces_a_loss(name):
    model = TinyNet()
    optimizer = build_optimizer(model, OptimizerConfig(name=name), lr=1e-2)
    before = regression_loss(model).item()
    for _ in range(5):
        optimizer.zero_grad()
        regression_loss(model).backward()
        optimizer.step()
    assert regression_loss(model).item() < before
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]


def test_optimizer_settings_reach_torch():
    model = TinyNet()
    adamw = build_optimizer(model, OptimizerConfig(beta1=0.8, beta2=0.95, eps=1e-6), lr=1e-3)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["fused"] is True and adamw.defaults["betas"] == (0.8, 0.95) and adamw.defaults["eps"] == 1e-6
    assert type(build_optimizer(model, OptimizerConfig(name="adam"), lr=1e-3)) is torch.optim.Adam
    sgd = build_optimizer(model, OptimizerConfig(name="sgd", momentum=0.7, nesterov=True, weight_decay=0.2), lr=0.1)
    assert isinstance(sgd, torch.optim.SGD)
    assert (sgd.defaults["momentum"], sgd.defaults["nesterov"]) == (0.7, True)
    assert [g["weight_decay"] for g in sgd.param_groups] == [0.2, 0.0]
    adafactor = build_optimizer(model, OptimizerConfig(name="adafactor", beta1=0.0), lr=1e-3)
    assert adafactor.defaults["beta1"] is None and adafactor.defaults["relative_step"] is False
    assert adafactor.defaults["scale_parameter"] is False and adafactor.param_groups[0]["lr"] == 1e-3


def step_with_zero_gradient(name: str, lr: float, weight_decay: float) -> tuple[torch.Tensor, torch.Tensor, TinyNet]:
    model = TinyNet()
    before = model.hidden.weight.detach().clone()
    optimizer = build_optimizer(model, OptimizerConfig(name=name, weight_decay=weight_decay), lr=lr)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return before, model.hidden.weight.detach(), model


def test_adam_couples_weight_decay_and_adamw_decouples_it():
    lr, wd = 0.1, 0.1
    before, after, model = step_with_zero_gradient("adamw", lr, wd)
    # Decoupled: w <- w - lr * wd * w, the Adam update of a zero gradient being zero.
    torch.testing.assert_close(after, before * (1 - lr * wd))
    assert torch.equal(model.hidden.bias, TinyNet().hidden.bias)  # no decay on biases
    before, after, model = step_with_zero_gradient("adam", lr, wd)
    # Coupled: the gradient is wd * w, so the first normalised Adam step moves each weight by lr.
    torch.testing.assert_close(after, before - lr * torch.sign(before), rtol=0, atol=1e-5)
    assert torch.equal(model.hidden.bias, TinyNet().hidden.bias)


# --- L1 and clipping ----------------------------------------------------------------------------


def test_l1_penalty_value_and_gradient():
    model = TinyNet()
    model.out.weight.requires_grad_(False)
    optimizer = build_optimizer(model, OptimizerConfig(), lr=1e-3)
    params = decayed_parameters(optimizer)
    assert [id(p) for p in params] == [id(model.hidden.weight)]  # matrices only, trainable only
    penalty = l1_penalty(params, 0.01)
    assert penalty.dtype == torch.float32 and penalty.ndim == 0
    torch.testing.assert_close(penalty, 0.01 * model.hidden.weight.detach().abs().sum())
    penalty.backward()
    torch.testing.assert_close(model.hidden.weight.grad, 0.01 * torch.sign(model.hidden.weight.detach()))
    assert model.hidden.bias.grad is None
    assert float(l1_penalty([], 0.5)) == 0.0


def test_l1_penalty_sums_bf16_weights_in_fp32():
    # 111 x 1.0078125 = 111.8671875, which bf16 (spacing 0.5 there) would round to 112.
    weight = torch.nn.Parameter(torch.full((3, 37), 1.0078125, dtype=torch.bfloat16))
    penalty = l1_penalty([weight], 1.0)
    assert penalty.dtype == torch.float32
    assert penalty.item() == 111.8671875


def gradients(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(5, 3), (3,), (7,)]]
    for p in params:
        p.grad = 3 * torch.randn(p.shape, generator=generator)
    params.append(torch.nn.Parameter(torch.zeros(2)))  # no gradient: skipped
    return params


def total_norm(params) -> float:
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None))


@pytest.mark.parametrize("max_norm, max_value", [(1.0, 0.5), (1.0, None), (None, 0.5), (None, None), (1e3, None)])
def test_clip_gradients(max_norm, max_value):
    params = gradients(seed=0)
    value_clipped = [p.grad.clamp(-max_value, max_value) if max_value else p.grad.clone()
                     for p in params if p.grad is not None]
    expected_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in value_clipped))
    norm = clip_gradients(params, max_norm=max_norm, max_value=max_value)
    assert norm == pytest.approx(expected_norm, rel=1e-6)
    if max_norm is not None:
        assert total_norm(params) <= max_norm + 1e-6
    if max_value is not None:
        assert all(float(p.grad.abs().max()) <= max_value for p in params if p.grad is not None)
    if max_norm is None or expected_norm <= max_norm:
        # No norm clipping: the gradients are the value-clipped ones, untouched.
        for p, g in zip(params, value_clipped):
            torch.testing.assert_close(p.grad, g)
    else:
        # Norm clipping scales all gradients by one factor: directions are kept.
        for p, g in zip(params, value_clipped):
            torch.testing.assert_close(p.grad, g * (max_norm / expected_norm), rtol=1e-5, atol=1e-6)
    assert params[-1].grad is None
