"""Augmented training from images decoded once: the fast path for classification's train split.

Decoding (PNG/JPEG → pixels) and converting to float is most of the per-image cost of an augmented epoch on a small
model, and it is the same work every epoch. So the train split's images are decoded once, in threads, into one
uint8 buffer (CHW per image), downscaled only as far as the random crop allows without upsampling; each epoch then
crops, resizes and flips uint8 tensors (torchvision v2, drawing from the same RNG as the PIL path, so runs stay
seeded and resumable), and the batch is converted to float and normalised at once, on the device
(`normalize_uint8`): 4x less to copy to a GPU, no per-image float work on the CPU.

A split is cached only when its decoded pixels fit in `max_mb` (known from the image headers, before decoding);
otherwise the per-epoch path runs as before. The buffer is one memory-mapped file per node, shared by the local ranks
and their DataLoader workers.
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

from hftl.modeling import ensure_rgb
from hftl.system import cores_per_local_process

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
    """Images as one uint8 buffer; `images[i]` is a (3, H, W) uint8 tensor viewing it."""

    def __init__(self, buffer: np.ndarray, offsets: np.ndarray, shapes: np.ndarray):
        self.buffer, self.offsets, self.shapes = buffer, offsets, shapes

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> torch.Tensor:
        height, width = (int(v) for v in self.shapes[index])
        start = int(self.offsets[index])
        return torch.from_numpy(self.buffer[start : start + 3 * height * width]).view(3, height, width)

    @property
    def megabytes(self) -> float:
        return self.buffer.nbytes / 2**20


def _open(item) -> Image.Image:
    return Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"])


def _header(item) -> tuple[int, int, bool, bool]:
    """(width, height) as datasets shows the image (EXIF orientation applied), turned, swapped."""
    with _open(item) as image:
        orientation = image.getexif().get(ExifTags.Base.Orientation)
        width, height = image.size
    swapped = orientation in (5, 6, 7, 8)  # quarter turns swap the sides
    return (height, width, True, True) if swapped else (width, height, orientation is not None, False)


def _safe_header(item):
    try:
        return _header(item)
    except (OSError, ValueError, TypeError, SyntaxError):
        return None


def decode_images(dataset, image_column: str, min_area: int, max_mb: float):
    """Decodes `dataset[image_column]` into a `DecodedImages`, or returns None when the pixels would not fit in
    `max_mb` (decided from the headers) or the column holds no encoded images.

    One copy per node: the local main process decodes into a file that every local rank maps (and the DataLoader
    workers they fork inherit), so `max_mb` counts the node. The file is unlinked once all ranks have mapped it: its
    pages live as long as the mappings, and nothing is left on disk. A sample of the headers decides first whether
    the split can fit at all, so a split far over the cap costs nothing here however many rows it has."""
    if max_mb <= 0 or not len(dataset) or not isinstance(dataset.features.get(image_column), ImageFeature):
        return None
    # one batch of encoded images in memory at a time: the files may be far larger than what is kept
    raw = dataset.select_columns([image_column]).cast_column(image_column, ImageFeature(decode=False))
    sample = raw.select(range(min(SAMPLE_ROWS, len(raw))))[image_column]
    try:
        mean = np.mean([3 * math.prod(stored_size(*_header(item)[:2], min_area)) for item in sample])
    except (OSError, ValueError, TypeError, SyntaxError):  # an unreadable image (a large split is checked as read)
        return None
    if mean * len(raw) / 2**20 > max_mb * 1.25:  # clearly over: not worth reading every header to be sure
        return None
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    name = [uuid.uuid4().hex]
    if state.num_processes > 1:
        broadcast_object_list(name)  # every rank must open the file its node's main process writes
    path = Path(tempfile.gettempdir()) / f"hftl-decoded-{name[0]}"
    with state.local_main_process_first():
        if state.is_local_main_process:
            _write(raw, image_column, min_area, max_mb, path)
        images = _map(path)
    state.wait_for_everyone()
    if state.is_local_main_process:
        for suffix in (".u8", ".npz"):
            path.with_suffix(suffix).unlink(missing_ok=True)
    return images


def _write(raw, image_column: str, min_area: int, max_mb: float, path: Path) -> None:
    """Decodes into `path`.u8 and writes the layout to `path`.npz last (the marker that the file is complete); only
    the layout, with no rows, when the pixels would not fit in `max_mb`."""
    # the other local ranks wait meanwhile: this process may use the node's cores
    threads = cores_per_local_process(local_processes=1)
    with ThreadPoolExecutor(threads) as pool:
        headers = [h for batch in raw.iter(batch_size=256) for h in pool.map(_safe_header, batch[image_column])]
    if None in headers:  # an unreadable image: the per-epoch path reads the split and skips it
        np.savez(path.with_suffix(".npz"), offsets=np.zeros(0, np.int64), shapes=np.zeros((0, 2), np.int32))
        return
    sizes = [stored_size(w, h, min_area) for w, h, _, _ in headers]
    lengths = np.array([3 * w * h for w, h in sizes], dtype=np.int64)
    if lengths.sum() / 2**20 > max_mb:
        np.savez(path.with_suffix(".npz"), offsets=np.zeros(0, np.int64), shapes=np.zeros((0, 2), np.int32))
        return
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    buffer = np.memmap(path.with_suffix(".u8"), dtype=np.uint8, mode="w+", shape=(max(1, int(lengths.sum())),))

    def decode(index: int, item: dict) -> None:
        width, height = sizes[index]
        turned, swapped = headers[index][2:]
        with _open(item) as image:
            if image.size[0] * image.size[1] > width * height:  # JPEG: decode at a reduced scale straight away
                image.draft(image.mode, (height, width) if swapped else (width, height))
            if turned:  # as datasets' Image feature decodes it
                image = ImageOps.exif_transpose(image)
            image = ensure_rgb(image)
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
            pixels = np.asarray(image).transpose(2, 0, 1)
        buffer[offsets[index] : offsets[index] + lengths[index]] = pixels.reshape(-1)

    # PIL releases the GIL while decoding and resizing
    with ThreadPoolExecutor(threads) as pool:
        start = 0
        for batch in raw.iter(batch_size=256):
            column = batch[image_column]
            list(pool.map(decode, range(start, start + len(column)), column))
            start += len(column)
    buffer.flush()
    shapes = np.array([(h, w) for w, h in sizes], dtype=np.int32)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, offsets=offsets, shapes=shapes)
    os.replace(tmp, path.with_suffix(".npz"))


def _map(path: Path) -> DecodedImages | None:
    layout = np.load(path.with_suffix(".npz"))
    offsets, shapes = layout["offsets"], layout["shapes"]
    if not len(offsets):
        return None
    # copy-on-write: pages stay shared with every rank and worker (nothing writes them); torch needs a writable view
    buffer = np.memmap(path.with_suffix(".u8"), dtype=np.uint8, mode="c")
    return DecodedImages(buffer, offsets, shapes)


class AugmentedDecodedSplit(torch.utils.data.Dataset):
    """Items {"pixel_values": augmented uint8 (3, size, size), "labels": int, "pixel_steps": PixelSteps} from decoded
    images: each item names the steps that turn it into model input (`hftl.pixels`; the task's forward applies them
    to the batch on the device), so nothing else has to remember them."""

    def __init__(self, images: DecodedImages, labels: list[int], transform, pixel_steps):
        self.images, self.labels, self.transform, self.pixel_steps = images, labels, transform, pixel_steps

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        pixels = self.transform(self.images[index])
        return {"pixel_values": pixels, "labels": self.labels[index], "pixel_steps": self.pixel_steps}


def normalize_uint8(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """(N, 3, H, W) uint8 → float32 normalised with the processor's mean/std, for the whole batch at once. The same
    operations, in the same order, as torchvision's ToDtype(scale=True) + Normalize on the per-epoch path, so both
    paths give bit-identical tensors from identical pixels (one fused multiply-add would round differently)."""
    mean = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return pixels.float().mul_(1.0 / 255).sub_(mean).div_(std)
