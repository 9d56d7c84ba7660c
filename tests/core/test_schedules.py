"""core.schedules: learning-rate schedules against torch/transformers references, reduce-on-plateau,
and exact resume."""

from __future__ import annotations

import io

import pytest
import torch
from transformers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_cosine_with_hard_restarts_schedule_with_warmup,
    get_linear_schedule_with_warmup,
    get_polynomial_decay_schedule_with_warmup,
)

from core.schedules import build_scheduler, warmup_steps
from core.spec import SchedulerConfig

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
