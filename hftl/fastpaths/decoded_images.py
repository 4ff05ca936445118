"""Augmented training from images decoded once: the fast path for classification's train split.

Decoding (PNG/JPEG → pixels) and converting to float is most of the per-image cost of an augmented epoch on a small
model, and it is the same work every epoch. So the train split's images are decoded once, in threads, into one
uint8 buffer (CHW per image), downscaled only as far as the random crop allows without upsampling; each epoch then
crops, resizes and flips uint8 tensors (torchvision v2, drawing from the same RNG as the PIL path, so runs stay
seeded and resumable), and the batch is converted to float and normalised at once, on the device
(`normalize_uint8`): 4x less to copy to a GPU, no per-image float work on the CPU.

A split is cached only when its decoded pixels fit in `max_mb` (estimated from a sample of the image headers);
otherwise the per-epoch path runs as before. Nothing is decoded before training: the first epoch decodes each image
where it is read and keeps it, later epochs read what it kept. The buffer is one memory-mapped file per node, shared
by the local ranks and their DataLoader workers.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from datasets import Image as ImageFeature
from PIL import ExifTags, Image, ImageOps

from hftl.image_check import UNREADABLE, describe
from hftl.log import get_logger
from hftl.modeling import ensure_rgb
from hftl.system import cores_per_local_process

logger = get_logger(__name__)

# RandomResizedCrop's default aspect-ratio range; its narrowest crop side is sqrt(area * scale * 3/4)
MIN_ASPECT = 3 / 4
SAMPLE_ROWS = 256  # headers read to estimate a split's decoded size before reading them all


def stored_size(width: int, height: int, min_area: int) -> tuple[int, int]:
    """The size an image is kept at: its own, or scaled down to about `min_area` pixels when larger."""
    if width * height <= min_area:
        return width, height
    scale = math.sqrt(min_area / (width * height))
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def crop_min_area(size: int, crop_scale_min: float) -> int:
    """Fewest stored pixels for which the smallest random crop (area fraction `crop_scale_min`, aspect 3:4) still
    has at least `size` pixels on its short side, i.e. is never upsampled more than on the full-size original."""
    return math.ceil(size * size / (max(crop_scale_min, 1e-3) * MIN_ASPECT))


class DecodedImages:
    """The train split's images as one uint8 buffer, filled as they are first read; `images[i]` is a (3, H, W) uint8
    tensor viewing it, or None for an image that cannot be decoded.

    Row i has a slot of `slot` bytes at i * slot (the largest decoded size in a sample of the headers), so nothing
    has to be read before the first step: the first epoch decodes each image where it is read (in threads, batch by
    batch: `fill`) and writes it into the slot; later epochs, other local ranks and DataLoader workers read the
    slot. `shapes[i]` says what row i holds: (0, 0) not yet decoded, (-1, -1) unreadable, else (H, W), written after
    the pixels. The rare image larger than its slot is decoded on every read instead."""

    def __init__(self, path: Path, rows: int, slot: int, raw, image_column: str, min_area: int):
        self.slot, self.raw, self.image_column, self.min_area = slot, raw, image_column, min_area
        # reads go through a copy-on-write view (torch needs a writable array, and nothing may write the shared
        # pages by accident); fills through a shared mapping of the same file, which Linux shows in the other at once
        self.buffer = np.memmap(path.with_suffix(".u8"), dtype=np.uint8, mode="c")
        self._writer = np.memmap(path.with_suffix(".u8"), dtype=np.uint8, mode="r+")
        self.shapes = np.memmap(path.with_suffix(".shapes"), dtype=np.int32, mode="r+", shape=(rows, 2))

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> torch.Tensor | None:
        height, width = (int(v) for v in self.shapes[index])
        if height == 0:
            pixels = self._decode(index)
            return None if pixels is None else torch.from_numpy(pixels)
        if height < 0:
            return None
        start = index * self.slot
        return torch.from_numpy(self.buffer[start : start + 3 * height * width]).view(3, height, width)

    def fill(self, indices) -> None:
        """Decodes the rows of `indices` not decoded yet, in threads (PIL releases the GIL while decoding)."""
        missing = [int(i) for i in indices if self.shapes[i][0] == 0]
        if len(missing) > 1:
            with ThreadPoolExecutor(min(len(missing), cores_per_local_process())) as pool:
                list(pool.map(self._decode, missing))

    def _decode(self, index: int) -> np.ndarray | None:
        item = self.raw[index][self.image_column]
        try:
            pixels = decode_one(item, self.min_area)
        except (OSError, ValueError, TypeError, SyntaxError):
            self.shapes[index] = (-1, -1)
            logger.info(f"skipped an unreadable image: {describe(item)}", main_process_only=False)
            return None
        if pixels.size <= self.slot:
            start = index * self.slot
            self._writer[start : start + pixels.size] = pixels.reshape(-1)
            self.shapes[index] = pixels.shape[1:]  # last: the row is complete
        return pixels

    @property
    def megabytes(self) -> float:
        return self.buffer.nbytes / 2**20


def _open(item) -> Image.Image:
    return Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"])


def _header(item) -> tuple[int, int]:
    """(width, height) as datasets shows the image (EXIF orientation applied)."""
    with _open(item) as image:
        orientation = image.getexif().get(ExifTags.Base.Orientation)
        width, height = image.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)  # quarter turns swap the sides


def decode_one(item, min_area: int) -> np.ndarray:
    """(3, H, W) uint8 pixels of an encoded image as datasets decodes it, kept at `stored_size`."""
    with _open(item) as image:
        orientation = image.getexif().get(ExifTags.Base.Orientation)
        swapped = orientation in (5, 6, 7, 8)  # quarter turns swap the sides
        shown = image.size[::-1] if swapped else image.size
        width, height = stored_size(*shown, min_area)
        if image.size[0] * image.size[1] > width * height:  # JPEG: decode at a reduced scale straight away
            image.draft(image.mode, (height, width) if swapped else (width, height))
        if orientation is not None:  # as datasets' Image feature decodes it
            image = ImageOps.exif_transpose(image)
        image = ensure_rgb(image)
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
        return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))


def decode_images(dataset, image_column: str, min_area: int, max_mb: float):
    """A `DecodedImages` over `dataset[image_column]`, or None when the pixels would not fit in `max_mb` or the column
    holds no encoded images. Reads only a sample of the headers: the cost before training does not grow with the
    rows.

    One copy per node: the local main process creates the (sparse) file, every local rank maps it (and the
    DataLoader workers they fork inherit the mappings), so `max_mb` counts the node and a row decoded by any of them
    is there for all. The file is unlinked once all ranks have mapped it: its pages live as long as the mappings,
    and nothing is left on disk."""
    if max_mb <= 0 or not len(dataset) or not isinstance(dataset.features.get(image_column), ImageFeature):
        return None
    # encoded images are read row by row: the files may be far larger than what is kept
    raw = dataset.select_columns([image_column]).cast_column(image_column, ImageFeature(decode=False))
    sample = raw.select(range(min(SAMPLE_ROWS, len(raw))))[image_column]
    try:
        slot = max(3 * math.prod(stored_size(*_header(item), min_area)) for item in sample)
    except (OSError, ValueError, TypeError, SyntaxError):  # an unreadable image in the sample: the per-epoch path
        return None
    if slot * len(raw) / 2**20 > max_mb:
        return None
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    name = [uuid.uuid4().hex]
    if state.num_processes > 1:
        broadcast_object_list(name)  # every rank must open the file its node's main process creates
    path = Path(tempfile.gettempdir()) / f"hftl-decoded-{name[0]}"
    with state.local_main_process_first():
        if state.is_local_main_process:
            _write(path, len(raw), slot)
        images = DecodedImages(path, len(raw), slot, raw, image_column, min_area)
    state.wait_for_everyone()
    if state.is_local_main_process:
        for suffix in (".u8", ".shapes"):
            path.with_suffix(suffix).unlink(missing_ok=True)
    return images


def _write(path: Path, rows: int, slot: int) -> None:
    """Creates the node's files: pixels and shapes, sparse (no page is stored until a row is decoded into it)."""
    for suffix, size in ((".u8", rows * slot), (".shapes", rows * 8)):
        tmp = path.with_suffix(suffix + ".tmp")
        with open(tmp, "wb") as f:
            f.truncate(max(1, size))
        os.replace(tmp, path.with_suffix(suffix))


class AugmentedDecodedSplit(torch.utils.data.Dataset):
    """Items {"pixel_values": augmented uint8 (3, size, size), "labels": int, "pixel_steps": PixelSteps} from decoded
    images: each item names the steps that turn it into model input (`hftl.pixels`; the task's forward applies them
    to the batch on the device), so nothing else has to remember them."""

    def __init__(self, images: DecodedImages, labels: list[int], transform, pixel_steps):
        self.images, self.labels, self.transform, self.pixel_steps = images, labels, transform, pixel_steps

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = self.images[index]
        if image is None:  # unreadable: an item naming it, which collate_readable drops and reports
            return {UNREADABLE: describe(self.images.raw[index][self.images.image_column])}
        pixels = self.transform(image)
        return {"pixel_values": pixels, "labels": int(self.labels[index]), "pixel_steps": self.pixel_steps}

    def prefetch(self, indices) -> None:
        self.images.fill(indices)


def normalize_uint8(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """(N, 3, H, W) uint8 → float32 normalised with the processor's mean/std, for the whole batch at once. The same
    operations, in the same order, as torchvision's ToDtype(scale=True) + Normalize on the per-epoch path, so both
    paths give bit-identical tensors from identical pixels (one fused multiply-add would round differently)."""
    mean = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return pixels.float().mul_(1.0 / 255).sub_(mean).div_(std)
