"""A transformers UperNet whose encoder is a pretrained timm classification model.

The timm weights are copied into UperNet's `TimmBackbone` (a `features_only` timm model), so the saved folder is
self-contained: its config names only the timm architecture (no pretrained download on load) and its
model.safetensors holds every tensor. It loads with `pipeline("image-segmentation")` through
`SegformerImageProcessor`, as the Hub's UperNet checkpoints do.
"""

from __future__ import annotations

import torch


def upernet_from_timm(path: str, timm_config, id2label: dict, hidden_size: int, ignore_index: int):
    """`path` holds a `TimmWrapperForImageClassification` (e.g. the bundled hftl/efficientnet-lite0)."""
    from transformers import (
        SegformerImageProcessor,
        TimmBackboneConfig,
        TimmWrapperForImageClassification,
        UperNetConfig,
        UperNetForSemanticSegmentation,
    )

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
    model = UperNetForSemanticSegmentation(config)
    classifier = TimmWrapperForImageClassification.from_pretrained(path)
    _copy_encoder_weights(classifier.timm_model, model.backbone._backbone, architecture)
    pretrained = dict(getattr(timm_config, "pretrained_cfg", None) or {})
    size = int((pretrained.get("input_size") or [3, 224, 224])[-1])
    processor = SegformerImageProcessor(
        size={"height": size, "width": size},
        image_mean=list(pretrained.get("mean") or (0.485, 0.456, 0.406)),
        image_std=list(pretrained.get("std") or (0.229, 0.224, 0.225)),
        do_reduce_labels=False,
    )
    return model, processor


def _feature_levels(architecture: str) -> list[int]:
    """The last four feature levels (strides 4..32 for CNNs): what UperNet's pyramid expects."""
    import timm

    with torch.device("meta"):
        features = timm.create_model(architecture, pretrained=False, features_only=True)
    count = len(features.feature_info)
    if count < 2:
        raise ValueError(
            f"timm model {architecture!r} has {count} feature level(s); UperNet needs a multi-scale encoder."
        )
    return list(range(max(0, count - 4), count))


@torch.no_grad()
def _copy_encoder_weights(source: torch.nn.Module, target: torch.nn.Module, architecture: str) -> None:
    """Every encoder tensor must come from the classifier (same names, same shapes): a silent partial copy would
    train a randomly initialised encoder while claiming transfer."""
    weights = source.state_dict()
    wanted = target.state_dict()
    names = {key: _classifier_name(key, weights) for key in wanted}
    missing = [k for k, v in wanted.items() if names[k] not in weights or weights[names[k]].shape != v.shape]
    if missing:
        raise ValueError(f"Could not copy {architecture} weights into the UperNet encoder; unmatched: {missing[:5]}")
    target.load_state_dict({key: weights[names[key]] for key in wanted}, strict=True)


def _classifier_name(key: str, weights: dict) -> str:
    """timm's feature wrappers flatten nested module paths ("stages_0.blocks…" for "stages.0.blocks…")."""
    if key in weights:
        return key
    head, _, rest = key.partition(".")
    return f"{head.replace('_', '.', 1)}.{rest}" if rest else key
