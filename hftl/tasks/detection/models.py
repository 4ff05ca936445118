"""A detector around a timm classifier: its ImageNet weights become the backbone of a fresh Conditional DETR.

Conditional DETR converges several times faster than DETR, which is what makes a CPU quickstart possible. The
backbone's batch norms are frozen the timm way (`FrozenBatchNormAct2d` keeps each norm's activation; DETR's own
replacement would drop it), and the saved config says `use_pretrained_backbone: false`, so the folder reloads
(and `pipeline()` runs) without asking any hub for weights.
"""

from __future__ import annotations

# Small enough to train on a CPU in minutes, big enough for a handful of classes and objects per image.
DETECTOR_SIZE = {
    "d_model": 128,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 8,
    "decoder_attention_heads": 8,
    "encoder_ffn_dim": 512,
    "decoder_ffn_dim": 512,
    "num_queries": 20,
    "dropout": 0.0,
    "auxiliary_loss": True,
}
DEFAULT_IMAGE_SIZE = 512  # longest side when --image_size is not given
BACKBONE_STRIDE = 16  # one feature map, as DETR uses; stride 16 keeps small objects visible


def backbone_config(architecture: str) -> dict:
    from hftl.modeling import timm_backbone_config, timm_feature_info

    reductions = timm_feature_info(architecture).reduction()
    index = max((i for i, r in enumerate(reductions) if r <= BACKBONE_STRIDE), default=len(reductions) - 1)
    return timm_backbone_config(architecture, [index])


def detector_from_timm(path: str, timm_config, id2label: dict, image_size: int | None):
    """(ConditionalDetrForObjectDetection with the timm model's weights in its backbone, its image processor)."""
    from transformers import (
        ConditionalDetrConfig,
        ConditionalDetrForObjectDetection,
        ConditionalDetrImageProcessor,
    )

    from hftl.modeling import model_around_timm, timm_normalization

    id2label = {int(k): v for k, v in id2label.items()}
    config = ConditionalDetrConfig(
        backbone_config=backbone_config(timm_config.architecture),
        num_labels=len(id2label),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        **DETECTOR_SIZE,
    )
    model = model_around_timm(
        ConditionalDetrForObjectDetection, config, path, timm_config, lambda m: m.model.backbone.model
    )
    mean, std = timm_normalization(timm_config)
    side = image_size or DEFAULT_IMAGE_SIZE
    processor = ConditionalDetrImageProcessor(
        size={"shortest_edge": side, "longest_edge": side}, image_mean=mean, image_std=std
    )
    return model, processor
