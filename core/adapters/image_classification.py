"""image-classification: any AutoModelForImageClassification (ResNet, ViT, ConvNeXt ...) with a head.

Data comes from core.datasets.images (a zip of label folders, or Parquet with image bytes). Each
image is decoded to RGB and resized/cropped by the model's image processor once, in prepare(), and
held as uint8 (C, H, W) pixels: 3 x H x W bytes per image (150 KB at 224 x 224; 10,000 images take
1.5 GB, where the processor's float32 output would take 6 GB). `collate` makes the model inputs of
the batch only, by looking each pixel value up in `pixel_table`: the processor's own float for that
value (its rescale, offset, mean/std), bit for bit, so evaluation sees what inference with the
exported processor sees. A processor whose value steps cannot be switched off apart from its resize
(EfficientNet's include_top divides by the std regardless) keeps its float32 output instead.
Training batches may be augmented (core.augment_image, in [0, 1] pixel space, mapped to model inputs
afterwards); validation and test batches never are. The loss is softmax cross-entropy, with label
smoothing and class weights as for single-label text classification.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core import metrics as M
from core.adapters.base import Split, TaskAdapter, TaskData, class_weights, weighted_sum
from core.augment_image import ImageAugmenter, is_identity, processor_pixel_range
from core.cache import digest, processor_fingerprint
from core.datasets import ParsedFile
from core.datasets import images as reader
from core.errors import EngineError, ModelError
from core.heads import replace_head
from core.loading import check_model_source, load_classifier
from core.spec import LABEL_METRICS, Task

PROCESSOR_FILE = "preprocessor_config.json"
DEFAULT_IMAGE_SIZE = 224  # when neither config.image_size nor the model's config says
ENCODE_CHUNK = 16  # images decoded at a time in prepare(): 16 twelve-megapixel photos are ~0.6 GB
VALUES_OFF = {"do_rescale": False, "do_normalize": False}  # the processor's resize and crop only


class ImageClassification(TaskAdapter):
    task = Task.IMAGE_CLASSIFICATION

    def __init__(self, spec, **kwargs):
        super().__init__(spec, **kwargs)
        self.labels: list[str] = []
        self.weights: torch.Tensor | None = None  # class weights, in class-id order
        self.augmenter: ImageAugmenter | None = None  # built by prepare() when augmentation is on
        self.forward_kwargs: dict[str, Any] = {}  # set by build_model()
        self.image_shape: tuple[int, ...] | None = None  # (C, H, W) of the prepared inputs
        self.pixel_table: torch.Tensor | None = None  # (C, 256) model input per uint8 value; None: float32 held
        self.black: torch.Tensor | None = None  # (C, 1, 1): the model input of a black pixel (augmentation)
        self.span: torch.Tensor | None = None  # (C, 1, 1): white's minus black's

    @property
    def metrics(self) -> dict[str, bool]:
        return LABEL_METRICS

    # --- data ------------------------------------------------------------------------------

    def load_processor(self, source: str, *, local_files_only: bool = False) -> Any:
        """The model's AutoImageProcessor (Pillow backend), or a default one when the folder has
        none: resize to a square of config.image_size (else the model config's image_size, else
        224) and normalise with the ImageNet mean/std. config.image_size overrides the size.

        Raises:
            ModelError: not found, no safetensors, or an unloadable processor.
            EngineError: the processor cannot make config.image_size square inputs.
        """
        from transformers import AutoImageProcessor

        location = check_model_source(source)
        side = self.config.image_size
        if isinstance(location, Path) and not (location / PROCESSOR_FILE).is_file():
            return default_processor(side or _config_image_size(location))
        try:
            # Pillow is always there for image jobs; the torchvision backend would resize slightly
            # differently depending on what a machine has installed.
            processor = AutoImageProcessor.from_pretrained(str(location), backend="pil", trust_remote_code=False,
                                                           local_files_only=local_files_only)
        except OSError as e:
            code = "invalid_model" if isinstance(location, Path) else "model_not_found"
            raise ModelError(f"Cannot load the image processor of {source!r}: {e}", param="model", code=code) from None
        except (ValueError, KeyError, TypeError) as e:
            raise ModelError(f"Cannot load the image processor of {source!r}: {e}", param="model") from None
        if side is not None:
            resize_processor(processor, side)
        return processor

    def prepare_parsed(self, parsed: dict[str, ParsedFile], processor: Any) -> TaskData:
        """Decode, resize and crop every checked image once (core.datasets.images read and checked them).

        Raises:
            DataError: an image whose pixels fail to decode.
            EngineError: images the processor makes in different sizes (param config.image_size);
                class_weights naming unknown labels; augmentation with a processor that maps black
                and white to the same input.
        """
        train = parsed["training_file"].summary
        self.labels = list(train.labels or [])
        self.weights = class_weights(self.labels, train.label_counts, self.config.loss.class_weights)
        ids = {label: i for i, label in enumerate(self.labels)}
        self.pixel_table = pixel_table(processor)

        def encode(param: str, rows: list[reader.ImageRow]) -> Split:
            pixels = self._encode(processor, rows, param=param)
            return Split(features={"pixel_values": pixels}, targets=[ids[row.label] for row in rows],
                         lengths=[1] * len(rows))

        data = TaskData.of(parsed, encode, labels=self.labels)
        augmentation = self.config.augmentation.image
        if not is_identity(augmentation):
            black, white = processor_pixel_range(processor)
            self.black, self.span = black, white - black
            self.augmenter = ImageAugmenter(augmentation, size=self.image_shape[-2:])
        return data

    def _encode(self, processor: Any, rows: list[reader.ImageRow], *, param: str) -> list[torch.Tensor]:
        """The held (C, H, W) inputs of `rows`: views of one (N, C, H, W) tensor, uint8 pixels after the
        processor's resize and crop (float32 processor output when self.pixel_table is None), once
        per content through the adapter's cache."""
        key = {"processor": processor_fingerprint(processor), "uint8": self.pixel_table is not None,
               "images": digest(row.data for row in rows)}
        held = self.cached("decoded images", key, lambda: self._decode(processor, rows, param=param),
                           dump=lambda pixels: {"pixels": pixels}, restore=lambda parts: torch.from_numpy(parts["pixels"]))
        self._check_shape(held.shape[1:], where=f"{param}: {rows[0].where}")
        return list(held.unbind(0))

    def _decode(self, processor: Any, rows: list[reader.ImageRow], *, param: str) -> torch.Tensor:
        """(N, C, H, W): every image decoded and processed, a chunk at a time to bound the peak memory."""
        held: torch.Tensor | None = None
        uint8 = self.pixel_table is not None
        for start in range(0, len(rows), ENCODE_CHUNK):
            chunk = rows[start : start + ENCODE_CHUNK]
            images = [reader.load_rgb(row, param=param) for row in chunk]
            outputs = processor(images=images, **(VALUES_OFF if uint8 else {}))["pixel_values"]
            for i, (row, values) in enumerate(zip(chunk, outputs), start):
                values = np.asarray(values)
                self._check_shape(values.shape, where=f"{param}: {row.where}")
                if held is None:
                    held = torch.empty((len(rows), *values.shape), dtype=torch.uint8 if uint8 else torch.float32)
                held[i].numpy()[...] = _quantised(values) if uint8 else values  # any strides (BGR flips)
        return held

    def _check_shape(self, shape: torch.Size, *, where: str) -> None:
        if self.image_shape is None:
            self.image_shape = tuple(shape)
        elif tuple(shape) != self.image_shape:
            raise EngineError(
                f"The image processor makes inputs of different sizes ({where} is {tuple(shape)}, "
                f"earlier ones {self.image_shape}); set config.image_size for square inputs.",
                param="config.image_size",
            )

    # --- model -----------------------------------------------------------------------------

    def build_model(self, source: str, data: TaskData, processor: Any) -> torch.nn.Module:
        """AutoModelForImageClassification in fp32 with a fresh head for data.labels, then
        config.head and config.dropout.classifier applied (core.heads).

        A ViT-like model given inputs of another size than it was trained at (config.image_size)
        interpolates its position embeddings; inference with the exported model must pass
        interpolate_pos_encoding=True as well.

        Raises:
            ModelError: not found, not safetensors, or not an image-classification architecture.
        """
        labels = data.labels or []
        model = load_classifier(source, labels=labels, auto_class="AutoModelForImageClassification")
        self.forward_kwargs = _forward_kwargs(model, self.image_shape)
        replace_head(model, self.config.head, num_outputs=len(labels),
                     classifier_dropout=self.config.dropout.classifier)
        return model

    def collate(
        self,
        split: Split,
        indices: list[int],
        *,
        rng: np.random.Generator | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """{"pixel_values": (B, C, H, W) float32 model inputs, "labels": (B,)}; training batches (rng
        given) augmented when config.augmentation.image is on. Images need no padding.

        Only the batch is converted: held uint8 pixels become the processor's floats through
        self.pixel_table; augmentation runs on the batch in [0, 1] pixel space (value / 255, or the
        held float32 inputs mapped back through black and span) and maps the result to model inputs."""
        pixels = torch.stack([split.features["pixel_values"][i] for i in indices])
        uint8 = pixels.dtype == torch.uint8
        if rng is not None and self.augmenter is not None:
            images = pixels.float() / 255 if uint8 else (pixels - self.black) / self.span
            pixel_values = self.augmenter(images, rng) * self.span + self.black
        else:
            pixel_values = _look_up(self.pixel_table, pixels) if uint8 else pixels
        labels = torch.tensor([split.targets[i] for i in indices], dtype=torch.long)
        return {"pixel_values": pixel_values, "labels": labels, **split.weight_tensor(indices)}

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Summed cross-entropy (label smoothing, class weights) and the softmax probabilities.

        With class weights each example's loss is scaled by its class's weight; the engine then
        divides by the number of examples (torch's weighted "mean" would divide by the weights' sum),
        or by the sum of the examples' own weights (config.weight_column). Evaluation uses the same
        loss, so training and validation losses compare.
        """
        logits = model(pixel_values=batch["pixel_values"], **self.forward_kwargs).logits.float()
        weights = None if self.weights is None else self.weights.to(logits.device)
        loss = F.cross_entropy(logits, batch["labels"], weight=weights, reduction="none",
                               label_smoothing=self.config.loss.label_smoothing)
        return weighted_sum(loss, batch), logits.softmax(-1).detach().cpu()

    def compute_metrics(
        self, predictions: list[Any], targets: list[Any], *, loss: float, report: bool
    ) -> dict[str, Any]:
        probabilities = torch.cat(predictions).numpy()
        target = torch.cat(targets).numpy()
        preds = probabilities.argmax(-1)
        if report:
            return M.classification_report(target, preds, label_names=self.labels, loss=loss,
                                           probabilities=probabilities)
        return M.classification_metrics(target, preds, loss=loss)

    def trained_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """0: images have no tokens, and OpenAI's trained_tokens counts tokens only."""
        return 0


# ---------------------------------------------------------------------------------------------
# Processors


def pixel_table(processor: Any) -> torch.Tensor | None:
    """What `processor` makes of each pixel value 0..255 of each channel: a (C, 256) float32 table,
    or None when its value steps cannot be switched off apart from its resize and crop.

    An image processor resizes and crops first, then rescales and normalises each value of each
    channel on its own (BaseImageProcessor's order). So the model input of an image is the table
    looked up at the processor's uint8 resized-and-cropped pixels: the same float32, computed by the
    processor itself, not re-derived from its flags (which differ between processors: EfficientNet's
    offset, do_normalize off ...). Measured on a 16 x 16 grey probe holding every value once, run
    without resize and crop; None when the probe does not come back unchanged with rescale and
    normalisation off (EfficientNet's include_top still divides by the std).
    """
    from PIL import Image

    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    probe = [Image.fromarray(levels).convert("RGB")]
    no_geometry = {"do_resize": False, "do_center_crop": False}
    try:
        raw = np.asarray(processor(images=probe, **no_geometry, **VALUES_OFF)["pixel_values"][0])
        full = np.asarray(processor(images=probe, **no_geometry)["pixel_values"][0], dtype=np.float32)
    except (TypeError, ValueError):  # a processor that refuses these switches
        return None
    if raw.ndim != 3 or raw.shape != full.shape or not np.array_equal(raw, np.broadcast_to(levels, raw.shape)):
        return None
    return torch.from_numpy(full.reshape(full.shape[0], 256).copy())


def _quantised(values: np.ndarray) -> np.ndarray:
    """A processor's resized-and-cropped pixels as uint8. Pillow resizes uint8 images in uint8, so
    this is a plain cast for every Pillow-backed processor; one that resized in float would land up
    to half a value step (0.5 / 255 before normalisation) off its own output."""
    if values.dtype == np.uint8:
        return values
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _look_up(table: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """table[c, pixels[b, c, h, w]] for a (B, C, H, W) uint8 batch: its model inputs, float32."""
    channels = table.shape[0]
    offsets = torch.arange(0, channels * 256, 256, dtype=torch.long).view(1, channels, 1, 1)
    return table.flatten()[pixels.long() + offsets]



def default_processor(side: int) -> Any:
    """A processor for a model folder without one: bilinear resize to side x side, rescale to
    [0, 1], normalise with the ImageNet mean/std (what timm and torchvision models expect)."""
    from transformers import ViTImageProcessorPil
    from transformers.image_utils import (
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
        PILImageResampling,
    )

    return ViTImageProcessorPil(
        do_resize=True, size={"height": side, "width": side}, resample=PILImageResampling.BILINEAR,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN), image_std=list(IMAGENET_DEFAULT_STD),
    )


def resize_processor(processor: Any, side: int) -> None:
    """Make `processor` produce side x side inputs, keeping its way of getting there: processors
    that resize the shortest edge and crop the centre (ResNet's, ConvNeXt's, CLIP's) keep doing
    that at the new size; the others resize to the square.

    Raises:
        EngineError: the processor still does not make side x side inputs (param config.image_size).
    """
    from PIL import Image

    crops = bool(getattr(processor, "do_center_crop", False)) and getattr(processor, "crop_size", None) is not None
    if _size_field(processor.size, "shortest_edge") and (crops or hasattr(processor, "crop_pct")):
        processor.size = {"shortest_edge": side}
        if crops:
            processor.crop_size = {"height": side, "width": side}
    else:
        processor.size = {"height": side, "width": side}
    probe = Image.new("RGB", (side * 2 + 3, side + 5))  # not square, to catch aspect-keeping resizes
    shape = tuple(np.asarray(processor(images=[probe])["pixel_values"][0]).shape[-2:])
    if shape != (side, side):
        raise EngineError(
            f"The model's image processor ({type(processor).__name__}) makes {shape[0]}x{shape[1]} inputs, "
            f"not {side}x{side}; leave config.image_size unset for this model.", param="config.image_size",
        )


def _size_field(size: Any, key: str) -> Any:
    """A field of a processor's size, which is a dict or transformers' SizeDict."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _config_image_size(folder: Path) -> int:
    """image_size from a model folder's config.json (ViT has one, ResNet not), else 224."""
    try:
        value = json.loads((folder / "config.json").read_text()).get("image_size")
    except (OSError, ValueError, AttributeError):
        return DEFAULT_IMAGE_SIZE
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    return int(value) if isinstance(value, int) and value > 0 else DEFAULT_IMAGE_SIZE


# ---------------------------------------------------------------------------------------------
# Model


def _forward_kwargs(model: torch.nn.Module, image_shape: tuple[int, ...] | None) -> dict[str, Any]:
    """interpolate_pos_encoding=True for a model with position embeddings (ViT, DeiT, DINOv2 ...)
    fed inputs of another size than its config's image_size; nothing otherwise."""
    trained = getattr(model.config, "image_size", None)
    if isinstance(trained, (list, tuple)):
        trained = tuple(trained)
    elif isinstance(trained, int):
        trained = (trained, trained)
    if image_shape is None or trained is None or tuple(image_shape[-2:]) == trained:
        return {}
    if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
        return {"interpolate_pos_encoding": True}
    return {}
