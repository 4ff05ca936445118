"""A transformers UperNet whose encoder is a pretrained timm classification model.

The timm weights are copied into UperNet's `TimmBackbone` (a `features_only` timm model), so the saved folder is
self-contained: its config names only the timm architecture (no pretrained download on load) and its
model.safetensors holds every tensor. It loads with `pipeline("image-segmentation")` through
`SegformerImageProcessor`, as the Hub's UperNet checkpoints do.
"""

from __future__ import annotations


def upernet_from_timm(path: str, timm_config, id2label: dict, hidden_size: int, ignore_index: int):
    """`path` holds a `TimmWrapperForImageClassification` (e.g. the bundled hftl/efficientnet-lite0)."""
    from transformers import (
        SegformerImageProcessor,
        TimmBackboneConfig,
        UperNetConfig,
        UperNetForSemanticSegmentation,
    )

    from hftl.modeling import model_around_timm, timm_normalization

    architecture = timm_config.architecture
    id2label = {int(k): v for k, v in id2label.items()}
    levels = _feature_levels(architecture)
    config = UperNetConfig(
        backbone_config=TimmBackboneConfig(backbone=architecture, out_indices=levels),
        hidden_size=hidden_size,
        use_auxiliary_head=False,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        loss_ignore_index=ignore_index,
    )
    model = model_around_timm(
        UperNetForSemanticSegmentation, config, path, timm_config, lambda m: m.backbone._backbone
    )
    pretrained = dict(getattr(timm_config, "pretrained_cfg", None) or {})
    size = int((pretrained.get("input_size") or [3, 224, 224])[-1])
    mean, std = timm_normalization(timm_config)
    processor = SegformerImageProcessor(
        size={"height": size, "width": size}, image_mean=mean, image_std=std, do_reduce_labels=False
    )
    return model, processor


def _feature_levels(architecture: str) -> list[int]:
    """The last four feature levels (strides 4..32 for CNNs): what UperNet's pyramid expects."""
    from hftl.modeling import timm_feature_info

    count = len(timm_feature_info(architecture))
    if count < 2:
        raise ValueError(
            f"timm model {architecture!r} has {count} feature level(s); UperNet needs a multi-scale encoder."
        )
    return list(range(max(0, count - 4), count))
