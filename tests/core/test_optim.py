"""core.optim: param groups (weight decay, layer-wise LR decay, peft names), optimizers, schedules
against torch/transformers references, exact resume, L1 and clipping invariants."""

from __future__ import annotations

import io
import math
import warnings
from collections import Counter

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification
from transformers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_cosine_with_hard_restarts_schedule_with_warmup,
    get_linear_schedule_with_warmup,
    get_polynomial_decay_schedule_with_warmup,
)

from core.layers import layer_map
from core.optim import (
    build_optimizer,
    build_param_groups,
    build_scheduler,
    clip_gradients,
    decayed_parameters,
    l1_penalty,
    warmup_steps,
)
from core.spec import OptimizerConfig, SchedulerConfig

PEAKS = (1e-3, 2.5e-4)  # two param groups with different peaks, as layer-wise LR decay makes
MAX_STEPS = 20
STEPS_PER_EPOCH = 4

# Schedulers are stepped here without optimizer steps; torch warns about that order.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")


def two_group_optimizer() -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.zeros(2, 2)) for _ in PEAKS]
    return torch.optim.AdamW([{"params": [p], "lr": lr} for p, lr in zip(params, PEAKS)], lr=PEAKS[0])


def lr_trace(schedule, steps: int) -> list[list[float]]:
    """The LRs at steps 0..steps-1 (read before each step, as the loop does)."""
    trace = []
    for _ in range(steps):
        trace.append(list(schedule.get_last_lr()))
        schedule.step()
    return trace


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


# --- Schedules ----------------------------------------------------------------------------------

TRANSFORMERS_REFERENCES = {
    "constant": lambda opt, w: get_constant_schedule_with_warmup(opt, w),
    "linear": lambda opt, w: get_linear_schedule_with_warmup(opt, w, MAX_STEPS),
    "cosine": lambda opt, w: get_cosine_schedule_with_warmup(opt, w, MAX_STEPS),
    "cosine_with_restarts": lambda opt, w: get_cosine_with_hard_restarts_schedule_with_warmup(
        opt, w, MAX_STEPS, num_cycles=3
    ),
    "polynomial": lambda opt, w: get_polynomial_decay_schedule_with_warmup(
        opt, w, MAX_STEPS, lr_end=0.1 * PEAKS[0], power=1.0
    ),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMERS_REFERENCES))
@pytest.mark.parametrize("warmup", [0, 3])
def test_transformers_schedules_equal_their_reference(name, warmup):
    config = SchedulerConfig(name=name, warmup_steps=warmup, num_cycles=3, min_lr_ratio=0.1)
    ours = lr_trace(build_scheduler(two_group_optimizer(), config, max_steps=MAX_STEPS,
                                    steps_per_epoch=STEPS_PER_EPOCH), MAX_STEPS + 1)
    reference = lr_trace(TRANSFORMERS_REFERENCES[name](two_group_optimizer(), warmup), MAX_STEPS + 1)
    assert ours == reference
    # Each group follows the schedule relative to its own peak; warmup starts at 0 and ends at the peak.
    for lrs in ours:
        assert lrs[1] / PEAKS[1] == pytest.approx(lrs[0] / PEAKS[0], rel=1e-12)
    assert ours[warmup] == pytest.approx(list(PEAKS), rel=1e-12)
    if warmup:
        assert ours[0] == [0.0, 0.0]


def test_polynomial_ends_at_min_lr_ratio_of_each_peak():
    config = SchedulerConfig(name="polynomial", warmup_steps=2, min_lr_ratio=0.25)
    trace = lr_trace(build_scheduler(two_group_optimizer(), config, max_steps=10, steps_per_epoch=5), 11)
    assert trace[10] == pytest.approx([0.25 * p for p in PEAKS], rel=1e-12)


def test_warmup_steps_from_ratio_and_capped():
    assert warmup_steps(SchedulerConfig(warmup_ratio=0.06), max_steps=100) == 6
    assert warmup_steps(SchedulerConfig(warmup_ratio=0.06), max_steps=101) == 7  # ceil
    assert warmup_steps(SchedulerConfig(warmup_steps=50, warmup_ratio=0.5), max_steps=30) == 30
    assert warmup_steps(SchedulerConfig(warmup_steps=0, warmup_ratio=0.5), max_steps=30) == 0


def torch_reference(name: str, warmup: int, steps: int, *, step_size: int, gamma: float) -> list[list[float]]:
    """Linear warmup by hand, then a standalone torch StepLR/ExponentialLR started at the peaks."""
    trace = [[peak * k / warmup for peak in PEAKS] for k in range(min(warmup, steps))]
    optimizer = two_group_optimizer()
    if name == "step":
        decay = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    else:
        decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma ** (1 / STEPS_PER_EPOCH))
    return trace + lr_trace(decay, steps - len(trace))


@pytest.mark.parametrize("name", ["step", "exponential"])
@pytest.mark.parametrize("warmup", [0, 3])
@pytest.mark.parametrize("step_size", [None, 3])
def test_torch_schedules_equal_their_reference(name, warmup, step_size):
    config = SchedulerConfig(name=name, warmup_steps=warmup, gamma=0.5, step_size=step_size)
    ours = lr_trace(build_scheduler(two_group_optimizer(), config, max_steps=MAX_STEPS,
                                    steps_per_epoch=STEPS_PER_EPOCH), MAX_STEPS)
    reference = torch_reference(name, warmup, MAX_STEPS, step_size=step_size or STEPS_PER_EPOCH, gamma=0.5)
    assert len(ours) == len(reference)
    for got, want in zip(ours, reference):
        assert got == pytest.approx(want, rel=1e-12)
    # The meaning of the settings, independently of torch: step halves every step_size steps after
    # warmup; exponential halves once per epoch.
    period = (step_size or STEPS_PER_EPOCH) if name == "step" else STEPS_PER_EPOCH
    assert ours[warmup] == pytest.approx(list(PEAKS), rel=1e-12)
    assert ours[warmup + period] == pytest.approx([p / 2 for p in PEAKS], rel=1e-12)
    assert ours[warmup + 2 * period] == pytest.approx([p / 4 for p in PEAKS], rel=1e-12)
    if name == "step":
        assert ours[warmup + period - 1] == pytest.approx(list(PEAKS), rel=1e-12)


def plateau_schedule(optimizer=None, *, warmup=2, patience=2, factor=0.5):
    config = SchedulerConfig(
        name="reduce_on_plateau", warmup_steps=warmup, plateau_patience=patience, plateau_factor=factor
    )
    return build_scheduler(optimizer or two_group_optimizer(), config, max_steps=MAX_STEPS,
                           steps_per_epoch=STEPS_PER_EPOCH)


def test_reduce_on_plateau_drops_after_patience_bad_evaluations():
    schedule = plateau_schedule(patience=2, factor=0.5)
    assert schedule.get_last_lr() == [0.0, 0.0]
    schedule.step()
    for value in [100.0, 200.0, 300.0, 400.0]:  # during warmup: ignored (fed, the fourth would drop it)
        schedule.on_evaluate(value, greater_is_better=False)
    assert schedule.get_last_lr() == pytest.approx([p / 2 for p in PEAKS])
    schedule.step()
    assert schedule.get_last_lr() == list(PEAKS)
    expected = list(PEAKS)
    # best, then two bad evaluations are tolerated (patience 2); the third bad one halves the LR.
    for value, drops in [(1.0, False), (1.1, False), (1.05, False), (1.2, True), (1.3, False), (0.5, False)]:
        for _ in range(3):  # steps between evaluations leave the LR alone
            schedule.step()
            assert schedule.get_last_lr() == pytest.approx(expected, rel=1e-12)
        schedule.on_evaluate(value, greater_is_better=False)
        if drops:
            expected = [lr * 0.5 for lr in expected]
        assert schedule.get_last_lr() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx([p / 2 for p in PEAKS])


def test_reduce_on_plateau_equals_torch_in_max_mode():
    values = [0.5, 0.6, 0.55, 0.58, 0.59, 0.7, 0.6, 0.6, 0.6, 0.6]
    schedule = plateau_schedule(warmup=0, patience=1, factor=0.3)
    reference_optimizer = two_group_optimizer()
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(reference_optimizer, mode="max", factor=0.3, patience=1)
    for value in values:
        schedule.step()
        schedule.on_evaluate(value, greater_is_better=True)
        reference.step(value)
        assert schedule.get_last_lr() == [g["lr"] for g in reference_optimizer.param_groups]
    assert schedule.get_last_lr()[0] < PEAKS[0]  # the script does drop the LR
    with pytest.raises(ValueError, match="mode"):
        schedule.on_evaluate(1.0, greater_is_better=False)


def through_torch_save(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # as core.checkpoint loads it


def run_with_evaluations(schedule, steps: range, evaluations: dict[int, float]) -> list[list[float]]:
    trace = []
    for step in steps:
        trace.append(schedule.get_last_lr())
        schedule.step()
        if step in evaluations:
            schedule.on_evaluate(evaluations[step], greater_is_better=False)
    return trace


@pytest.mark.parametrize("name", ["reduce_on_plateau", "step", "exponential", "cosine_with_restarts", "polynomial"])
@pytest.mark.parametrize("load_optimizer", [True, False])
def test_resume_continues_the_same_schedule(name, load_optimizer):
    config = SchedulerConfig(name=name, warmup_steps=3, step_size=2, gamma=0.5, num_cycles=2,
                             min_lr_ratio=0.1, plateau_patience=1)
    evaluations = {4: 1.0, 6: 2.0, 8: 3.0, 10: 0.5, 12: 0.7, 14: 0.8, 16: 0.9}

    def build(optimizer):
        return build_scheduler(optimizer, config, max_steps=MAX_STEPS, steps_per_epoch=STEPS_PER_EPOCH)

    whole = run_with_evaluations(build(two_group_optimizer()), range(MAX_STEPS), evaluations)

    first_optimizer = two_group_optimizer()
    first = build(first_optimizer)
    head = run_with_evaluations(first, range(9), evaluations)
    schedule_state = through_torch_save(first.state_dict())
    optimizer_state = through_torch_save(first_optimizer.state_dict())
    second_optimizer = two_group_optimizer()
    second = build(second_optimizer)
    if load_optimizer:
        second_optimizer.load_state_dict(optimizer_state)
    second.load_state_dict(schedule_state)
    tail = run_with_evaluations(second, range(9, MAX_STEPS), evaluations)
    assert head + tail == whole
    if name == "reduce_on_plateau":
        assert whole[-1][0] < PEAKS[0] / 2  # the evaluations did drop it, twice, after the resume too


def test_scheduler_rejects_empty_runs():
    with pytest.raises(ValueError):
        build_scheduler(two_group_optimizer(), SchedulerConfig(), max_steps=0, steps_per_epoch=1)


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
