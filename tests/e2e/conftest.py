"""Fixtures of the real-process tests: a tiny BERT to train, and a stack of real processes
(redis-server, `lathe worker`, SQLite) in a folder of the test's own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.crash_harness import Stack
from tests.tiny_models import save_tiny_bert


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base-models")
    save_tiny_bert(root / "tiny-bert")
    return root


@pytest.fixture
def stack(tmp_path, models_dir) -> Iterator[Stack]:
    s = Stack(tmp_path, models_dir)
    try:
        yield s
    finally:
        s.close()
