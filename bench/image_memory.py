"""Image dataset memory: what an image-classification job holds in memory once its data is prepared.

    .venv/bin/python bench/image_memory.py              # 10,000 images at 224 px, ~2 minutes on 2 cores
    .venv/bin/python bench/image_memory.py --n 2000 --size 224

Builds N synthetic RGB images (PIL, from numpy gradients with a random tilt, offset and a little
noise per image; (size + 32) px square, so the processor really resizes them) as PNGs in a zip of
10 label folders, then runs the image-classification adapter's data-building step (`prepare`: the
reader's checks, decode, the processor's resize, what a split holds) with core's default processor
(square resize to --size, ImageNet mean/std: what a model folder without a processor gets).

Prints for the training split:
- held: the bytes of the tensors it holds (each distinct storage once), per image, and against the
  two layouts: N x 3 x size x size uint8 pixels, and the processor's float32 output (4 bytes each);
- RSS growth of this process across `prepare` (psutil, after gc) and its peak while preparing
  (sampled every 20 ms): what the operating system sees, allocator slack and the zip's encoded
  bytes (held by the reader until prepare returns) included; and the growth left once glibc's
  malloc_trim has handed freed heap pages back.

Target: 10,000 images at 224 px held in under 2 GB. Run it from an older checkout (copy this file
into its bench/) to measure the layout it had.
"""

from __future__ import annotations

import argparse
import gc
import io
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.adapters.base import DataFiles
from core.adapters.image_classification import ImageClassification, default_processor
from core.spec import JobSpec

LABELS = 10
TARGET_BYTES = 2 * 10**9  # for 10,000 images at 224 px
GB = 10**9


def write_zip(path: Path, n: int, side: int, seed: int) -> int:
    """`n` side x side gradient PNGs in label folders 0..9 of a zip at `path`; returns the zip's size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:  # PNG is compressed already
        for i in range(n):
            tilt = rng.uniform(-1.5, 1.5, size=(2, 3)).astype(np.float32)
            offset = rng.uniform(0, 255, size=3).astype(np.float32)
            pixels = x[..., None] * tilt[0] + y[..., None] * tilt[1] + offset
            pixels += rng.normal(0, 4, size=(side, side, 1)).astype(np.float32)
            buffer = io.BytesIO()
            Image.fromarray(np.mod(pixels, 256).astype(np.uint8)).save(buffer, format="PNG", compress_level=1)
            archive.writestr(f"{i % LABELS}/{i:06d}.png", buffer.getvalue())
    return path.stat().st_size


def held_bytes(tensors) -> tuple[int, set]:
    """Bytes of the distinct storages behind `tensors` (views of one tensor count once), and their dtypes."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()), {str(t.dtype) for t in tensors}


class PeakRSS:
    """The largest RSS of this process seen while the block runs (sampled every 20 ms)."""

    def __init__(self):
        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def _malloc_trim() -> bool:
    """Ask glibc to return freed heap pages to the system; False where there is no glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="images (default 10,000)")
    parser.add_argument("--size", type=int, default=224, help="model input side in px (default 224)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        zip_path = Path(tmp) / "train.zip"
        zip_bytes = write_zip(zip_path, args.n, args.size + 32, args.seed)
        built = time.perf_counter() - started
        spec = JobSpec(model="bench", training_file="train.zip", task="image-classification")
        adapter = ImageClassification(spec)
        processor = default_processor(args.size)
        process = psutil.Process()
        gc.collect()
        before = process.memory_info().rss
        started = time.perf_counter()
        with PeakRSS() as peak:
            data = adapter.prepare(DataFiles(zip_path), processor)
        prepared = time.perf_counter() - started
        gc.collect()
        after = process.memory_info().rss
        trimmed = _malloc_trim() and process.memory_info().rss

    held, dtypes = held_bytes(data.train.features["pixel_values"])
    n, values = len(data.train), 3 * args.size * args.size
    print(f"{n:,} images, {args.size} px: zip {zip_bytes / GB:.3f} GB built in {built:.0f} s, prepared in {prepared:.0f} s")
    print(f"held by the training split: {held:,} bytes = {held / GB:.3f} GB ({held / n:,.0f} per image; {', '.join(sorted(dtypes))})")
    print(f"  uint8 pixels would be {n * values:,} bytes; the processor's float32 output {n * values * 4:,} "
          f"(held / float32 = {held / (n * values * 4):.3f})")
    print(f"RSS growth across prepare (after gc): {(after - before) / GB:.3f} GB; peak while preparing "
          f"{(peak.peak - before) / GB:.3f} GB above the start")
    if trimmed:
        print(f"  after malloc_trim (freed heap handed back, e.g. the zip's encoded bytes): "
              f"{(trimmed - before) / GB:.3f} GB")
    if args.n == 10_000 and args.size == 224:
        verdict = "meets" if held < TARGET_BYTES else "MISSES"
        print(f"target: 10,000 images at 224 px under {TARGET_BYTES / GB:.0f} GB held: {verdict}")


if __name__ == "__main__":
    main()
