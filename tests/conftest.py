"""Fixtures shared across the test packages."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def mlflow_url(tmp_path_factory) -> Iterator[str]:
    """A real `mlflow server` on loopback for the session (~10 s to start): tests/trackers.py."""
    from tests.trackers import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url
