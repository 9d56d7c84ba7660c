"""image-classification: any AutoModelForImageClassification (ResNet, ViT, ConvNeXt ...) with a head.

Data comes from core.datasets.images (a zip of label folders, or Parquet with image bytes). Each
image is decoded to RGB and run through the model's image processor once, in prepare(): a split
holds float32 (C, H, W) tensors exactly as the processor makes them, so evaluation sees what
inference with the exported processor sees. That costs C x H x W x 4 bytes per image in memory
(0.6 MB at 224 x 224: 10,000 images take 6 GB). Training batches may then be augmented
(core.augment_image); validation and test batches never are. The loss is softmax cross-entropy,
with label smoothing and class weights as for single-label text classification.
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
from core.adapters.base import Split, TaskAdapter, TaskData, class_weights
from core.augment_image import ImageAugmenter, is_identity, processor_pixel_range
from core.datasets import ParsedFile
from core.datasets import images as reader
from core.errors import EngineError, ModelError
from core.heads import replace_head
from core.loading import check_model_source, load_classifier
from core.spec import LABEL_METRICS, Task

PROCESSOR_FILE = "preprocessor_config.json"
DEFAULT_IMAGE_SIZE = 224  # when neither config.image_size nor the model's config says
ENCODE_CHUNK = 16  # images decoded at a time in prepare(): 16 twelve-megapixel photos are ~0.6 GB


class ImageClassification(TaskAdapter):
    task = Task.IMAGE_CLASSIFICATION

    def __init__(self, spec):
        super().__init__(spec)
        self.labels: list[str] = []
        self.weights: torch.Tensor | None = None  # class weights, in class-id order
        self.augmenter: ImageAugmenter | None = None  # built by prepare() when augmentation is on
        self.forward_kwargs: dict[str, Any] = {}  # set by build_model()
        self.image_shape: tuple[int, ...] | None = None  # (C, H, W) of the prepared inputs

    @property
    def metrics(self) -> dict[str, bool]:
        return LABEL_METRICS

    # --- data ------------------------------------------------------------------------------

    def load_processor(self, source: str) -> Any:
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
            processor = AutoImageProcessor.from_pretrained(str(location), backend="pil", trust_remote_code=False)
        except OSError as e:
            code = "invalid_model" if isinstance(location, Path) else "model_not_found"
            raise ModelError(f"Cannot load the image processor of {source!r}: {e}", param="model", code=code) from None
        except (ValueError, KeyError, TypeError) as e:
            raise ModelError(f"Cannot load the image processor of {source!r}: {e}", param="model") from None
        if side is not None:
            resize_processor(processor, side)
        return processor

    def prepare_parsed(self, parsed: dict[str, ParsedFile], processor: Any) -> TaskData:
        """Decode and process every checked image once (core.datasets.images read and checked them).

        Raises:
            DataError: an image whose pixels fail to decode.
            EngineError: images the processor makes in different sizes (param config.image_size);
                class_weights naming unknown labels.
        """
        train = parsed["training_file"].summary
        self.labels = list(train.labels or [])
        self.weights = class_weights(self.labels, train.label_counts, self.config.loss.class_weights)
        ids = {label: i for i, label in enumerate(self.labels)}

        def encode(param: str, rows: list[reader.ImageRow]) -> Split:
            pixels = self._encode(processor, rows, param=param)
            return Split(features={"pixel_values": pixels}, targets=[ids[row.label] for row in rows],
                         lengths=[1] * len(rows))

        data = TaskData.of(parsed, encode, labels=self.labels)
        augmentation = self.config.augmentation.image
        if not is_identity(augmentation):
            black, white = processor_pixel_range(processor)
            self.augmenter = ImageAugmenter(augmentation, size=self.image_shape[-2:], black=black, white=white)
        return data

    def _encode(self, processor: Any, rows: list[reader.ImageRow], *, param: str) -> list[torch.Tensor]:
        """Processed (C, H, W) float32 tensors of `rows`, a chunk at a time to bound the peak memory."""
        tensors: list[torch.Tensor] = []
        for start in range(0, len(rows), ENCODE_CHUNK):
            chunk = rows[start : start + ENCODE_CHUNK]
            images = [reader.load_rgb(row, param=param) for row in chunk]
            for row, values in zip(chunk, processor(images=images)["pixel_values"]):
                tensor = torch.as_tensor(np.asarray(values), dtype=torch.float32)
                self._check_shape(tensor.shape, where=f"{param}: {row.where}")
                tensors.append(tensor)
        return tensors

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
        """{"pixel_values": (B, C, H, W), "labels": (B,)}; training batches (rng given) augmented
        when config.augmentation.image is on. Images need no padding."""
        pixel_values = torch.stack([split.features["pixel_values"][i] for i in indices])
        if rng is not None and self.augmenter is not None:
            pixel_values = self.augmenter(pixel_values, rng)
        labels = torch.tensor([split.targets[i] for i in indices], dtype=torch.long)
        return {"pixel_values": pixel_values, "labels": labels}

    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Summed cross-entropy (label smoothing, class weights) and the softmax probabilities.

        With class weights each example's loss is scaled by its class's weight; the engine then
        divides by the number of examples (torch's weighted "mean" would divide by the weights' sum).
        Evaluation uses the same loss, so training and validation losses compare.
        """
        logits = model(pixel_values=batch["pixel_values"], **self.forward_kwargs).logits.float()
        weights = None if self.weights is None else self.weights.to(logits.device)
        loss = F.cross_entropy(logits, batch["labels"], weight=weights, reduction="sum",
                               label_smoothing=self.config.loss.label_smoothing)
        return loss, logits.softmax(-1).detach().cpu()

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


def default_processor(side: int) -> Any:
    """A processor for a model folder without one: bilinear resize to side x side, rescale to
    [0, 1], normalise with the ImageNet mean/std (what timm and torchvision models expect)."""
    from transformers import ViTImageProcessorPil
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

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
