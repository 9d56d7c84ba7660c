"""Per-example loss weights (config.weight_column): read and checked with the row named, and exact
in the loss: a weight of 2 is a row seen twice, 0 a row left out, and scaling every weight changes
nothing (a step's loss is the weighted mean over its rows)."""

from __future__ import annotations

import math

import pytest
import torch

from core.adapters.base import DataFiles
from core.adapters.image_classification import ImageClassification
from core.adapters.text_classification import TextClassification
from core.callbacks import Callback
from core.datasets import text
from core.engine import RunPaths, run
from core.errors import DataError
from core.sink import ListSink
from core.spec import JobSpec
from tests.tiny_models import sentiment_rows, write_text_dataset
from tests.tiny_vision import digits, save_tiny_resnet, write_image_parquet

# Three rows: A (weight 2), B (weight 1), C (weight 0, the shortest text so padding is A's or B's).
ROWS = {
    "single_label": [("the film was good and fun", "pos"), ("a boring waste of time", "neg"), ("bad", "neg")],
    "multi_label": [("the film was good and fun", "fun|good"), ("a boring waste of time", "bad"), ("bad", "bad|fun")],
    "regression": [("the film was good and fun", 4.5), ("a boring waste of time", 1.25), ("bad", 0.5)],
}


def weighted_file(path, rows, weights, **extra):
    return write_text_dataset(path, [{"text": t, "label": y, "w": w, **extra} for (t, y), w in zip(rows, weights)])


def gradients(adapter, model, split, indices):
    """The gradient of one step over `indices`, as the engine computes it (sum / units)."""
    model.zero_grad()
    batch = adapter.collate(split, indices)
    loss_sum, _ = adapter.loss_sum(model, batch)
    (loss_sum / adapter.units(batch)).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)  # float sums in another order


def text_step(tiny_bert_dir, tmp_path, name, rows, weights, problem):
    extra = {"label_separator": "|"} if problem == "multi_label" else {}
    config = {"max_length": 32, "problem_type": problem, **extra, **({"weight_column": "w"} if weights else {})}
    spec = JobSpec.model_validate({"model": "m", "training_file": "t", "config": config})
    path = (weighted_file(tmp_path / f"{name}.csv", rows, weights) if weights
            else write_text_dataset(tmp_path / f"{name}.csv", [{"text": t, "label": y} for t, y in rows]))
    adapter = TextClassification(spec)
    tokenizer = adapter.load_processor(str(tiny_bert_dir))
    data = adapter.prepare(DataFiles(train=path), tokenizer)
    torch.manual_seed(0)
    model = adapter.build_model(str(tiny_bert_dir), data, tokenizer).eval()  # no dropout: comparable steps
    return adapter, model, data.train


@pytest.mark.parametrize("problem", ["single_label", "multi_label", "regression"])
def test_a_weight_of_two_is_the_row_seen_twice_and_zero_the_row_left_out(tiny_bert_dir, tmp_path, problem):
    rows = ROWS[problem]
    weighted = text_step(tiny_bert_dir, tmp_path, "weighted", rows, [2, 1, 0], problem)
    repeated = text_step(tiny_bert_dir, tmp_path, "repeated", [rows[0], rows[0], rows[1]], None, problem)
    assert weighted[2].weights == [2.0, 1.0, 0.0] and repeated[2].weights is None
    assert weighted[0].labels == repeated[0].labels
    if problem == "regression":  # the label's standardisation is weighted too
        assert math.isclose(weighted[0].target_mean, repeated[0].target_mean)
        assert math.isclose(weighted[0].target_std, repeated[0].target_std)
    assert_same(gradients(*weighted, [0, 1, 2]), gradients(*repeated, [0, 1, 2]))


def test_scaling_every_weight_changes_nothing(tiny_bert_dir, tmp_path):
    rows = ROWS["single_label"]
    a = gradients(*text_step(tiny_bert_dir, tmp_path, "a", rows, [2, 1, 0.5], "single_label"), [0, 1, 2])
    b = gradients(*text_step(tiny_bert_dir, tmp_path, "b", rows, [0.2, 0.1, 0.05], "single_label"), [0, 1, 2])
    assert_same(a, b)


def test_a_step_split_into_micro_batches_keeps_the_weighted_mean(tiny_bert_dir, tmp_path):
    """Accumulation divides each micro-batch by the whole step's weight, as one big batch would."""
    adapter, model, split = text_step(tiny_bert_dir, tmp_path, "w", ROWS["single_label"], [2, 1, 0.5], "single_label")
    whole = gradients(adapter, model, split, [0, 1, 2])
    model.zero_grad()
    group = [adapter.collate(split, [0]), adapter.collate(split, [1, 2])]
    units = sum(adapter.units(batch) for batch in group)
    assert units == 3.5
    for batch in group:
        (adapter.loss_sum(model, batch)[0] / units).backward()
    assert_same(whole, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})


def test_image_rows_weigh_the_same_way(tmp_path):
    images, labels = digits(16)
    model_dir = save_tiny_resnet(tmp_path / "resnet", num_labels=10)

    def step(name, picks, weights):
        path = write_image_parquet(tmp_path / f"{name}.parquet", [images[i] for i in picks],
                                   [str(labels[i]) for i in picks])
        if weights is not None:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            pq.write_table(table.append_column("w", [[float(w) for w in weights]]), path)
        config = {"weight_column": "w"} if weights is not None else {}
        spec = JobSpec.model_validate({"model": "m", "training_file": "t", "config": config})
        adapter = ImageClassification(spec)
        processor = adapter.load_processor(str(model_dir))
        data = adapter.prepare(DataFiles(train=path), processor)
        torch.manual_seed(0)
        model = adapter.build_model(str(model_dir), data, processor).eval()
        return adapter, model, data.train

    # Rows 0..3 are digits 0, 1, 2, 3; the weight-0 row's class (3) also appears in both files.
    weighted = step("weighted", [0, 1, 2, 3, 13], [2, 1, 1, 0, 1])
    repeated = step("repeated", [0, 0, 1, 2, 13], None)
    assert_same(gradients(*weighted, list(range(5))), gradients(*repeated, list(range(5))))


class Steps(Callback):
    def __init__(self):
        self.losses = []

    def on_step_end(self, state, control):
        self.losses.append(state.loss)


def test_weights_of_one_train_exactly_as_no_weights(tiny_bert_dir, tmp_path):
    """Through the whole engine (sampler, accumulation, schedule): the weighted path at weight 1 is
    the unweighted one, loss for loss."""
    rows = sentiment_rows(48, seed=3)
    plain = write_text_dataset(tmp_path / "plain.csv", rows)
    ones = write_text_dataset(tmp_path / "ones.csv", [{**r, "w": 1} for r in rows])

    def losses(train, config):
        spec = JobSpec.model_validate({"model": "m", "training_file": "t", "seed": 5, "config": {
            "max_length": 32, "gradient_accumulation_steps": 2, **config},
            "hyperparameters": {"n_epochs": 2, "batch_size": 8}})
        steps = Steps()
        run(spec, RunPaths(str(tiny_bert_dir), train, None, None, tmp_path / f"work-{train.stem}"), ListSink(),
            callbacks=[steps], archive=False)
        return steps.losses

    expected = losses(plain, {})
    assert len(expected) == 6
    assert losses(ones, {"weight_column": "w"}) == pytest.approx(expected, rel=1e-6)


def read(tmp_path, rows, *, param="training_file", name="d.csv", **config):
    from core.spec import TrainingConfig

    path = write_text_dataset(tmp_path / name, rows)
    return text.parse(path, param=param, config=TrainingConfig(weight_column="w", **config))


def test_weights_are_read_as_numbers(tmp_path):
    parsed = read(tmp_path, [{"text": "a", "label": "x", "w": "0.5"}, {"text": "b", "label": "y", "w": 3}])
    assert parsed.weights == [0.5, 3.0]
    jsonl = read(tmp_path, [{"text": "a", "label": "x", "w": 2}, {"text": "b", "label": "y", "w": 0}], name="d.jsonl")
    assert jsonl.weights == [2.0, 0.0]


@pytest.mark.parametrize(("value", "where"), [("heavy", "line 3"), ("-1", "line 3"), ("inf", "line 3"), ("", "line 3")])
def test_a_bad_weight_names_its_line(tmp_path, value, where):
    with pytest.raises(DataError) as e:
        read(tmp_path, [{"text": "a", "label": "x", "w": 1}, {"text": "b", "label": "y", "w": value}])
    assert e.value.param == "training_file" and e.value.message.startswith(f"{where}: 'w' must be a weight")


def test_a_missing_weight_column_names_the_setting(tmp_path):
    with pytest.raises(DataError) as e:
        read(tmp_path, [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    assert e.value.param == "config.weight_column" and "no column 'w'" in e.value.message
    with pytest.raises(DataError) as e:  # JSONL: a record without the key
        read(tmp_path, [{"text": "a", "label": "x", "w": 1}, {"text": "b", "label": "y"}], name="d.jsonl")
    assert e.value.param == "training_file" and "line 2" in e.value.message


def test_all_zero_weights_train_nothing_and_are_refused(tmp_path):
    with pytest.raises(DataError) as e:
        read(tmp_path, [{"text": "a", "label": "x", "w": 0}, {"text": "b", "label": "y", "w": 0}])
    assert e.value.param == "config.weight_column"


def test_validation_and_test_files_need_no_weight_column(tmp_path):
    parsed = read(tmp_path, [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}], param="validation_file")
    assert parsed.weights is None


def test_a_zip_of_images_cannot_carry_weights(tmp_path):
    from core.datasets import images
    from core.spec import TrainingConfig
    from tests.tiny_vision import write_image_zip

    pics, labels = digits(16)
    path = write_image_zip(tmp_path / "d.zip", pics[:4], [str(x) for x in labels[:4]])
    with pytest.raises(DataError) as e:
        images.parse(path, param="training_file", config=TrainingConfig(weight_column="w"))
    assert e.value.param == "config.weight_column" and "Parquet" in e.value.message
