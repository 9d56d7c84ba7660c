"""Callbacks driven by scripted states and metrics (no model)."""

import types

import pytest

from core.callbacks import (
    CheckpointSchedule,
    Control,
    EarlyStopping,
    EvaluationSchedule,
    ProgressReporter,
    Pruning,
    StopRequest,
    TrainState,
    seconds_left,
)
from core.sink import ListSink


def evaluate_all(callback, values, metric="loss"):
    state, control = TrainState(), Control()
    for step, value in enumerate(values, start=1):
        state.step = step
        control.reset()
        callback.on_evaluate(state, control, {metric: value})
        if control.should_stop:
            return step, state
    return None, state


def test_early_stopping_on_loss_with_patience():
    stop_at, state = evaluate_all(EarlyStopping("loss", greater_is_better=False, patience=2), [1.0, 0.8, 0.81, 0.79, 0.9, 0.95, 0.5])
    assert stop_at == 6 and state.stopped_early


def test_early_stopping_min_delta_ignores_tiny_gains():
    cb = EarlyStopping("accuracy", greater_is_better=True, patience=3, min_delta=0.01)
    stop_at, _ = evaluate_all(cb, [0.5, 0.505, 0.509, 0.508, 0.8], metric="accuracy")
    assert stop_at == 4


def test_early_stopping_state_round_trips():
    cb = EarlyStopping("f1_macro", greater_is_better=True, patience=2)
    evaluate_all(cb, [0.5, 0.4], metric="f1_macro")
    resumed = EarlyStopping("f1_macro", greater_is_better=True, patience=2)
    resumed.load_state_dict(cb.state_dict())
    control = Control()
    resumed.on_evaluate(TrainState(step=3), control, {"f1_macro": 0.45})
    assert control.should_stop


def test_best_tracking():
    state = TrainState()
    assert state.record_evaluation({"loss": 1.0}, metric="loss", greater_is_better=False)
    state.step = 2
    assert not state.record_evaluation({"loss": 1.2}, metric="loss", greater_is_better=False)
    assert (state.best_step, state.best_metric, state.latest_metrics) == (0, 1.0, {"loss": 1.2})


def test_evaluation_schedule_per_epoch_and_last_step():
    cb, steps = EvaluationSchedule(None), []
    state = TrainState(max_steps=10, steps_per_epoch=4)
    for step in range(1, 11):
        state.step, control = step, Control()
        cb.on_step_end(state, control)
        if control.should_evaluate:
            steps.append(step)
    assert steps == [4, 8, 10]


def evaluation_steps(cb: EvaluationSchedule, *, max_steps: int, steps_per_epoch: int) -> list[int]:
    steps, state = [], TrainState(max_steps=max_steps, steps_per_epoch=steps_per_epoch)
    for step in range(1, max_steps + 1):
        state.step, control = step, Control()
        cb.on_step_end(state, control)
        if control.should_evaluate:
            steps.append(step)
    return steps


def test_evaluations_per_epoch_are_evenly_spaced_and_end_each_epoch():
    assert evaluation_steps(EvaluationSchedule(None, 2), max_steps=24, steps_per_epoch=12) == [6, 12, 18, 24]
    assert evaluation_steps(EvaluationSchedule(None, 3), max_steps=20, steps_per_epoch=10) == [3, 7, 10, 13, 17, 20]
    # More evaluations than steps in an epoch: once a step, no more.
    assert evaluation_steps(EvaluationSchedule(None, 5), max_steps=6, steps_per_epoch=3) == [1, 2, 3, 4, 5, 6]
    assert evaluation_steps(EvaluationSchedule(4, 3), max_steps=10, steps_per_epoch=5) == [4, 8, 10]  # N steps wins


def test_pruning_counts_evaluations_stops_without_saving_and_resumes_its_count():
    seen = []

    def should_prune(evaluation, step, metrics):
        seen.append((evaluation, step, metrics["loss"]))
        return metrics["loss"] > 1.0

    cb = Pruning(should_prune)
    state = TrainState(step=6)
    control = Control(should_save=True)
    cb.on_evaluate(state, control, {"loss": 0.5})
    assert not control.should_stop and control.should_save and not state.pruned
    state.step = 12
    cb.on_evaluate(state, control, {"loss": 2.0})
    assert control.should_stop and not control.should_save and state.pruned
    assert seen == [(1, 6, 0.5), (2, 12, 2.0)]
    resumed = Pruning(should_prune)
    resumed.load_state_dict(cb.state_dict())
    resumed.on_evaluate(TrainState(step=18), Control(), {"loss": 0.1})
    assert seen[-1] == (3, 18, 0.1)
    assert "pruned" not in state.state_dict()  # a resumed run decides afresh


def test_checkpoint_schedule_saves_every_n_and_new_bests():
    cb = CheckpointSchedule(5, keep_best=True)
    state, control = TrainState(step=5), Control()
    cb.on_step_end(state, control)
    assert control.should_save
    state.step, state.best_step, control = 7, 7, Control()
    cb.on_evaluate(state, control, {"loss": 1.0})
    assert control.should_save
    state.step, control = 8, Control()
    cb.on_evaluate(state, control, {"loss": 2.0})
    assert not control.should_save


def test_stop_request_saves_and_stops():
    state, control = TrainState(), Control()
    StopRequest(lambda: True).on_step_end(state, control)
    assert control.should_stop and control.should_save and state.cancelled


def test_seconds_left_is_the_steps_left_at_this_runs_measured_rate():
    state = TrainState(step=10, max_steps=100, train_seconds=5.0)
    assert seconds_left(state, run_start_step=0, run_start_seconds=0.0) == pytest.approx(90 * 0.5)
    # Evaluations so far are spread over the steps so far: (5 + 2) s / 10 steps.
    assert seconds_left(state, run_start_step=0, run_start_seconds=0.0, eval_seconds=2.0) == pytest.approx(90 * 0.7)
    # A resumed run measures its own rate: 10 steps in 1 s since step 40, whatever the run before it took.
    resumed = TrainState(step=50, max_steps=100, train_seconds=101.0)
    assert seconds_left(resumed, run_start_step=40, run_start_seconds=100.0) == pytest.approx(50 * 0.1)
    assert seconds_left(resumed, run_start_step=50, run_start_seconds=101.0) is None  # no step of its own yet
    assert seconds_left(TrainState(step=100, max_steps=100, train_seconds=9.0),
                        run_start_step=0, run_start_seconds=0.0) == 0.0


def test_progress_reporter_reports_the_time_left_with_each_train_report(monkeypatch):
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr("core.callbacks.time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    sink = ListSink()
    cb = ProgressReporter(sink, every_steps=10)
    state, control = TrainState(step=20, max_steps=60, train_seconds=50.0), Control()  # resumed at step 20
    cb.on_train_begin(state, control)
    for step in range(21, 41):
        state.step, state.train_seconds = step, state.train_seconds + 0.25
        cb.on_step_end(state, control)
        if step == 30:  # an evaluation of 1.5 s after step 30
            clock.now += 1.5
            cb.on_evaluate(state, control, {"loss": 1.0})
    [(s30, left30), (s40, left40)] = sink.progress_reports
    assert (s30, left30) == (30, pytest.approx(30 * 0.25))  # 10 steps of 0.25 s; the run before is not counted
    assert (s40, left40) == (40, pytest.approx(20 * (20 * 0.25 + 1.5) / 20))
    assert [(step, split) for step, split, _ in sink.rows] == [(30, "train"), (30, "valid"), (40, "train")]
