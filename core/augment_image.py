"""Random image transforms of training batches (config.augmentation.image), with kornia.

The transforms are the usual torchvision recipe, in its order: random resized crop, horizontal
flip, rotation, color jitter. They act on whole batches of model inputs, i.e. images the image
processor has already resized and normalised. Color jitter needs pixels in [0, 1], so the batch is
mapped back to [0, 1] first and re-normalised afterwards; every transform runs in that space, and
rotated-in corners are black.

Every random draw comes from the batch's own numpy Generator (kornia samples from torch's global
generator, which is forked and seeded from it), so the same batch position gives the same
augmented batch, in a resumed run too, and nothing else's randomness is disturbed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from core.errors import EngineError
from core.spec import ImageAugmentationConfig


def is_identity(config: ImageAugmentationConfig | None) -> bool:
    """Whether `config` changes nothing (None, or every transform off / at probability 0)."""
    return config is None or not (
        config.random_resized_crop is not None or config.horizontal_flip > 0 or config.rotation > 0
        or config.brightness > 0 or config.contrast > 0 or config.saturation > 0 or config.hue > 0
    )


def processor_pixel_range(processor: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """What a black and a white pixel become in the model's input, per channel: shapes (C, 1, 1).

    Every Hugging Face image processor maps pixel values to model inputs by a per-channel affine map
    (rescale, EfficientNet's offset, normalise with mean/std), and resizing or cropping a flat image
    leaves it flat. Measuring the map on two flat images holds for all of them, where re-deriving it
    from each processor's own flags would not.
    """
    from PIL import Image

    flat = [Image.new("RGB", (64, 64), (v, v, v)) for v in (0, 255)]
    values = processor(images=flat, return_tensors="pt")["pixel_values"].float()
    black, white = values[0].mean(dim=(1, 2)), values[1].mean(dim=(1, 2))
    return black[:, None, None], white[:, None, None]


class ImageAugmenter:
    """Applies config's transforms to (B, C, H, W) model inputs, drawing only from a given rng.

    Args:
        config: the transforms and their strengths.
        size: (H, W) of the inputs; the random resized crop resizes back to it.
        black, white: `processor_pixel_range` of the processor that made the inputs.

    Raises:
        EngineError: a transform is on but the processor maps black and white to the same input
            (param config.augmentation.image).
    """

    def __init__(
        self, config: ImageAugmentationConfig, *, size: tuple[int, int], black: torch.Tensor, white: torch.Tensor
    ):
        import kornia.augmentation as K  # imported by image jobs only

        steps: list[torch.nn.Module] = []
        if config.random_resized_crop is not None:
            steps.append(K.RandomResizedCrop(size, scale=(config.random_resized_crop, 1.0), p=1.0))
        if config.horizontal_flip > 0:
            steps.append(K.RandomHorizontalFlip(p=config.horizontal_flip))
        if config.rotation > 0:
            steps.append(K.RandomRotation(degrees=config.rotation, p=1.0))
        if max(config.brightness, config.contrast, config.saturation, config.hue) > 0:
            steps.append(K.ColorJitter(config.brightness, config.contrast, config.saturation, config.hue, p=1.0))
        self.transforms = torch.nn.Sequential(*steps)
        self.black, self.span = black, white - black
        if steps and bool((self.span == 0).any()):
            raise EngineError(
                "The model's image processor maps black and white to the same input; images cannot be augmented.",
                param="config.augmentation.image",
            )

    def __call__(self, pixel_values: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """The augmented batch (a new tensor); `pixel_values` unchanged when no transform is on."""
        if len(self.transforms) == 0:
            return pixel_values
        seed = int(rng.integers(2**63))
        images = (pixel_values - self.black) / self.span
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            images = self.transforms(images)
        return images * self.span + self.black
