"""The combine stage of an ensemble job: its members are trained (each an ordinary job); this
measures them and builds the one model the job exports.

    bagging     members' outputs by vote (soft/hard) or mean (regression), equal weights
    boosting    SAMME: each member trained on the rows reweighted by the errors of the ones before
                it (`boosting_weights`, in its own training process), combined by a vote weighted
                by each member's alpha
    selection   a finished search's trial models, weighted by greedy ensemble selection on
                validation (Caruana et al. 2004: forward selection with replacement)
    stacking    each member trained once per fold on the other folds; its fold models predict the
                rows they never saw (out-of-fold), a scikit-learn meta-learner is fit on those
                predictions and stored as numbers. The final members are the fold models averaged
                (as AutoGluon's bagged models): no retraining on all rows.
    soup        greedy soup (Wortsman et al. 2022): members by validation score, best first; each
                joins the weight average only if validation improves. One ordinary model.

Every member and the ensemble are measured on the validation and test files side by side
(eval_report.json, the job's metrics). The folder: core.ensemble_model (members' HF folders and
ensemble.json), or for a soup an ordinary model folder.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.adapters import DataFiles, Split, TaskAdapter, adapter_for
from core.durable import fsync_path, fsync_tree
from core.engine import RunResult
from core.ensemble import ensemble_selection, samme_step
from core.ensemble_model import DESCRIPTION, FORMAT, combined_outputs, meta_features
from core.errors import EngineError
from core.predict import load_for_inference
from core.sink import MetricsSink
from core.spec import ALL_METRICS, JobSpec, ProblemType

SELECTION_ROUNDS = 25


@dataclass(frozen=True)
class Member:
    index: int  # the member's number (stacking: one number, several fold models)
    job: str  # its job id
    model_dir: Path  # its exported folder
    spec: JobSpec  # its spec (overrides and train_rows applied)


@dataclass
class Measured:
    """One model's outputs (probabilities, or values in the label's units) on each split."""

    outputs: dict[str, np.ndarray]  # "validation" / "test" / "train" (stacking: the full training split)


class Stage:
    """What every member's measurement shares: the task, the reference adapter (labels, targets)."""

    def __init__(self, spec: JobSpec, files: DataFiles):
        self.spec, self.files, self.task = spec, files, spec.task
        self.method = spec.config.ensemble.resolved_method if spec.config.ensemble else None
        self.metric = spec.config.metric_for_best_model
        self.maximize = ALL_METRICS[self.metric]
        self.device = torch.device("cpu")
        self.adapter: TaskAdapter | None = None
        self.splits: dict[str, Split] = {}

    @property
    def problem_type(self) -> str:
        problem = getattr(self.adapter, "problem_type", None)
        return str(problem.value if isinstance(problem, ProblemType) else problem or ProblemType.SINGLE_LABEL.value)

    def prepare(self, member: Member, *, with_train: bool = False) -> tuple[TaskAdapter, dict[str, Split], Any]:
        """The member's adapter (its own max_length, tokenizer...), its encoded splits (the full
        training split: its draw undone), and its model in eval mode."""
        spec = member.spec.model_copy(update={"config": member.spec.config.model_copy(update={"train_rows": None})})
        adapter = adapter_for(self.task, spec)
        processor = adapter.load_processor(str(member.model_dir))
        data = adapter.prepare(self.files, processor)
        splits = {"validation": data.validation, "test": data.test, "train": data.train if with_train else None}
        if self.adapter is None:
            self.adapter, self.splits = adapter, {k: v for k, v in splits.items() if v is not None}
        _, model = load_for_inference(member.model_dir, str(self.task))
        return adapter, {k: v for k, v in splits.items() if v is not None}, model.to(self.device)

    @torch.no_grad()
    def outputs(self, adapter: TaskAdapter, model: Any, split: Split, rows: Sequence[int] | None = None) -> np.ndarray:
        """The model's outputs on `split` (or its `rows`), in order: probabilities, or values in the
        label's units (the exported regression head is rescaled)."""
        order = list(range(len(split))) if rows is None else list(rows)
        parts = []
        for start in range(0, len(order), 32):
            batch = adapter.collate(split, order[start:start + 32])
            _, predictions = adapter.loss_sum(model, batch)
            parts.append(torch.as_tensor(predictions).float().numpy())
        out = np.concatenate(parts) if parts else np.zeros((0, 1))
        return out[:, None] if out.ndim == 1 else out

    def metrics(self, outputs: np.ndarray, split: str, *, report: bool = False) -> dict[str, Any]:
        """The task's metrics of `outputs` on a split of the reference adapter."""
        adapter, data = self.adapter, self.splits[split]
        targets = torch.as_tensor(np.asarray(data.targets))
        values = np.asarray(outputs, dtype=np.float64)
        if self.problem_type == "regression":  # the adapter scores standardised values
            values = (values[:, 0] - adapter.target_mean) / adapter.target_std
            loss = float(np.mean((values - targets.numpy()) ** 2))
        elif self.problem_type == "multi_label":
            p = np.clip(values, 1e-7, 1 - 1e-7)
            t = targets.numpy()
            loss = float(-np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)))
        else:
            loss = float(-np.mean(np.log(np.clip(values[np.arange(len(values)), targets.numpy()], 1e-7, 1))))
        return adapter.compute_metrics([torch.as_tensor(values).float()], [targets], loss=loss, report=report)

    def score(self, outputs: np.ndarray) -> float:
        return float(self.metrics(outputs, "validation")[self.metric])


def combine(spec: JobSpec, members: list[Member], files: DataFiles, work_dir: Path, sink: MetricsSink) -> RunResult:
    """Measure the members, combine them as `spec.config.ensemble` says, export the folder.

    Raises:
        EngineError: members that cannot be combined (a soup of different architectures, ...).
    """
    stage = Stage(spec, files)
    if stage.method == "soup":
        from core.soup import soup

        return soup(stage, members, work_dir, sink)
    groups: dict[int, list[Member]] = {}
    for member in members:
        groups.setdefault(member.index, []).append(member)
    measured, oof = [], []
    for index, group in sorted(groups.items()):
        runs = []
        train_out = None
        for member in group:
            adapter, splits, model = stage.prepare(member, with_train=stage.method == "stacking")
            run = {k: stage.outputs(adapter, model, s) for k, s in splits.items() if k != "train"}
            if stage.method == "stacking":  # the rows this fold model never trained on
                held = held_out_rows(stage, member, splits["train"])
                out = stage.outputs(adapter, model, splits["train"], held)
                if train_out is None:
                    train_out = np.full((len(splits["train"]), out.shape[1]), np.nan)
                train_out[held] = out
            runs.append(run)
            del model
        measured.append(Measured({k: np.mean([r[k] for r in runs], axis=0) for k in runs[0]}))
        if train_out is not None:
            if np.isnan(train_out).any():
                raise EngineError(f"Member {index}'s fold models do not cover every training row.", param="config.ensemble")
            oof.append(train_out)
        sink.event(f"Member {index}: validation {stage.metric}="
                   f"{stage.score(measured[-1].outputs['validation']):.4f}" if "validation" in measured[-1].outputs
                   else f"Member {index} measured")
    description = _describe(stage, groups, measured, oof)
    combined = {split: combined_outputs(description, [m.outputs[split] for m in measured]) for split in measured[0].outputs}
    report = _report(stage, [m.outputs for m in measured], combined, [g[0].job for _, g in sorted(groups.items())])
    sink.event("Ensemble: " + _summary(stage, report), data={"ensemble": report["ensemble"]})
    out = work_dir / "output" / "model"
    _write(out, spec, description, report, {index: [m.model_dir for m in g] for index, g in groups.items()})
    return result_of(out, report)


def held_out_rows(stage: Stage, member: Member, train: Split) -> list[int]:
    """The rows of the full training split that `member` did not train on (its config.train_rows draw)."""
    kept = set(adapter_for(stage.task, member.spec).drawn_rows(train).tolist())
    return [i for i in range(len(train)) if i not in kept]


def _describe(stage: Stage, groups: dict[int, list[Member]], measured: list[Measured],
              oof: list[np.ndarray]) -> dict[str, Any]:
    cfg = stage.spec.config.ensemble
    regression = stage.problem_type == "regression"
    description: dict[str, Any] = {
        "format": FORMAT, "version": 1, "method": stage.method, "task": str(stage.task),
        "problem_type": stage.problem_type, "labels": list(stage.adapter.labels or []) if not regression else [],
        "vote": "mean" if regression else cfg.vote, "meta_learner": None,
        "members": [{"paths": [f"members/m{index}" + (f"/fold{i}" if len(g) > 1 else "") for i in range(len(g))],
                     "weight": 1.0, "job": g[0].job, "jobs": [m.job for m in g]} for index, g in sorted(groups.items())],
    }
    if stage.method == "boosting":  # SAMME's vote: each member's alpha (none below 0: no worse than chance)
        alphas, _ = boosting_weights(stage.spec, [g[0] for _, g in sorted(groups.items())], stage.files)
        if max(alphas) <= 0:
            raise EngineError("No boosting member did better than chance on its weighted training rows.",
                              param="config.ensemble")
        description["vote"] = "hard"
        for member, alpha in zip(description["members"], alphas):
            member["weight"] = max(alpha, 0.0)
    if stage.method == "selection":
        counts = ensemble_selection([m.outputs["validation"] for m in measured], stage.score, rounds=SELECTION_ROUNDS,
                                    maximize=stage.maximize, vote=description["vote"])
        for member, count in zip(description["members"], counts):
            member["weight"] = float(count)
    if stage.method == "stacking":
        description["meta_learner"] = fit_meta(cfg.meta_learner.c, oof, np.asarray(stage.splits["train"].targets),
                                               stage.problem_type, stage.adapter)
    return description


def boosting_weights(spec: JobSpec, members: list[Member], files: DataFiles) -> tuple[list[float], np.ndarray]:
    """SAMME over `members` in order (core.ensemble.samme_step): each one's vote weight (alpha), and
    the training rows' weights after the last, which the next member trains with. The rows start at
    config.weight_column's weights, or 1; a member no better than chance (alpha <= 0) changes nothing.
    A pure function of the members' models and the data, recomputed wherever it is needed."""
    stage = Stage(spec, files)
    alphas: list[float] = []
    weights: np.ndarray | None = None
    for member in members:
        adapter, splits, model = stage.prepare(member, with_train=True)
        train = splits["train"]
        if weights is None:
            weights = np.asarray(train.weights if train.weights is not None else np.ones(len(train)), dtype=np.float64)
        correct = stage.outputs(adapter, model, train).argmax(1) == np.asarray(train.targets)
        step = samme_step(weights, correct, len(adapter.labels))
        alphas.append(step.alpha)
        if step.alpha > 0:
            weights = step.weights
    return alphas, weights


def fit_meta(c: float, oof: list[np.ndarray], targets: np.ndarray, problem_type: str, adapter: Any) -> dict[str, Any]:
    """The stacking meta-learner on the out-of-fold outputs, as numbers (core.ensemble_model.apply_meta)."""
    from sklearn.linear_model import LogisticRegression, Ridge

    features = meta_features(oof, problem_type)
    if problem_type == "regression":
        values = targets * adapter.target_std + adapter.target_mean  # the label's units, as the members output
        model = Ridge(alpha=1.0 / c).fit(features, values)
        return {"type": "ridge", "coef": model.coef_.tolist(), "intercept": [float(model.intercept_)]}
    if problem_type == "multi_label":
        coef, intercept = [], []
        for label, x in enumerate(features):
            y = targets[:, label].astype(int)
            if y.min() == y.max():  # a label always on (or off) in training: members' mean, no fit
                coef.append([1.0 / x.shape[1]] * x.shape[1])
                intercept.append(0.0 if y.max() else -20.0)
                continue
            model = LogisticRegression(C=c, max_iter=2000).fit(x, y)
            coef.append(model.coef_[0].tolist())
            intercept.append(float(model.intercept_[0]))
        return {"type": "logistic_regression", "coef": coef, "intercept": intercept}
    model = LogisticRegression(C=c, max_iter=2000).fit(features, targets.astype(int))
    if len(model.classes_) != features.shape[1] // len(oof):
        raise EngineError("Every class must appear in the training file's folds for stacking.", param="config.ensemble")
    return {"type": "logistic_regression", "coef": model.coef_.tolist(), "intercept": model.intercept_.tolist()}


def _report(stage: Stage, members: list[dict[str, np.ndarray]], combined: dict[str, np.ndarray],
            jobs: list[str]) -> dict[str, Any]:
    """Each member's and the ensemble's validation and test figures, side by side."""
    def figures(outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        return {split: stage.metrics(outputs[split], split, report=split == "test")
                for split in ("validation", "test") if split in outputs}

    return {"method": stage.method, "metric": stage.metric,
            "members": [{"member": i, "job": job, **figures(m)} for i, (job, m) in enumerate(zip(jobs, members))],
            "ensemble": figures(combined)}


def _summary(stage: Stage, report: dict[str, Any]) -> str:
    def fmt(figures: dict[str, Any]) -> str:
        return ", ".join(f"{split} {stage.metric}={figures[split][stage.metric]:.4f}"
                         for split in ("validation", "test") if split in figures)

    best = "; ".join(f"member {m['member']}: {fmt(m)}" for m in report["members"])
    return f"{fmt(report['ensemble'])} ({best})"


def _write(out: Path, spec: JobSpec, description: dict[str, Any], report: dict[str, Any],
           folders: dict[int, list[Path]]) -> None:
    """The ensemble folder, written beside `out` and renamed over it (as core.export does)."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for member, paths in zip(description["members"], (folders[i] for i in sorted(folders))):
        for target, source in zip(member["paths"], paths):
            shutil.copytree(source, tmp / target, ignore=shutil.ignore_patterns("*.tar", "*.tmp*"))
    (tmp / DESCRIPTION).write_text(json.dumps(description, indent=1))
    write_reports(tmp, spec, report)
    fsync_tree(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    fsync_path(out.parent)


def write_reports(folder: Path, spec: JobSpec, report: dict[str, Any]) -> None:
    (folder / "lathe_job.json").write_text(json.dumps({"spec": spec.model_dump(mode="json"),
                                                       "reproducibility": {"task": str(spec.task)}}, indent=2))
    (folder / "eval_report.json").write_text(json.dumps(report, indent=1, default=float))


def result_of(out: Path, report: dict[str, Any]) -> RunResult:
    ensemble = report["ensemble"]
    metrics = {"latest": ensemble.get("validation"), "best": ensemble.get("validation"), "test": ensemble.get("test"),
               "baseline_test": None, "members": report["members"]}
    return RunResult(out, None, 0, {}, metrics, False, False)
