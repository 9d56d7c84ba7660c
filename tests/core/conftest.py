from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.tiny_models import save_tiny_bert, sentiment_rows, write_text_dataset

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture
def tiny_bert(tiny_bert_dir, tmp_path) -> Path:
    """A private copy, for tests that alter the folder."""
    return Path(shutil.copytree(tiny_bert_dir, tmp_path / "tiny-bert"))


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {
        "train": write_text_dataset(root / "train.csv", sentiment_rows(200, seed=0)),
        "validation": write_text_dataset(root / "validation.jsonl", sentiment_rows(40, seed=1)),
        "test": write_text_dataset(root / "test.parquet", sentiment_rows(40, seed=2)),
    }
