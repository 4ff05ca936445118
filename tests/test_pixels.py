"""Training sees the pixels evaluation and pipeline() see: the augmented path's value steps equal the processor's."""

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from PIL import Image

from hftl.config import DataArgs
from hftl.modeling import processor_input_size
from hftl.pixels import pixel_steps, processor_pixels
from hftl.tasks.classification.task import ClassificationTask

SIZE = 32


def _processor(family, tiny_timm_dir):
    import transformers as t

    if family == "timm":
        return t.AutoImageProcessor.from_pretrained(tiny_timm_dir)
    square = {"height": SIZE, "width": SIZE}
    return {
        "vit": lambda: t.ViTImageProcessor(size=square),
        "convnext": lambda: t.ConvNextImageProcessor(size={"shortest_edge": SIZE}),
        "mobilevit": lambda: t.MobileViTImageProcessor(size={"shortest_edge": SIZE}, crop_size=square),
        "efficientnet": lambda: t.EfficientNetImageProcessor(size=square),
    }[family]()


def _prepared_task(processor, images):
    """The classification task as the runner prepares it (augmenting), on a one-split dataset of `images`."""
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a"])})
    ds = Dataset.from_dict({"image": images, "label": [0] * len(images)}, features=features)
    task = ClassificationTask()
    task.image_column, task.label_column = "image", "label"
    prepared = task.prepare(DatasetDict({"train": ds}), processor, DataArgs(augment=True))
    return task, prepared


@pytest.mark.parametrize("family", ["vit", "convnext", "mobilevit", "efficientnet", "timm"])
def test_training_pixels_equal_the_processor_output(family, tiny_timm_dir):
    """MobileViT flips to BGR and does not normalise; EfficientNet's include_top divides by the std twice: the
    training path used to apply RGB Normalize(mean, std) to every model (a red image reached MobileViT as channel
    means [0.53, -0.66, -0.67] in training but [0.17, 0.17, 0.76] in evaluation)."""
    processor = _processor(family, tiny_timm_dir)
    rng = np.random.default_rng(1)
    images = [
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)),
        Image.new("RGB", (SIZE,) * 2, "red"),
    ]
    task, prepared = _prepared_task(processor, images)
    steps = pixel_steps(processor, processor_input_size(processor))  # what prepare and decoded_train_split use
    assert steps is not None, f"{family}: fell back to the processor"
    uint8 = torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1) for im in images])
    expected = processor_pixels(processor, images)
    # the decoded path (uint8 batches, through forward) and the per-epoch path both apply these steps
    torch.testing.assert_close(steps(uint8), expected.float(), atol=1e-4, rtol=1e-4)
    item = prepared["train"][0]["pixel_values"]
    assert item.shape == expected[0].shape and item.dtype == torch.float32
    if family == "mobilevit":
        red = steps(uint8[1:]).mean((0, 2, 3))
        assert red[2] > 0.9 and red[0] < 0.1  # red arrives in the last (BGR) channel, unnormalised


def test_a_processor_whose_steps_are_not_understood_is_called_itself(tiny_timm_dir):
    from transformers import ViTImageProcessor

    class Posterizing(ViTImageProcessor):  # a value step hftl does not know: the probe catches it
        def _preprocess(self, images, **kwargs):
            out = super()._preprocess(images, **kwargs)
            out["pixel_values"] = out["pixel_values"].round()
            return out

    processor = Posterizing(size={"height": SIZE, "width": SIZE})
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    with pytest.warns(UserWarning, match="Posterizing: its pixel steps are not understood"):
        task, prepared = _prepared_task(processor, [image])
    assert pixel_steps(processor, processor_input_size(processor)) is None
    pixels = prepared["train"][0]["pixel_values"]
    assert torch.equal(pixels, pixels.round())  # the processor's own output
