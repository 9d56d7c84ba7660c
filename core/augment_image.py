"""Random image transforms of training batches (config.augmentation.image), with kornia.

The transforms are the usual torchvision recipe, in its order: random resized crop, horizontal
flip, rotation, color jitter. They act on whole batches of images the image processor has already
resized (and cropped), with pixel values in [0, 1] (color jitter needs that range): the adapter
hands in its held uint8 pixels / 255 and normalises the result afterwards, through the per-channel
affine map `processor_pixel_range` measures. Rotated-in corners are black.

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
    from each processor's own flags would not. An augmented batch in [0, 1] becomes model inputs as
    `images * (white - black) + black`.

    Raises:
        EngineError: the processor maps black and white to the same input, so augmented images
            would carry nothing (param config.augmentation.image).
    """
    from PIL import Image

    flat = [Image.new("RGB", (64, 64), (v, v, v)) for v in (0, 255)]
    values = processor(images=flat, return_tensors="pt")["pixel_values"].float()
    black, white = values[0].mean(dim=(1, 2)), values[1].mean(dim=(1, 2))
    if bool((white == black).any()):
        raise EngineError(
            "The model's image processor maps black and white to the same input; images cannot be augmented.",
            param="config.augmentation.image",
        )
    return black[:, None, None], white[:, None, None]


class ImageAugmenter:
    """Applies config's transforms to (B, C, H, W) images in [0, 1], drawing only from a given rng.

    Args:
        config: the transforms and their strengths.
        size: (H, W) of the images; the random resized crop resizes back to it.
    """

    def __init__(self, config: ImageAugmentationConfig, *, size: tuple[int, int]):
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

    def __call__(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """The augmented batch, in [0, 1] (a new tensor); `images` unchanged when no transform is on."""
        if len(self.transforms) == 0:
            return images
        seed = int(rng.integers(2**63))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transforms(images)
