import subprocess
import sys

import pytest

from core.datasets import inspect_files, text
from core.errors import DataError
from core.formats import check_file, check_labels, dataset_format
from core.spec import ProblemType, Task, TrainingConfig
from tests.core.conftest import DATA
from tests.tiny_models import write_text_dataset

COLUMNS = dict(text_column="text", label_column="label")


def inspect_dataset(path, *, param, **config):
    return text.inspect(path, param=param, config=TrainingConfig(**config))


def test_formats_and_readers_import_no_torch():
    code = ("import sys, core.formats, core.datasets, core.datasets.text, core.datasets.tokens, core.datasets.chat, "
            "core.datasets.images; assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name,fmt", [("a.csv", "csv"), ("a.JSONL", "jsonl"), ("a.json", "jsonl"), ("x.parquet", "parquet")])
def test_dataset_format(name, fmt):
    assert dataset_format(name) == fmt


def test_dataset_format_rejects_unknown_extension():
    with pytest.raises(DataError) as e:
        dataset_format("data.xlsx")
    assert e.value.code == "invalid_file_format"


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"text": "c", "label": \n')
    with pytest.raises(DataError) as e:
        check_file(path, "jsonl", param="training_file")
    assert "line 3" in e.value.message and e.value.param == "training_file"


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2.*JSON object"):
        check_file(path, "jsonl")


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\nok,1\nbad \xff byte,0\n")
    with pytest.raises(DataError, match="line 3.*UTF-8"):
        check_file(path, "csv")


def test_csv_ragged_record_reports_its_starting_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"two\nlines",1\n"again\nsplit",0,extra\n')
    with pytest.raises(DataError) as e:
        check_file(path, "csv")
    assert "line 4" in e.value.message and "expected 2 fields" in e.value.message


def test_check_file_details(tmp_path):
    path = write_text_dataset(tmp_path / "d.parquet", [{"text": "a", "label": 1}, {"text": "b", "label": 0}])
    assert check_file(path, "parquet") == {"format": "parquet", "rows": 2, "columns": ["text", "label"]}
    empty = tmp_path / "e.csv"
    empty.write_text("text,label\n")
    with pytest.raises(DataError, match="no data rows"):
        check_file(empty, "csv")


def test_missing_column_is_named(tmp_path):
    path = write_text_dataset(tmp_path / "d.csv", [{"sentence": "a", "label": 1}])
    with pytest.raises(DataError) as e:
        inspect_dataset(path, param="training_file", **COLUMNS)
    assert "'text'" in e.value.message and e.value.param == "training_file"


def test_empty_text_names_the_line(tmp_path):
    path = write_text_dataset(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "  ", "label": 0}])
    with pytest.raises(DataError, match="line 2.*empty"):
        inspect_dataset(path, param="training_file", **COLUMNS)


def test_missing_label_names_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhello,1\nworld,\n")
    with pytest.raises(DataError, match="line 3.*'label' is missing"):
        inspect_dataset(path, param="training_file", **COLUMNS)


def test_null_label_in_parquet_names_the_row(tmp_path):
    path = write_text_dataset(tmp_path / "d.parquet", [{"text": "a", "label": "x"}, {"text": "b", "label": None}])
    with pytest.raises(DataError, match="row 2"):
        inspect_dataset(path, param="training_file", **COLUMNS)


def test_inspect_real_csv():
    info = inspect_dataset(DATA / "sms_small.csv", param="training_file", **COLUMNS)
    assert (info.rows, info.labels, info.task) == (200, ["0", "1"], Task.TEXT_CLASSIFICATION)
    assert info.details["problem_type"] == "single_label"
    assert info.label_counts == {"0": 140, "1": 60}


def test_labels_sort_numerically(tmp_path):
    rows = [{"text": "t", "label": label} for label in (10, 2, 1)]
    info = inspect_dataset(write_text_dataset(tmp_path / "d.jsonl", rows), param="training_file", **COLUMNS)
    assert info.labels == ["1", "2", "10"]
    config = TrainingConfig(problem_type="single_label")
    texts, labels = text.read(tmp_path / "d.jsonl", param="training_file", config=config)
    assert texts == ["t"] * 3 and labels == ["10", "2", "1"]


def test_unknown_label_in_validation(tmp_path):
    train = inspect_dataset(
        write_text_dataset(tmp_path / "t.csv", [{"text": "a", "label": "ham"}, {"text": "b", "label": "spam"}]),
        param="training_file",
        **COLUMNS,
    )
    valid = inspect_dataset(
        write_text_dataset(tmp_path / "v.csv", [{"text": "a", "label": "ham"}, {"text": "b", "label": "eggs"}]),
        param="validation_file",
        **COLUMNS,
    )
    with pytest.raises(DataError) as e:
        check_labels(train, valid, param="validation_file")
    assert (e.value.code, e.value.param) == ("unknown_label", "validation_file") and "'eggs'" in e.value.message


def test_multi_label_from_lists_and_from_a_separator(tmp_path):
    rows = [{"text": "a", "label": ["sports", "news"]}, {"text": "b", "label": []}, {"text": "c", "label": ["news"]}]
    info = inspect_dataset(write_text_dataset(tmp_path / "d.jsonl", rows), param="training_file")
    assert info.details["problem_type"] == "multi_label"
    assert info.labels == ["news", "sports"] and info.label_counts == {"news": 2, "sports": 1}
    csv_rows = [{"text": "a", "label": "sports|news"}, {"text": "b", "label": "news"}]
    info = inspect_dataset(write_text_dataset(tmp_path / "d.csv", csv_rows), param="training_file", label_separator="|")
    assert info.details["problem_type"] == "multi_label" and info.label_counts == {"news": 2, "sports": 1}
    _, labels = text.read(tmp_path / "d.csv", param="training_file",
                          config=TrainingConfig(label_separator="|", problem_type="multi_label"))
    assert labels == [["news", "sports"], ["news"]]


def test_regression_is_detected_from_non_integer_numbers(tmp_path):
    rows = [{"text": "a", "label": 0.5}, {"text": "b", "label": "2"}, {"text": "c", "label": 3.25}]
    info = inspect_dataset(write_text_dataset(tmp_path / "d.csv", rows), param="training_file")
    assert info.details["problem_type"] == "regression" and info.labels is None
    assert (info.details["min"], info.details["max"]) == (0.5, 3.25)
    bad = write_text_dataset(tmp_path / "b.csv", rows + [{"text": "d", "label": "high"}])
    with pytest.raises(DataError, match="line 5.*must be a number"):
        inspect_dataset(bad, param="training_file", problem_type="regression")


def test_validation_is_read_like_the_training_file(tmp_path):
    train = write_text_dataset(tmp_path / "t.csv", [{"text": "a", "label": 0.5}, {"text": "b", "label": 1.5}])
    valid = write_text_dataset(tmp_path / "v.csv", [{"text": "a", "label": 1}, {"text": "b", "label": 2}])
    task, infos = inspect_files(None, {"training_file": train, "validation_file": valid}, TrainingConfig())
    assert task == Task.TEXT_CLASSIFICATION
    assert infos["validation_file"].details["problem_type"] == ProblemType.REGRESSION


def test_a_single_class_is_not_trainable(tmp_path):
    train = write_text_dataset(tmp_path / "t.csv", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    with pytest.raises(DataError, match="single label"):
        inspect_files(None, {"training_file": train}, TrainingConfig())
