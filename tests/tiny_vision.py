"""Tiny image classifiers and image datasets built on the spot, for the image-classification tests.

Nothing is downloaded: the models are built from configs (a few thousand parameters) and saved
with `save_pretrained`; the data are scikit-learn's 8x8 handwritten digits (shipped inside the
scikit-learn wheel), written as PNG files in a zip of label folders, or as Parquet.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from pathlib import Path


def save_tiny_resnet(dir: Path, *, num_labels: int | None = None, seed: int = 0, embedding_size: int = 8,
                     hidden_sizes: Sequence[int] = (8, 16)) -> Path:
    """Write a tiny ResNet (one basic block per stage, 8 and 16 channels) to `dir`, without a processor.

    Args:
        dir: the folder to create.
        num_labels: save a ResNetForImageClassification with this many labels instead of a bare ResNetModel.
        seed: torch seed of the random weights.
        embedding_size, hidden_sizes: channels of the stem and of each stage.

    Returns:
        `dir`.
    """
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification, ResNetModel

    config = ResNetConfig(embedding_size=embedding_size, hidden_sizes=list(hidden_sizes),
                          depths=[1] * len(hidden_sizes), layer_type="basic", downsample_in_first_stage=False)
    torch.manual_seed(seed)
    if num_labels is None:
        model = ResNetModel(config)
    else:
        config.num_labels = num_labels
        model = ResNetForImageClassification(config)
    model.save_pretrained(dir)
    return Path(dir)


def save_tiny_vit(dir: Path, *, image_size: int = 16, patch_size: int = 4, seed: int = 0) -> Path:
    """Write a tiny ViT (2 layers, hidden 32, 4x4 patches) to `dir`, without a processor.

    Returns:
        `dir`.
    """
    import torch
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=image_size, patch_size=patch_size, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(seed)
    ViTModel(config, add_pooling_layer=False).save_pretrained(dir)
    return Path(dir)


def digits(size: int = 16):
    """scikit-learn's 1,797 handwritten digits as (list of grayscale PIL images, list of labels).

    Args:
        size: side of the images, upscaled from 8x8 (nearest neighbour, so the pixels stay sharp).
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = (bunch.images * (255 / 16)).round().astype(np.uint8)  # values 0..16 -> 0..255
    images = [Image.fromarray(p).resize((size, size), Image.Resampling.NEAREST) for p in pixels]
    return images, [int(t) for t in bunch.target]


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_zip(
    path: Path, images, labels, *, top: str | None = "digits", extra: dict[str, bytes] | None = None
) -> Path:
    """Write images as PNGs in a zip of label folders: top/label/00012.png (no top folder when None).

    Args:
        extra: more members, name -> bytes, written after the images (bad members for tests).

    Returns:
        `path`.
    """
    prefix = f"{top}/" if top else ""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for i, (image, label) in enumerate(zip(images, labels)):
            archive.writestr(f"{prefix}{label}/{i:05d}.png", png_bytes(image))
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return Path(path)


def write_image_parquet(path: Path, images, labels, *, struct: bool = False, image_column: str = "image",
                        label_column: str = "label") -> Path:
    """Write images as PNG bytes in Parquet: a binary column, or datasets' {"bytes", "path"} struct.

    Returns:
        `path`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = [png_bytes(image) for image in images]
    cells = [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(data)] if struct else data
    pq.write_table(pa.table({image_column: cells, label_column: list(labels)}), path)
    return Path(path)


def digits_files(
    root: Path, *, n_train: int, n_validation: int, n_test: int, size: int = 16, seed: int = 0
) -> dict[str, Path]:
    """train/validation/test zips of disjoint, randomly drawn digits (1,797 in all) under `root`.

    Returns:
        {"train", "validation", "test"} -> paths.
    """
    import random

    images, labels = digits(size)
    if n_train + n_validation + n_test > len(images):
        raise ValueError(f"only {len(images)} digits")
    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_validation),
              "test": (n_train + n_validation, n_train + n_validation + n_test)}
    root.mkdir(parents=True, exist_ok=True)
    return {
        name: write_image_zip(root / f"{name}.zip", [images[i] for i in order[a:b]], [labels[i] for i in order[a:b]])
        for name, (a, b) in bounds.items()
    }
