"""The model's pixel values, computed the way its own image processor computes them, for the augmented train paths.

Evaluation and `pipeline()` run the saved image processor itself. The augmented training paths crop and flip
first, so they cannot call it as is; they apply the processor's value steps to uint8 pixels instead. Those steps
are read from the processor's settings (rescale and its offset, normalisation, EfficientNet's `include_top`, which
divides by the std a second time, MobileViT's BGR channel flip; timm's mean and std) and then checked on a probe
image against the processor itself: a processor whose output they do not reproduce (a setting not understood
here) is used directly instead, and the run says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hftl.modeling import _is_timm, ensure_rgb


@dataclass(frozen=True)
class PixelSteps:
    """uint8 (…, 3, H, W) → float32 model input: × scale, − offset, (− mean) / std, / extra_std, channel flip."""

    scale: float | None = 1 / 255
    offset: float = 0.0
    mean: tuple | None = None
    std: tuple | None = None
    extra_std: tuple | None = None
    flip_channels: bool = False

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.as_subclass(torch.Tensor).to(torch.float32, copy=True)
        shape = (3, 1, 1)

        def per_channel(values):
            return torch.tensor(values, dtype=torch.float32, device=x.device).view(shape)

        if self.scale is not None:
            x = x.mul_(self.scale)
        if self.offset:
            x = x.sub_(self.offset)
        if self.mean is not None:
            x = x.sub_(per_channel(self.mean)).div_(per_channel(self.std))
        if self.extra_std is not None:
            x = x.div_(per_channel(self.extra_std))
        if self.flip_channels:
            x = x.flip(-3)
        return x


def read_pixel_steps(processor) -> PixelSteps:
    """The value steps the processor's settings describe (not yet checked: see `pixel_steps`)."""
    if _is_timm(processor):  # timm's eval transforms: ToTensor (÷255) and Normalize, RGB
        config = processor.data_config
        return PixelSteps(1 / 255, 0.0, tuple(config["mean"]), tuple(config["std"]))
    get = lambda name, default=None: getattr(processor, name, default)  # noqa: E731
    normalize = bool(get("do_normalize", False))
    mean, std = (tuple(_three(get("image_mean"))), tuple(_three(get("image_std")))) if normalize else (None, None)
    return PixelSteps(
        scale=float(get("rescale_factor", 1 / 255)) if get("do_rescale", True) else None,
        offset=1.0 if get("rescale_offset", False) else 0.0,
        mean=mean,
        std=std,
        extra_std=std if normalize and get("include_top", False) else None,
        flip_channels=bool(get("do_flip_channel_order", False)),
    )


def processor_pixels(processor, images: list) -> torch.Tensor:
    """The processor's own output for images already at the input size: its resize and crop turned off (timm's
    transforms keep theirs, which leave an image of the input size as it is when crop_pct is 1)."""
    if _is_timm(processor):
        return processor(images, return_tensors="pt")["pixel_values"]
    return processor(images, do_resize=False, do_center_crop=False, return_tensors="pt")["pixel_values"]


def pixel_steps(processor, size: int) -> PixelSteps | None:
    """`read_pixel_steps`, when it reproduces the processor on a probe image of `size` pixels; else None."""
    import numpy as np
    from PIL import Image

    steps = read_pixel_steps(processor)
    if _is_timm(processor):
        return steps  # built from the same data_config timm's transforms are built from
    rng = np.random.default_rng(0)
    probe = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    try:
        expected = processor_pixels(processor, [ensure_rgb(Image.fromarray(probe))])[0]
    except (TypeError, ValueError):
        return None
    got = steps(torch.from_numpy(probe).permute(2, 0, 1))
    if got.shape != expected.shape or not torch.allclose(got, expected.float(), atol=1e-4, rtol=1e-4):
        return None
    return steps


def _three(values) -> list:
    values = list(values) if isinstance(values, list | tuple) else [values]
    return values * 3 if len(values) == 1 else values
