import subprocess
import sys

import pytest

from core.errors import DataError
from core.formats import check_file, check_labels, dataset_format, inspect_dataset, read_examples
from core.spec import Task
from tests.core.conftest import DATA
from tests.tiny_models import write_text_dataset

COLUMNS = dict(text_column="text", label_column="label")


def test_formats_imports_no_torch():
    code = "import sys, core.formats; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
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
    assert (info.format, info.rows, info.labels, info.task) == ("csv", 200, ["0", "1"], Task.TEXT_CLASSIFICATION)
    assert info.label_counts == {"0": 140, "1": 60}


def test_labels_sort_numerically(tmp_path):
    rows = [{"text": "t", "label": label} for label in (10, 2, 1)]
    info = inspect_dataset(write_text_dataset(tmp_path / "d.jsonl", rows), param="training_file", **COLUMNS)
    assert info.labels == ["1", "2", "10"]
    texts, labels = read_examples(tmp_path / "d.jsonl", **COLUMNS)
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
