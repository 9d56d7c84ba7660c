"""Ensembles as jobs (`config.ensemble`): the parent trains its members as ordinary child jobs, then
runs once itself to combine them (core.combine) into the model it exports.

Phases, in the parent's `ensemble` record:
    members   children created up to `parallel` (and the quota) as they finish (boosting: one at
              a time, each trained on rows weighted by the errors of the ones before it); a
              member that fails fails the ensemble (cancelling the others)
    combine   every member succeeded: the orchestrator puts the parent back to queued and publishes
              it; a worker claims it like any job (lease, retries, crash safety) and its training
              process combines instead of training (worker.child)
`from_search` skips the members phase: its members are the search's finished trials.

A member's spec is the parent's without `ensemble`, with its overrides, seed (parent's + member
number; a soup's overridden members all keep the parent's, to start alike) and rows: bagging a bootstrap resample (or subsample) drawn by (parent seed, member),
stacking all but fold `holdout` of the folds drawn by the parent seed (config.train_rows).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.spec import JobSpec
from core.spec.ensemble import EnsembleConfig
from lathe import lifecycle
from lathe.db.queries import add_event
from lathe.db.tables import TERMINAL, Job, JobStatus, Model, now
from lathe.errors import BadRequest, LatheError
from lathe.lifecycle import Actor
from lathe.parents import close_cancelled, create_child, fail_parent, mark_running, room
from lathe.search.requests import a_search
from lathe.search.space import not_searchable, set_path, validated_trial
from lathe.settings import Settings

S = JobStatus
NOT_OVERRIDABLE = ("config.ensemble", "config.train_rows", "config.search")


def plan(cfg: EnsembleConfig) -> list[tuple[int, int | None]]:
    """(member, fold) of each child to train, in creation order (none for from_search)."""
    if cfg.from_search:
        return []
    members = range(len(cfg.overrides()))
    if cfg.resolved_method == "stacking":
        return [(m, f) for m in members for f in range(cfg.folds)]
    return [(m, None) for m in members]


def member_spec(parent: dict[str, Any], cfg: EnsembleConfig, *, seed: int, member: int, fold: int | None) -> dict[str, Any]:
    """A member's stored spec (see the module docstring)."""
    body = copy.deepcopy(parent)
    body.setdefault("config", {}).pop("ensemble", None)
    for key, value in cfg.overrides()[member].items():
        set_path(body, key, value)
    # Members differ by seed, except a soup's given as overrides: those share the parent's seed, so
    # they start from the same weights (a new head drawn alike), as the soup recipe wants.
    shared = cfg.resolved_method == "soup" and isinstance(cfg.members, list)
    body["seed"] = seed if shared else (seed + member) % 2**31
    if cfg.resolved_method == "bagging":
        draw = {"method": "subsample", "fraction": cfg.subsample} if cfg.subsample else {"method": "bootstrap"}
        body["config"]["train_rows"] = {**draw, "seed": seed, "stream": member}
    elif cfg.resolved_method == "stacking":
        body["config"]["train_rows"] = {"method": "folds", "folds": cfg.folds, "holdout": fold, "seed": seed}
    return body


def check_ensemble(session: Session, *, tenant_id: str, spec: JobSpec, stored: dict[str, Any],
                   check: Callable[[JobSpec], None]) -> dict[str, Any]:
    """Judge an ensemble request (every member a valid job; from_search a finished search of the same
    data); returns the parent's first `ensemble` record.

    Raises:
        BadRequest: param config.ensemble.members (naming the member and key) or .from_search.
        NotFound: from_search is not one of the tenant's jobs.
    """
    cfg = spec.config.ensemble
    for i, overrides in enumerate(cfg.overrides()):
        for key in overrides:
            own = any(key == p or key.startswith(p + ".") for p in NOT_OVERRIDABLE)
            why = "is set by the ensemble itself, not per member." if own else not_searchable(key)
            if why:
                raise BadRequest(f"config.ensemble.members[{i}]: {key!r} {why}", param="config.ensemble.members")
    for member, fold in plan(cfg):
        if fold:
            continue  # a member's folds differ only in the fold held out
        try:
            check(validated_trial(member_spec(stored, cfg, seed=spec.seed, member=member, fold=fold)))
        except LatheError as e:
            raise BadRequest(f"config.ensemble.members[{member}] is not a valid job: {e.message}",
                             param="config.ensemble.members") from None
    record: dict[str, Any] = {"method": cfg.resolved_method, "phase": "members", "members": []}
    if cfg.from_search:
        record["from_search"] = search_trials(session, tenant_id=tenant_id, search_id=cfg.from_search, spec=spec)
    return record


def search_trials(session: Session, *, tenant_id: str, search_id: str, spec: JobSpec) -> list[str]:
    """The succeeded trials of a finished search of the same training file (their models are the members)."""
    param = "config.ensemble.from_search"
    search = a_search(session, tenant_id=tenant_id, job_id=search_id, param=param)
    if search.status != S.SUCCEEDED:
        raise BadRequest(f"Search {search_id} is {search.status}; from_search takes a succeeded search.", param=param)
    if search.training_file != spec.training_file:
        raise BadRequest(f"Search {search_id} trained on {search.training_file}, not {spec.training_file}: its "
                         "models' labels may differ; use the same training_file.", param=param)
    trials = session.scalars(select(Job.id).where(Job.parent_job == search.id, Job.status == S.SUCCEEDED)
                             .order_by(Job.child_index)).all()
    if len(trials) < 2:
        raise BadRequest(f"Search {search_id} has {len(trials)} finished trial(s); an ensemble needs 2.", param=param)
    return list(trials)


def members_of(session: Session, parent: Job) -> list[dict[str, Any]]:
    """What the combine stage needs of each member (worker.child): its number, job, folder and spec."""
    if (parent.ensemble or {}).get("from_search"):
        jobs = [session.get(Job, job_id) for job_id in parent.ensemble["from_search"]]
        infos = [{"member": i} for i in range(len(jobs))]
    else:
        jobs = list(session.scalars(select(Job).where(Job.parent_job == parent.id).order_by(Job.child_index)))
        infos = [j.child_info or {} for j in jobs]
    out = []
    for job, info in zip(jobs, infos):
        model = session.get(Model, job.fine_tuned_model) if job.fine_tuned_model else None
        out.append({"index": info["member"], "job": job.id, "model_dir": model.path if model else "", "spec": job.spec,
                    "trained_tokens": job.trained_tokens or 0})
    return out


def boosted_by(session: Session, job: Job) -> list[dict[str, Any]] | None:
    """A boosting member's earlier members (as `members_of`), whose errors weigh its training rows;
    None for any other job."""
    parent = session.get(Job, job.parent_job) if job.parent_job else None
    if parent is None or (parent.ensemble or {}).get("method") != "boosting":
        return None
    return [m for m in members_of(session, parent) if m["index"] < (job.child_info or {})["member"]]


class Ensemble:
    """One step's view of an ensemble: the parent (locked) and its members."""

    def __init__(self, session: Session, settings: Settings, parent: Job):
        self.session, self.settings, self.parent = session, settings, parent
        self.cfg = parent.job_spec().config.ensemble
        self.state: dict[str, Any] = dict(parent.ensemble)
        self.plan = plan(self.cfg)
        self.children = list(session.scalars(select(Job).where(Job.parent_job == parent.id).order_by(Job.child_index)))
        self.active = [c for c in self.children if c.status not in TERMINAL]

    def step(self) -> tuple[str, list[str], list[str]]:
        """Do what is due: (what was done, the members to validate, the jobs to run) once committed."""
        if self.state.get("phase") == "combine":
            return "", [], []  # the parent runs as an ordinary job now
        started: list[str] = []
        self.record_finished()
        ended = {c.id: c for c in self.children if c.status in (S.FAILED, S.CANCELLED)}
        failed = ended.get(self.state.get("cause")) or next(
            (c for c in sorted(ended.values(), key=lambda c: c.status != S.FAILED)), None)  # the first failure
        if self.parent.status == S.CANCELLING:
            did = close_cancelled(self.session, self.parent, active=self.active)
        elif failed is not None:
            did = self.fail(failed)
        elif len(self.children) >= len(self.plan) and not self.active:
            did = self.combine()
        else:
            started = self.start_members()
            did = f"started {len(started)}" if started else ""
        self.parent.ensemble = self.state
        return did, started, [self.parent.id] if did == "combine" else []

    def record_finished(self) -> None:
        rows = []
        for child in self.children:
            info = dict(child.child_info or {})
            if child.status in TERMINAL and not info.get("reported"):
                info["reported"] = True
                child.child_info = info
                add_event(self.session, job_id=self.parent.id, level="info" if child.status == S.SUCCEEDED else "warn",
                          message=f"Member {_name(info)} ({child.id}) {child.status}",
                          data={"member": info["member"], "fold": info.get("fold"), "job": child.id})
            rows.append({"member": info["member"], "fold": info.get("fold"), "job": child.id, "status": child.status})
        self.state["members"] = rows

    def start_members(self) -> list[str]:
        parallel = 1 if self.cfg.resolved_method == "boosting" else self.cfg.parallel  # each learns from the ones before
        want = min(parallel - len(self.active), len(self.plan) - len(self.children))
        free = (room(self.session, self.settings, self.parent, self.state, active=len(self.active), child="member")
                if want > 0 else 0)
        ids = []
        for number in range(len(self.children), len(self.children) + min(want, free)):
            member, fold = self.plan[number]
            info = {"member": member, "fold": fold}
            body = member_spec(self.parent.spec, self.cfg, seed=self.parent.seed, member=member, fold=fold)
            child = create_child(self.session, self.settings, self.parent, number=number, spec=body, info=info,
                                 data=info)
            self.children.append(child)
            ids.append(child.id)
            add_event(self.session, job_id=self.parent.id, message=f"Member {_name(info)} started: {child.id}",
                      data={**info, "job": child.id})
            self.state["members"].append({**info, "job": child.id, "status": child.status})
        if ids:
            mark_running(self.session, self.parent)
        return ids

    def fail(self, child: Job) -> str:
        """A member failed (or was cancelled): the ensemble fails; its other members are cancelled."""
        for other in self.active:
            if lifecycle.user_move(self.session, other, "cancel", **({} if other.status == S.RUNNING else
                                                                     {"finished_at": now()})) is not None:
                add_event(self.session, job_id=other.id, message=f"Cancelled: another member of {self.parent.id} "
                                                                 f"{child.status}")
        info = child.child_info or {}
        reason = (child.error or {}).get("message") or child.status
        self.state["cause"] = child.id  # the others, cancelled now, are not the reason
        mark_running(self.session, self.parent)
        if self.active:
            return ""
        return fail_parent(self.session, self.parent, {
            "code": "ensemble_failed", "param": None,
            "message": f"Member {_name(info)} ({child.id}) {child.status}: {reason}"})

    def combine(self) -> str:
        """Every member succeeded (or none is trained: from_search): the parent queues to combine."""
        if self.parent.status == S.RUNNING and not lifecycle.move(
                self.session, job_id=self.parent.id, source=S.RUNNING, target=S.QUEUED, by=Actor.ORCHESTRATOR,
                queued_at=now()):
            return ""
        self.state["phase"] = "combine"
        count = len(self.state.get("from_search") or self.children)  # no query of every member's model for a count
        add_event(self.session, job_id=self.parent.id, message=f"Combining {count} "
                                                               f"models by {self.cfg.resolved_method}")
        return "combine"


def _name(info: dict[str, Any]) -> str:
    fold = info.get("fold")
    return f"{info['member']}" + (f" fold {fold}" if fold is not None else "")
