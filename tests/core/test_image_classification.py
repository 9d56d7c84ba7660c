"""image-classification: the zip/Parquet reader's checks, the adapter (processor, augmentation,
loss) and tiny ResNet/ViT models learning scikit-learn's digits through the engine."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.adapters.base import DataFiles
from core.adapters.image_classification import ImageClassification
from core.datasets import images as reader
from core.datasets import inspect_files
from core.engine import RunPaths, run
from core.errors import DataError, EngineError, ModelError
from core.formats import check_file, dataset_format
from core.sink import ListSink
from core.spec import ImageAugmentationConfig, JobSpec, Task, TrainingConfig
from tests.tiny_vision import (
    digits,
    digits_files,
    png_bytes,
    save_tiny_resnet,
    save_tiny_vit,
    write_image_parquet,
    write_image_zip,
)

CONFIG = TrainingConfig()


@pytest.fixture(scope="module")
def sample():
    """60 digit images (16x16 grayscale) with their labels, 6 of each class."""
    images, labels = digits(16)
    picked = [i for d in range(10) for i in [j for j, t in enumerate(labels) if t == d][:6]]
    return [images[i] for i in picked], [labels[i] for i in picked]


@pytest.fixture(scope="module")
def sample_zip(sample, tmp_path_factory) -> Path:
    images, labels = sample
    return write_image_zip(tmp_path_factory.mktemp("zip") / "train.zip", images, labels)


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory) -> Path:
    return save_tiny_resnet(tmp_path_factory.mktemp("models") / "resnet")


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory) -> dict[str, Path]:
    return digits_files(tmp_path_factory.mktemp("digits"), n_train=400, n_validation=100, n_test=200)


def spec_for(model: Path, **config) -> JobSpec:
    return JobSpec(model=str(model), training_file="train.zip", task="image-classification", config=config)


def zip_with(tmp_path: Path, sample, extra: dict[str, bytes], *, top: str | None = "digits") -> Path:
    images, labels = sample
    return write_image_zip(tmp_path / "bad.zip", images[:20], labels[:20], top=top, extra=extra)


def raises_data_error(path: Path, *, param: str = "training_file") -> DataError:
    with pytest.raises(DataError) as info:
        reader.inspect(path, param=param, config=CONFIG)
    assert info.value.param == param
    return info.value


# --- reading ---------------------------------------------------------------------------------


def test_zip_reader_finds_labels_and_counts(sample, tmp_path):
    images, labels = sample
    junk = {"__MACOSX/digits/0/._00000.png": b"\x00resource fork", "digits/.DS_Store": b"\x00",
            "digits/3/.hidden.png": b"x"}
    nested = write_image_zip(tmp_path / "nested.zip", images, labels, extra=junk)
    flat = write_image_zip(tmp_path / "flat.zip", images, labels, top=None)
    for path in (nested, flat):
        summary = reader.inspect(path, param="training_file", config=CONFIG)
        assert summary.task == Task.IMAGE_CLASSIFICATION and summary.rows == 60
        assert summary.labels == [str(d) for d in range(10)]
        assert summary.label_counts == {str(d): 6 for d in range(10)}
        assert summary.details["smallest"] == summary.details["largest"] == "16x16"
        rows = reader.read(path, param="training_file", config=CONFIG)
        assert [r.label for r in rows] == [str(t) for t in labels]
        assert [r.data for r in rows] == [png_bytes(im) for im in images]
    assert reader.inspect(nested, param="training_file", config=CONFIG).details["top_folder"] == "digits"


def test_labels_sort_numerically(tmp_path, sample):
    images, _ = sample
    path = write_image_zip(tmp_path / "d.zip", images[:3], ["10", "2", "9"])
    assert reader.inspect(path, param="training_file", config=CONFIG).labels == ["2", "9", "10"]


@pytest.mark.parametrize("name", ["../evil/x.png", "/abs/x.png", "digits/../../x.png", "digits\\0\\x.png"])
def test_zip_refuses_names_that_escape(tmp_path, sample, name):
    error = raises_data_error(zip_with(tmp_path, sample, {name: png_bytes(sample[0][0])}))
    assert name in error.message or repr(name) in error.message


def encoded(image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=fmt)
    return buffer.getvalue()


def test_jpeg_webp_and_bmp_are_read(tmp_path, sample):
    image = sample[0][0]
    extra = {"digits/0/a.JPG": encoded(image, "JPEG"), "digits/0/b.webp": encoded(image, "WEBP"),
             "digits/0/c.bmp": encoded(image, "BMP"), "digits/0/d.jpeg": encoded(image, "JPEG")}
    path = zip_with(tmp_path, sample, extra)
    assert reader.inspect(path, param="training_file", config=CONFIG).rows == 24
    rows = reader.read(path, param="training_file", config=CONFIG)
    assert [reader.load_rgb(r, param="training_file").size for r in rows[-4:]] == [(16, 16)] * 4


def test_corrupt_images_are_named(tmp_path, sample):
    good = png_bytes(sample[0][0])
    bad = {
        "digits/3/garbage.png": b"not an image at all",
        "digits/4/cut.png": good[: len(good) - 20],
        "digits/5/really-a-gif.png": encoded(sample[0][0], "GIF"),  # a decoder we do not open user data with
    }
    for member, data in bad.items():
        error = raises_data_error(zip_with(tmp_path, sample, {member: data}))
        assert member in error.message and "not a readable image" in error.message


def test_unexpected_members_are_named(tmp_path, sample):
    error = raises_data_error(zip_with(tmp_path, sample, {"digits/notes.txt": b"hello"}))
    assert "digits/notes.txt" in error.message and "not an image file" in error.message
    error = raises_data_error(zip_with(tmp_path, sample, {"digits/0/deeper/x.png": png_bytes(sample[0][0])}))
    assert "digits/0/deeper/x.png" in error.message and "label/image" in error.message
    error = raises_data_error(zip_with(tmp_path, sample, {"x.png": png_bytes(sample[0][0])}))
    assert error.message.startswith("x.png: expected label/image")
    error = raises_data_error(zip_with(tmp_path, sample, {"other/0/x.png": png_bytes(sample[0][0])}))
    assert "several top folders (digits, other)" in error.message


def test_zip_caps_are_checked_before_reading(tmp_path, sample, monkeypatch):
    path = zip_with(tmp_path, sample, {})
    monkeypatch.setattr(reader, "MAX_MEMBERS", 19)
    assert "20 members; at most 19" in raises_data_error(path).message
    monkeypatch.setattr(reader, "MAX_MEMBERS", 1000)
    total = sum(i.file_size for i in zipfile.ZipFile(path).infolist())
    monkeypatch.setattr(reader, "MAX_TOTAL_BYTES", total - 1)
    assert f"expands to {total} bytes" in raises_data_error(path).message
    monkeypatch.setattr(reader, "MAX_TOTAL_BYTES", 10**9)
    monkeypatch.setattr(reader, "MAX_IMAGE_PIXELS", 16 * 16 - 1)
    error = raises_data_error(path)
    assert "digits/0/00000.png" in error.message and "16x16 pixels" in error.message


def test_zip_bomb_member_is_refused_from_the_index(tmp_path, sample, monkeypatch):
    path = zip_with(tmp_path, sample, {"digits/0/bomb.png": bytes(4 * 1024 * 1024)})
    read = []
    monkeypatch.setattr(reader, "_read_member", lambda *a, **k: read.append(a) or b"")
    error = raises_data_error(path)
    assert "digits/0/bomb.png" in error.message and "zip bomb" in error.message
    assert read == []  # nothing was decompressed


def test_decompression_bomb_image_is_refused(tmp_path, sample):
    from PIL import Image

    huge = io.BytesIO()
    Image.new("L", (8000, 8000)).save(huge, format="PNG")  # 64 MP of zeros: a few kB of PNG
    error = raises_data_error(zip_with(tmp_path, sample, {"digits/1/huge.png": huge.getvalue()}))
    assert "digits/1/huge.png" in error.message and "8000x8000" in error.message


def test_unknown_validation_label_and_single_label(tmp_path, sample):
    images, labels = sample
    train = write_image_zip(tmp_path / "train.zip", images[:30], labels[:30])  # classes 0-4
    validation = write_image_zip(tmp_path / "validation.zip", images[24:42], labels[24:42])  # 4-6
    with pytest.raises(DataError) as info:
        inspect_files(Task.IMAGE_CLASSIFICATION, {"training_file": train, "validation_file": validation}, CONFIG)
    assert info.value.code == "unknown_label" and info.value.param == "validation_file"
    assert "'5', '6'" in info.value.message
    single = write_image_zip(tmp_path / "single.zip", images[:6], labels[:6])
    with pytest.raises(DataError, match="single label"):
        inspect_files(None, {"training_file": single}, CONFIG)


def test_parquet_bytes_and_struct_read_like_the_zip(tmp_path, sample, sample_zip):
    images, labels = sample
    expected = reader.read(sample_zip, param="training_file", config=CONFIG)
    for struct in (False, True):
        path = write_image_parquet(tmp_path / f"d{struct}.parquet", images, labels, struct=struct,
                                   image_column="img", label_column="digit")
        config = TrainingConfig(image_column="img", label_column="digit")
        summary = reader.inspect(path, param="training_file", config=config)
        assert summary.labels == [str(d) for d in range(10)] and summary.label_counts == {str(d): 6 for d in range(10)}
        rows = reader.read(path, param="training_file", config=config)
        assert [(r.data, r.label) for r in rows] == [(r.data, r.label) for r in expected]
        assert rows[4].where == "row 5"
    path = write_image_parquet(tmp_path / "d.parquet", images, labels)
    with pytest.raises(DataError, match="no column 'picture'"):
        reader.inspect(path, param="test_file", config=TrainingConfig(image_column="picture"))


def test_parquet_refuses_paths_and_bad_cells(tmp_path, sample):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = png_bytes(sample[0][0])
    cells = [{"bytes": good, "path": None}, {"bytes": None, "path": "/etc/passwd"}]
    pq.write_table(pa.table({"image": cells, "label": [0, 1]}), tmp_path / "paths.parquet")
    error = raises_data_error(tmp_path / "paths.parquet")
    assert error.message.startswith("row 2:") and "no image bytes" in error.message
    pq.write_table(pa.table({"image": [good, b"junk"], "label": ["a", "b"]}), tmp_path / "junk.parquet")
    assert raises_data_error(tmp_path / "junk.parquet").message.startswith("row 2: not a readable image")
    pq.write_table(pa.table({"image": [good, good], "label": ["a", None]}), tmp_path / "missing.parquet")
    assert raises_data_error(tmp_path / "missing.parquet").message == "row 2: 'label' is missing."


def test_upload_check_accepts_a_zip_and_names_bad_members(tmp_path, sample, sample_zip):
    assert dataset_format("pets.ZIP") == "zip"
    details = check_file(sample_zip, "zip", param="file")
    assert details["format"] == "zip" and details["rows"] == 60 and details["labels"] == [str(d) for d in range(10)]
    with pytest.raises(DataError) as info:
        check_file(zip_with(tmp_path, sample, {"digits/2/x.png": b"??"}), "zip", param="file")
    assert info.value.param == "file" and "digits/2/x.png" in info.value.message
    (tmp_path / "fake.zip").write_bytes(b"PK not really")
    with pytest.raises(DataError, match="not a readable zip"):
        check_file(tmp_path / "fake.zip", "zip", param="file")


# --- the adapter ---------------------------------------------------------------------------


def prepared(model: Path, files: dict[str, Path], **config) -> tuple[ImageClassification, object, object]:
    adapter = ImageClassification(spec_for(model, **config))
    processor = adapter.load_processor(str(model))
    data = adapter.prepare(DataFiles(files["train"], files.get("validation"), files.get("test")), processor)
    return adapter, processor, data


def test_inputs_are_the_processors_output(resnet_dir, sample_zip, sample):
    adapter, processor, data = prepared(resnet_dir, {"train": sample_zip}, image_size=24)
    assert processor.size["height"] == 24 and processor.image_mean == pytest.approx([0.485, 0.456, 0.406])
    assert {t.dtype for t in data.train.features["pixel_values"]} == {torch.uint8}
    batch = adapter.collate(data.train, list(range(60)))
    rgb = [image.convert("RGB") for image in sample[0]]
    expected = torch.as_tensor(np.asarray(processor(images=rgb)["pixel_values"]))
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].shape == (60, 3, 24, 24) and torch.equal(batch["pixel_values"], expected)
    assert batch["labels"].tolist() == sample[1] and data.labels == [str(d) for d in range(10)]
    assert data.train.lengths == [1] * 60


def test_prepare_reads_each_zip_member_once(resnet_dir, sample, sample_zip, tmp_path, monkeypatch):
    """The checks (inspect's), the labels and the pixels all come from one read of every member."""
    from collections import Counter

    images, labels = sample
    files = {"train": sample_zip, "validation": write_image_zip(tmp_path / "validation.zip", images[:20], labels[:20]),
             "test": write_image_zip(tmp_path / "test.zip", images[20:40], labels[20:40])}
    reads = Counter()
    read_member = reader._read_member

    def counting(archive, info, *, param):
        reads[(Path(archive.filename).name, info.filename)] += 1
        return read_member(archive, info, param=param)

    monkeypatch.setattr(reader, "_read_member", counting)
    _, _, data = prepared(resnet_dir, files, image_size=16)
    assert (len(data.train), len(data.validation), len(data.test)) == (60, 20, 20)
    assert len(reads) == 100 and set(reads.values()) == {1}


def test_a_saved_processor_is_used_and_resized(resnet_dir, sample_zip, tmp_path):
    import shutil

    from transformers import ConvNextImageProcessorPil

    model = Path(shutil.copytree(resnet_dir, tmp_path / "resnet"))
    saved = ConvNextImageProcessorPil(size={"shortest_edge": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    saved.save_pretrained(model)
    adapter, processor, data = prepared(model, {"train": sample_zip}, image_size=20)
    assert adapter.image_shape == (3, 20, 20) and list(processor.image_mean) == [0.5] * 3
    pixels = adapter.collate(data.train, list(range(60)))["pixel_values"]
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.min() == -1  # (x/255 - 0.5) / 0.5


def colour_images(n: int, seed: int = 0) -> list:
    """`n` RGB noise images of assorted non-square sizes, so every resize interpolates."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(29, 23), (40, 31), (23, 37), (64, 48)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in
            (sizes[i % len(sizes)] for i in range(n))]


def with_processor(resnet_dir: Path, folder: Path, processor) -> Path:
    import shutil

    model = Path(shutil.copytree(resnet_dir, folder))
    processor.save_pretrained(model)
    return model


def _processors():
    from transformers import (
        CLIPImageProcessorPil,
        ConvNextImageProcessorPil,
        EfficientNetImageProcessorPil,
        MobileViTImageProcessorPil,
    )

    return {
        "default": None,  # the model folder has none: core's ViT-style default (square resize, ImageNet mean/std)
        "convnext-crop-pct": ConvNextImageProcessorPil(size={"shortest_edge": 224}),
        "clip-centre-crop": CLIPImageProcessorPil(),
        "mobilevit-bgr": MobileViTImageProcessorPil(),  # no mean/std, channels flipped to BGR
        "efficientnet": EfficientNetImageProcessorPil(rescale_offset=True),  # include_top: float32 held
    }


@pytest.mark.parametrize("name", list(_processors()))
def test_batches_are_the_processors_output_bit_for_bit(name, resnet_dir, tmp_path):
    """The collate's normalised batch is exactly what the processor makes of the same images.

    Pillow-backed processors resize and crop in uint8, so the held pixels are the processor's own
    intermediate pixels and the table holds its own float32 per value: no tolerance is needed.
    """
    saved = _processors()[name]
    model = resnet_dir if saved is None else with_processor(resnet_dir, tmp_path / "model", saved)
    images = colour_images(8)
    labels = [i % 2 for i in range(8)]
    files = {"train": write_image_zip(tmp_path / "train.zip", images, labels)}
    adapter, processor, data = prepared(model, files, image_size=20)
    held = data.train.features["pixel_values"]
    assert {t.dtype for t in held} == {torch.float32 if name == "efficientnet" else torch.uint8}
    assert (adapter.pixel_table is None) == (name == "efficientnet")
    batch = adapter.collate(data.train, list(range(8)))["pixel_values"]
    expected = torch.as_tensor(np.asarray(processor(images=images)["pixel_values"]))
    assert batch.dtype == torch.float32 and batch.shape == (8, 3, 20, 20)
    assert not torch.equal(expected, expected.round())  # normalised floats, not pixel values
    assert torch.equal(batch, expected)

    # Augmentation works in [0, 1] pixel space and comes back to the same normalisation.
    adapter, _, data = prepared(model, files, image_size=20, augmentation={"image": {"horizontal_flip": 1.0}})
    flipped = adapter.collate(data.train, list(range(8)), rng=np.random.default_rng(0))["pixel_values"]
    torch.testing.assert_close(flipped, expected.flip(-1), atol=1e-5, rtol=0)


def test_held_images_are_uint8_of_exact_size(resnet_dir, tmp_path):
    """What a split holds in memory: N x 3 x H x W bytes of uint8 pixels (one tensor), nothing more."""
    images = colour_images(12)
    labels = [i % 3 for i in range(12)]
    files = {"train": write_image_zip(tmp_path / "train.zip", images, labels),
             "validation": write_image_zip(tmp_path / "validation.zip", images[:5], labels[:5])}
    _, _, data = prepared(resnet_dir, files, image_size=20)
    for split, n in ((data.train, 12), (data.validation, 5)):
        held = split.features["pixel_values"]
        assert len(held) == n and {t.dtype for t in held} == {torch.uint8}
        assert {tuple(t.shape) for t in held} == {(3, 20, 20)}
        assert sum(t.nbytes for t in held) == n * 3 * 20 * 20
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
        assert sum(storages.values()) == n * 3 * 20 * 20  # views of one tensor: no crop's parent kept alive


def test_augmentation_is_seeded_by_the_batch_rng_only(resnet_dir, sample_zip):
    strong = ImageAugmentationConfig(random_resized_crop=0.5, horizontal_flip=0.5, rotation=20, brightness=0.3,
                                     contrast=0.3, saturation=0.3, hue=0.1)
    adapter, _, data = prepared(resnet_dir, {"train": sample_zip}, image_size=16,
                                augmentation={"image": strong.model_dump()})
    indices = list(range(0, 60, 3))
    plain = adapter.collate(data.train, indices)["pixel_values"]
    torch_state = torch.get_rng_state()
    first = adapter.collate(data.train, indices, rng=np.random.default_rng([42, 0, 3]))["pixel_values"]
    assert torch.equal(torch.get_rng_state(), torch_state)  # torch's global generator is left alone
    again = adapter.collate(data.train, indices, rng=np.random.default_rng([42, 0, 3]))["pixel_values"]
    other = adapter.collate(data.train, indices, rng=np.random.default_rng([42, 0, 4]))["pixel_values"]
    assert torch.equal(first, again)
    assert not torch.allclose(first, other) and not torch.allclose(first, plain)
    assert torch.equal(adapter.collate(data.train, indices)["pixel_values"], plain)  # no rng: no augmentation


def test_flip_round_trips_through_pixel_space(resnet_dir, sample_zip):
    adapter, _, data = prepared(resnet_dir, {"train": sample_zip}, image_size=16,
                                augmentation={"image": {"horizontal_flip": 1.0}})
    plain = adapter.collate(data.train, [0, 1, 2])["pixel_values"]
    flipped = adapter.collate(data.train, [0, 1, 2], rng=np.random.default_rng(0))["pixel_values"]
    torch.testing.assert_close(flipped, plain.flip(-1), atol=1e-5, rtol=0)


def test_augmentation_off_is_the_identity(resnet_dir, sample_zip):
    adapter, _, data = prepared(resnet_dir, {"train": sample_zip}, image_size=16,
                                augmentation={"image": ImageAugmentationConfig().model_dump()})
    assert adapter.augmenter is None
    rng = np.random.default_rng(0)
    batch = adapter.collate(data.train, [5, 1, 7], rng=rng)
    assert torch.equal(batch["pixel_values"], adapter.collate(data.train, [5, 1, 7])["pixel_values"])
    assert rng.integers(10**9) == np.random.default_rng(0).integers(10**9)  # nothing drawn


def test_evaluation_is_never_augmented(resnet_dir, sample_zip, monkeypatch):
    adapter, processor, data = prepared(resnet_dir, {"train": sample_zip, "test": sample_zip}, image_size=16,
                                        augmentation={"image": {"rotation": 30, "brightness": 0.5}})
    model = adapter.build_model(str(resnet_dir), data, processor)
    evaluate = dict(device=torch.device("cpu"), precision=_fp32(), batch_size=16)
    before = adapter.evaluate(model, data.test, **evaluate)
    monkeypatch.setattr(adapter, "augmenter", lambda *a: pytest.fail("augmented an evaluation batch"))
    after = adapter.evaluate(model, data.test, **evaluate, report=True)
    assert after["loss"] == pytest.approx(before["loss"], abs=1e-6)


def _fp32():
    from core.device import Precision

    return Precision("fp32", None)


def test_loss_is_summed_cross_entropy_with_smoothing_and_weights(resnet_dir, sample_zip, sample, tmp_path):
    from sklearn.utils.class_weight import compute_class_weight

    images, labels = sample
    skewed = write_image_zip(tmp_path / "skewed.zip", images[:18] + images[24:30], labels[:18] + labels[24:30])
    adapter, processor, data = prepared(resnet_dir, {"train": skewed}, image_size=16,
                                        loss={"label_smoothing": 0.1, "class_weights": "balanced"})
    targets = np.array(data.train.targets)
    expected = compute_class_weight("balanced", classes=np.unique(targets), y=targets)
    assert adapter.weights.tolist() == pytest.approx(expected.tolist())
    model = adapter.build_model(str(resnet_dir), data, processor).eval()
    batch = adapter.collate(data.train, list(range(8)))
    with torch.no_grad():
        loss, probabilities = adapter.loss_sum(model, batch)
        logits = model(pixel_values=batch["pixel_values"]).logits
    reference = F.cross_entropy(logits, batch["labels"], weight=torch.tensor(expected, dtype=torch.float32),
                                label_smoothing=0.1, reduction="none").sum()
    assert float(loss) == pytest.approx(float(reference), rel=1e-6)
    torch.testing.assert_close(probabilities, logits.softmax(-1))
    with pytest.raises(EngineError) as info:
        prepared(resnet_dir, {"train": skewed}, image_size=16, loss={"class_weights": {"0": 2.0, "cat": 1.0}})
    assert info.value.param == "config.loss.class_weights" and "'cat'" in info.value.message


def test_a_text_model_is_refused(tiny_bert_dir, sample_zip):
    adapter, processor, data = prepared(tiny_bert_dir, {"train": sample_zip}, image_size=16)
    with pytest.raises(ModelError) as info:
        adapter.build_model(str(tiny_bert_dir), data, processor)
    assert info.value.param == "model" and "image classifier" in info.value.message


def test_mlp_head_on_resnet(resnet_dir, sample_zip):
    adapter, processor, data = prepared(resnet_dir, {"train": sample_zip}, image_size=16,
                                        head={"type": "mlp", "hidden_sizes": [12]})
    model = adapter.build_model(str(resnet_dir), data, processor)
    hidden = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in hidden] == [(16, 12), (12, 10)]
    loss, probabilities = adapter.loss_sum(model, adapter.collate(data.train, [0, 1, 2]))
    assert probabilities.shape == (3, 10) and loss.requires_grad


# --- learning ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "builder, config, hyperparameters, floor",
    [
        # Mild augmentation on: the engine's training batches go through it.
        (save_tiny_resnet, {"image_size": 32, "augmentation": {"image": {"rotation": 10, "brightness": 0.2}}},
         {"n_epochs": 8, "batch_size": 16, "learning_rate_multiplier": 10}, 0.8),
        (lambda d: save_tiny_vit(d, image_size=16, patch_size=8), {},
         {"n_epochs": 8, "batch_size": 16, "learning_rate_multiplier": 3}, 0.6),
    ],
    ids=["resnet", "vit"],
)
def test_tiny_models_learn_digits_and_export(builder, config, hyperparameters, floor, digit_files, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model_dir = builder(tmp_path / "base")
    spec = JobSpec(model=str(model_dir), training_file="train.zip", validation_file="validation.zip",
                   test_file="test.zip", hyperparameters=hyperparameters, config={**config, "precision": "fp32"})
    sink = ListSink()
    paths = RunPaths(model=str(model_dir), train_file=digit_files["train"], validation_file=digit_files["validation"],
                     test_file=digit_files["test"], work_dir=tmp_path / "work")
    result = run(spec, paths, sink)  # task inferred from the .zip
    losses = sink.series("train", "loss")
    assert losses[-1] < 0.5 * losses[0]
    assert result.metrics["baseline_test"]["accuracy"] < 0.3 and result.metrics["test"]["accuracy"] > floor
    assert result.trained_tokens == 0
    report = result.metrics["test"]
    assert len(report["confusion_matrix"]["matrix"]) == 10 and "ece" in report["calibration"]

    out = tmp_path / "exported"
    with tarfile.open(result.archive_path) as tar:
        tar.extractall(out, filter="data")
    exported = AutoModelForImageClassification.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    assert exported.config.id2label == {i: str(i) for i in range(10)}
    rows = reader.read(digit_files["test"], param="test_file", config=CONFIG)
    inputs = processor(images=[reader.load_rgb(r, param="test_file") for r in rows], return_tensors="pt")
    with torch.no_grad():
        logits = exported(**inputs).logits
    targets = torch.tensor([int(r.label) for r in rows])
    assert float((logits.argmax(-1) == targets).float().mean()) == pytest.approx(report["accuracy"])
    assert float(F.cross_entropy(logits, targets)) == pytest.approx(report["loss"], abs=1e-4)


def test_resumed_run_sees_the_same_augmented_batches(resnet_dir, sample_zip, tmp_path):
    import shutil

    from core.callbacks import Callback

    class Losses(Callback):
        def __init__(self):
            self.losses = {}

        def on_step_end(self, state, control):
            self.losses[state.step] = state.loss

    class CopyingSink(ListSink):
        def checkpoint(self, step, path, metrics):
            super().checkpoint(step, path, metrics)
            if step == 2:  # mid-epoch 0 (4 batches of 16 per epoch)
                shutil.copytree(path, tmp_path / "saved")

    augmentation = {"random_resized_crop": 0.6, "horizontal_flip": 0.5, "rotation": 20, "brightness": 0.3, "hue": 0.05}
    spec = JobSpec(model=str(resnet_dir), training_file="train.zip",
                   hyperparameters={"n_epochs": 2, "batch_size": 16, "learning_rate_multiplier": 5},
                   config={"image_size": 16, "precision": "fp32", "checkpoint_every_steps": 2,
                           "augmentation": {"image": augmentation}})
    full, resumed = Losses(), Losses()
    run(spec, RunPaths(model=str(resnet_dir), train_file=sample_zip, validation_file=None, test_file=None,
                       work_dir=tmp_path / "a"), CopyingSink(), callbacks=[full])
    run(spec, RunPaths(model=str(resnet_dir), train_file=sample_zip, validation_file=None, test_file=None,
                       work_dir=tmp_path / "b", resume_from=tmp_path / "saved"), ListSink(), callbacks=[resumed])
    assert max(full.losses) == 8 and min(resumed.losses) == 3
    assert resumed.losses == {step: full.losses[step] for step in range(3, 9)}


# --- hostile bytes -------------------------------------------------------------------------


def _valid_zip_bytes(sample) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for i, (image, label) in enumerate(zip(*[part[:4] for part in sample])):
            archive.writestr(f"d/{label}/{i}.png", png_bytes(image))
    return buffer.getvalue()


@pytest.mark.parametrize("content", [
    b"",
    b"PK\x05\x06" + b"\x00" * 18,  # an empty archive
    # A member with an empty name; a local header offset before the file start; "zip file version 6.4".
    b"PK\x01\x02" + b"\x00" * 29 + b"\x01" + b"\x00" * 86 + b"PK\x05\x06" + b"\x00" * 8 + b"x" + b"\x00" * 9,
    b"PK\x01\x02" + b"\x00" * 24 + b"\x0b" + b"\x00" * 17 + b"0/a.png.jpgPK\x05\x06" + b"\x00" * 8 + b"9" + b"\x00" * 9,
    b"PK\x01\x02\x00\x00@" + b"\x00" * 53 + b"PK\x05\x06" + b"\x00" * 8 + b"9" + b"\x00" * 9,
])
def test_hostile_zip_bytes_raise_only_data_error(tmp_path, content):
    path = tmp_path / "x.zip"
    path.write_bytes(content)
    with pytest.raises(DataError):
        reader.inspect(path, param="training_file", config=CONFIG)


def test_corrupted_zips_raise_only_data_error(tmp_path, sample):
    """Every single-byte corruption of a small valid zip either still reads or raises DataError."""
    valid = _valid_zip_bytes(sample)
    rng = np.random.default_rng(0)
    path = tmp_path / "x.zip"
    outcomes = set()
    for position in rng.choice(len(valid), size=300, replace=False):
        corrupted = bytearray(valid)
        corrupted[position] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(corrupted))
        try:
            rows = reader.read(path, param="training_file", config=CONFIG)
            [reader.load_rgb(row, param="training_file") for row in rows]
            outcomes.add("read")
        except DataError as error:
            assert error.param == "training_file" and error.message
            outcomes.add("refused")
    assert outcomes == {"read", "refused"}  # both happen: the test reaches past the index
