"""Mask-classification models (Mask2Former, MaskFormer; OneFormer for instances): one set of plumbing for semantic
and instance segmentation.

These models predict N (class, mask) pairs per image and train with their own Hungarian-matched loss on per-segment
binary masks; post-processing through their image processor turns the pairs into semantic maps or instances.
Loading: any `AutoModelForUniversalSegmentation` checkpoint with the class head resized to the labels, or a timm
classifier (e.g. the bundled `hftl/efficientnet-lite0`) whose ImageNet weights become the backbone of a small
Mask2Former built from config. Either way the saved folder loads with `pipeline("image-segmentation")`.
"""

from __future__ import annotations

import torch

MASK_CLASSIFICATION_TYPES = ("mask2former", "maskformer")
# OneFormer also reads a task prompt ("the task is instance") through its CLIP tokenizer, so its processor is a
# OneFormerProcessor (image processor + tokenizer) and the saved folder carries the tokenizer the pipeline needs.
# Instance segmentation only: the semantic task has no prompt plumbing.
PROMPTED_TYPES = ("oneformer",)
# Small enough to train on a CPU in minutes, big enough for a handful of classes and instances per image.
MASK2FORMER_SIZE = {
    "hidden_dim": 64,
    "feature_size": 64,
    "mask_feature_size": 64,
    "encoder_feedforward_dim": 256,
    "dim_feedforward": 256,
    "encoder_layers": 2,
    "decoder_layers": 3,
    "num_attention_heads": 4,
    # a handful of instances per image needs few queries; every query costs matching and mask-loss work
    "num_queries": 10,
    "dropout": 0.0,
    # points per mask for the matcher and the mask loss: a 64 px input has 16×16 = 256 mask logits, so more points
    # than that (the default is 12544) only re-sample the same pixels
    "train_num_points": 256,
}
FEATURE_STRIDES = (4, 8, 16, 32)
DEFAULT_IMAGE_SIZE = 384
# Backbone LoRA targets, first tier found in the encoder wins: Swin/ViT attention, then timm CNN pointwise convs.
LORA_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)
LORA_TIERS = (("query", "value"), ("q_proj", "v_proj"), ("qkv",), ("conv_pw", "conv_pwl"), ("pwconv1", "pwconv2"))


def is_mask_classification(config) -> bool:
    return getattr(config, "model_type", None) in MASK_CLASSIFICATION_TYPES


def is_prompted(config) -> bool:
    return getattr(config, "model_type", None) in PROMPTED_TYPES


def load_universal(model_args, id2label: dict, image_size: int | None, model_type: str | None = None):
    """A Hub/local Mask2Former, MaskFormer or OneFormer checkpoint with its class head resized to `id2label`."""
    from transformers import AutoModelForUniversalSegmentation

    from hftl.modeling import load_model_and_processor

    prompted = model_type in PROMPTED_TYPES
    # OneFormer's text branch (is_training) only adds a contrastive loss and needs per-image class texts; without
    # it the model trains on the same matched class/mask/dice losses as Mask2Former and infers as it always does
    extra = {"is_training": False} if prompted else {}
    model, processor = load_model_and_processor(AutoModelForUniversalSegmentation, model_args, id2label, **extra)
    # square inputs without padding: batches stack, and post-processing (which ignores padding) stays aligned
    side = image_size or -(-int(processor.size.get("shortest_edge") or processor.size.get("height")) // 32) * 32
    processor.size = {"height": side, "width": side}
    _processor_defaults(processor)
    if prompted:
        processor = _with_tokenizer(model, processor, model_args)
    return model, processor


def _with_tokenizer(model, image_processor, model_args):
    from transformers import AutoTokenizer, OneFormerProcessor

    from hftl.modeling import resolve_model_path

    path = resolve_model_path(model_args.model, model_args.revision)
    common = {"revision": model_args.revision, "trust_remote_code": model_args.trust_remote_code}
    # the checkpoint's class metadata (class_info_file, fetched from the Hub on load) names its old classes; ""
    # keeps the saved folder from fetching it and post-processing from reading it (a None there raises)
    image_processor.class_info_file = ""
    length = model.config.task_seq_len
    tokenizer = AutoTokenizer.from_pretrained(path, **common)
    return OneFormerProcessor(image_processor, tokenizer, max_seq_length=length, task_seq_length=length)


def image_processor_of(processor):
    """The image processor inside a OneFormerProcessor, or the processor itself."""
    return getattr(processor, "image_processor", processor)


def task_prompt(processor, subtask: str) -> torch.Tensor | None:
    """(task_seq_len,) token ids of OneFormer's task prompt, None for models without one. Tokenized exactly as
    pipeline("image-segmentation") does (pad ids kept, unlike OneFormerProcessor.__call__, which zeroes them): the
    task MLP reads the ids as numbers, so training must see what inference will."""
    if getattr(processor, "tokenizer", None) is None or not hasattr(processor, "task_seq_length"):
        return None
    tokens = processor.tokenizer(
        [f"the task is {subtask}"], padding="max_length", max_length=processor.task_seq_length, return_tensors="pt"
    )
    return tokens["input_ids"][0]


def post_process_instances(image_processor, outputs, threshold: float, target_sizes) -> list[dict]:
    """Per image {"segmentation": (n, H, W) binary maps, "segments_info"}. Mask2Former and MaskFormer return binary
    maps on request; OneFormer only an id map (one segment per pixel), split here into one map per segment."""
    import inspect

    post_process = image_processor.post_process_instance_segmentation
    if "return_binary_maps" in inspect.signature(post_process).parameters:
        return post_process(outputs, threshold=threshold, target_sizes=target_sizes, return_binary_maps=True)
    decoded = post_process(outputs, threshold=threshold, target_sizes=target_sizes)
    for image in decoded:
        ids = torch.tensor([s["id"] for s in image["segments_info"]], device=image["segmentation"].device)
        image["segmentation"] = (image["segmentation"][None] == ids[:, None, None]).float()
    return decoded


def mask2former_from_timm(path: str, timm_config, id2label: dict, image_size: int | None):
    """(Mask2FormerForUniversalSegmentation whose backbone holds the timm classifier's weights, its processor)."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    from hftl.modeling import model_around_timm, timm_normalization

    id2label = {int(k): v for k, v in id2label.items()}
    config = Mask2FormerConfig(
        backbone_config=_timm_backbone_config(timm_config.architecture),
        num_labels=len(id2label),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        **MASK2FORMER_SIZE,
    )
    model = model_around_timm(
        Mask2FormerForUniversalSegmentation, config, path, timm_config, lambda m: backbone(m)._backbone
    )
    side = image_size or DEFAULT_IMAGE_SIZE
    mean, std = timm_normalization(timm_config)
    processor = Mask2FormerImageProcessor(size={"height": side, "width": side}, image_mean=mean, image_std=std)
    _processor_defaults(processor)
    return model, processor


def _timm_backbone_config(architecture: str) -> dict:
    """The feature levels at strides 4, 8, 16 and 32: the pyramid Mask2Former's pixel decoder expects."""
    from hftl.modeling import timm_backbone_config, timm_feature_info

    reductions = timm_feature_info(architecture).reduction()
    indices = [reductions.index(s) for s in FEATURE_STRIDES if s in reductions]
    if len(indices) != len(FEATURE_STRIDES):
        raise ValueError(
            f"timm model {architecture!r} has feature strides {reductions}; Mask2Former needs 4, 8, 16 and 32."
        )
    return timm_backbone_config(architecture, indices)


def _processor_defaults(processor) -> None:
    # labels are class ids already (the task encodes them); nothing is reduced or ignored on the way in
    processor.do_reduce_labels = False
    processor.ignore_index = None


def check_image_size(size: int) -> None:
    """Post-processing ignores padding, so the square input must need none (the processor pads to /32)."""
    if size % 32:
        raise ValueError(
            f"--image_size {size}: Mask2Former/MaskFormer need a multiple of 32 (e.g. {size // 32 * 32 or 32})."
        )


# ---- what strategies see ---------------------------------------------------------------------------------------
def backbone(model):
    from hftl.strategies import peft_base

    return peft_base(model).model.pixel_level_module.encoder


def head_modules(model) -> list[str]:
    """Every part that is not the backbone (pixel decoder, transformer decoder, class and mask predictors): built
    fresh or resized for the new labels, so it trains under every strategy."""
    from hftl.strategies import peft_base

    base = peft_base(model)
    encoder = backbone(base)
    heads, stack = [], [("", base)]
    while stack:
        prefix, module = stack.pop()
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if child is encoder or next(child.parameters(), None) is None:
                continue
            if any(sub is encoder for sub in child.modules()):
                stack.append((full + ".", child))
            else:
                heads.append(full)
    return sorted(heads)


def lora_targets(model) -> list[str]:
    """Full module paths inside the backbone, so PEFT never also wraps a same-named layer in the decoders (which
    train whole as `modules_to_save`)."""
    from hftl.strategies import peft_base

    base = peft_base(model)
    encoder = backbone(base)
    prefix = next(name for name, module in base.named_modules() if module is encoder)
    layers = [(n, n.rsplit(".", 1)[-1]) for n, m in encoder.named_modules() if isinstance(m, LORA_LAYERS)]
    for tier in LORA_TIERS:
        found = [f"{prefix}.{path}" for path, name in layers if name in tier]
        if found:
            return found
    raise ValueError(
        f"No default LoRA targets in the {type(encoder).__name__} backbone; pass --lora_target_modules with "
        "backbone module names from model.named_modules()."
    )


# ---- training targets and semantic outputs -----------------------------------------------------------------------
def semantic_targets(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One binary mask per class present in a class-id map (ignored pixels belong to none): the segments a
    mask-classification model is matched against for semantic segmentation."""
    present = [int(c) for c in torch.unique(labels) if int(c) != ignore_index]
    if not present:
        return torch.zeros((0, *labels.shape[-2:])), torch.zeros(0, dtype=torch.long)
    classes = torch.tensor(present, dtype=torch.long, device=labels.device)
    masks = (labels[None] == classes[:, None, None]).float()
    return masks, classes


def semantic_scores(outputs) -> torch.Tensor:
    """(B, classes, h, w) class probabilities per pixel, as `post_process_semantic_segmentation` computes them
    (softmax over classes without "no object", times the sigmoid of each query's mask, summed over queries)."""
    classes = outputs.class_queries_logits.float().softmax(-1)[..., :-1]
    masks = outputs.masks_queries_logits.float().sigmoid()
    return torch.einsum("bqc,bqhw->bchw", classes, masks)
