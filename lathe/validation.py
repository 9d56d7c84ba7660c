"""A job's files judged in full, as `lathe.validate_job` does before a job is queued: every file read
and checked (core.datasets: the line or row of a bad one), the task inferred, and every field the
request set judged again with what only the data tells (problem type, labels, preference rows);
for a search, every trial its space can make. The worker runs it on a stored job, a dry run
(lathe.estimate) on a request, so both refuse the same files with the same errors. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from core.applicability import DataFacts, check_applicable, model_facts
from core.datasets import FILE_PARAMS, DatasetSummary, chat, inspect_files
from core.errors import DataError
from core.spec import JobSpec, Task
from lathe.db.tables import File
from lathe.model_source import ModelSource
from lathe.search.requests import engine_check
from lathe.search.space import check_space, objective_of, space_of

# request field -> (file id, local path; "" when the file is gone or not the tenant's), or None
Files = dict[str, tuple[str, str] | None]


def job_files(session: Session, *, tenant_id: str, ids: dict[str, str | None]) -> Files:
    """Where a job's files lie (request field -> file id, as `Files`)."""
    files: Files = {}
    for param in FILE_PARAMS:
        file_id = ids.get(param)
        file = session.get(File, file_id) if file_id else None
        files[param] = (file_id, file.path) if file is not None and file.tenant_id == tenant_id else (
            (file_id, "") if file_id else None)
    return files


def local_paths(files: Files) -> dict[str, Path | None]:
    """Each given file's path.

    Raises:
        DataError: code file_not_found, a file gone from storage (or not the tenant's).
    """
    paths: dict[str, Path | None] = {}
    for param in FILE_PARAMS:
        entry = files.get(param)
        if entry is None:
            paths[param] = None
            continue
        file_id, path = entry
        if not path or not Path(path).is_file():
            raise DataError(f"File {file_id!r} not found.", param=param, code="file_not_found")
        paths[param] = Path(path)
    return paths


def judge_files(spec: JobSpec, spec_data: dict[str, Any], files: Files,
                source: ModelSource) -> tuple[Task, dict[str, DatasetSummary], Callable[[JobSpec], None]]:
    """Check the job's files in full and the job against them (an ensemble's members are the
    caller's to check, with the returned check and a session).

    Args:
        spec: the job's spec; spec_data: as stored (the fields set).
        files: `job_files`; source: the resolved base model.

    Returns:
        (the task, a summary per file given, the checks a job of these files must pass, raising
        BadRequest).

    Raises:
        EngineError: a bad file (DataError naming the param and line), a field that can't take
            effect for this data, DPO rows for a supervised job (or the reverse).
        BadRequest: a search space that can make an invalid trial for this data.
    """
    task, infos = inspect_files(spec.task, local_paths(files), spec.config)
    # What only the data and the model tell: the inferred task, the problem type, the depth.
    facts = model_facts(Path(source.base)) if source.kind != "hub" else None
    check = partial(check_applicable, task=task, data=DataFacts.from_summaries(infos), model=facts)
    check(spec)
    if task == Task.CAUSAL_LM:  # preference rows for a DPO job, and only for one
        chat.check_method(spec.method, infos)
    if spec.config.search:  # every trial its space can make, judged as this job now is
        metric, _ = objective_of(spec)
        check_space(spec_data, space_of(spec.config.search, task), objective=metric, check=engine_check(check))
    return task, infos, engine_check(check)
