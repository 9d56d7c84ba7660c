"""How the engine reports progress: a small protocol the worker implements with DB writes.

After torchtune's `MetricLoggerInterface`: `core` never knows whether it writes to SQL, a file or
a list in a test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class MetricsSink(Protocol):
    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        """A human-readable line in the job's event log."""

    def metrics(self, step: int, values: dict[str, float], *, split: str) -> None:
        """Numbers at an optimizer step; split is "train", "valid", "test" or "baseline_test" (before training)."""

    def progress(self, step: int, *, seconds_left: float) -> None:
        """After optimizer step `step`: training should end in about `seconds_left` seconds
        (core.callbacks.seconds_left). The worker keeps the job's estimated finish from it."""

    def checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        """A complete, resumable checkpoint now lies at `path` (already fsynced and renamed)."""


class ListSink:
    """Keeps everything in memory; for tests and scripts."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any] | None]] = []
        self.rows: list[tuple[int, str, dict[str, float]]] = []
        self.checkpoints: list[tuple[int, Path, dict[str, float]]] = []
        self.progress_reports: list[tuple[int, float]] = []

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.events.append((level, message, data))

    def metrics(self, step: int, values: dict[str, float], *, split: str) -> None:
        self.rows.append((step, split, dict(values)))

    def progress(self, step: int, *, seconds_left: float) -> None:
        self.progress_reports.append((step, seconds_left))

    def checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        self.checkpoints.append((step, path, dict(metrics)))

    def series(self, split: str, name: str) -> list[float]:
        return [values[name] for _, s, values in self.rows if s == split and name in values]
