"""Zero-shot classifiers from CLIP-family dual encoders, saved as ordinary image-classification models.

A dual encoder (CLIP, SigLIP) classifies without training: each class name is written into prompts ("a photo of a
{}."), the text tower embeds them, and an image goes to the class whose averaged, normalised text embedding is
closest. That is a linear layer on the image embedding. transformers' own `CLIPForImageClassification` /
`SiglipForImageClassification` cannot hold it: they mean-pool the patch tokens and drop the projection (CLIP) or the
attention-pool head (SigLIP), so their features are not the ones the text tower was aligned with. timm's ViT has
exactly these towers (class-token + post-norm, or the attention-pool "map" head), so the vision tower is converted
into a `TimmWrapperForImageClassification` whose head is

    head.weight = logit_scale × normalised class text embeddings × projection / r,   head.bias = logit_bias (SigLIP)

(CLIP's projection folded into the head; r = the image-embedding norm of a mean-grey image, or the mean over
seeded noise images for a timm CNN tower, standing in for the per-image normalisation a linear layer cannot do, so
logits stay at the scale the encoder was trained with; it never changes which class wins). The result loads with
`pipeline("image-classification")`, trains with every strategy, pushes and serves like any fine-tuned model.
`--head_init text` starts fine-tuning from this head (LP-FT).

SigLIP 2's NaFlex tower takes patches, not pixels: its processor resizes each image, keeping the aspect ratio, to
at most `max_num_patches` patches, and the learned position grid is resized to each image's patch grid. timm's ViT
(which `pipeline("image-classification")` loads) has a fixed square input, so the tower is converted at the square
grid the processor gives a square image (e.g. 16 × 16 patches of 16 px for 256 patches): the patch Linear becomes
the patch conv and the position grid is resized once, by SigLIP 2's own resize. For square images this is the same
function (tested); other shapes are squashed to the square, as SigLIP 1 does, instead of padded at their own
aspect ratio.

A transformers `VisionTextDualEncoderModel` whose vision tower is a timm model (`TimmWrapperModel`) needs no
conversion: the classifier is that timm model with a classifier layer, the projection folded into it as for CLIP
(bench/imagenet_dual_encoder.py builds one offline from the bundled ImageNet EfficientNet-Lite0).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

# CLIP's curated ImageNet prompt ensemble (Radford et al. 2021, notebook "Prompt_Engineering_for_ImageNet"), plus
# the plain prompt.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
SUPPORTED = ("clip", "siglip", "siglip2")
# a VisionTextDualEncoderModel is convertible when its vision tower is a timm model
VISION_TEXT = "vision-text-dual-encoder"
TEMPLATE_SEPARATOR = "|"
# transformers hidden_act -> timm act_layer
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def parse_templates(text: str | None) -> list[str]:
    """`--prompt_templates "a photo of a {}.|a drawing of a {}."` (| separated; each must hold one {})."""
    if not text:
        return list(DEFAULT_TEMPLATES)
    templates = [t.strip() for t in text.split(TEMPLATE_SEPARATOR) if t.strip()]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(
            f"--prompt_templates: each template needs exactly one {{}} for the class name (got {bad or text!r}); "
            'separate templates with |, e.g. "a photo of a {}.|a sketch of a {}."'
        )
    return templates


def dual_encoder_type(config) -> str | None:
    """The model type when `config` is a dual encoder (a text and a vision tower), else None."""
    if hasattr(config, "text_config") and hasattr(config, "vision_config"):
        return config.model_type
    return None


def check_convertible(config, name: str) -> None:
    model_type = config.model_type
    if model_type == VISION_TEXT and config.vision_config.model_type == "timm_wrapper":
        return
    if model_type not in SUPPORTED:
        raise ValueError(
            f"{name} is a {model_type!r} dual encoder; zero-shot heads convert {', '.join(SUPPORTED)} vision towers, "
            f"and {VISION_TEXT} models with a timm vision tower, to an image-classification model. Use a CLIP, "
            "SigLIP or SigLIP 2 checkpoint."
        )


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor
    return output.pooler_output if hasattr(output, "pooler_output") else output


@torch.no_grad()
def class_text_embeddings(dual, tokenizer, names: list[str], templates: list[str]) -> torch.Tensor:
    """(classes, dim): per class the mean of its normalised prompt embeddings, normalised again (CLIP's recipe).
    SigLIP was trained on max-length padded text and pools the last token, so it is padded the same way (as
    transformers' zero-shot pipeline does)."""
    padding = "max_length" if dual.config.model_type.startswith("siglip") else True
    dual.eval()
    rows = []
    for name in names:
        tokens = tokenizer([t.format(name) for t in templates], padding=padding, truncation=True, return_tensors="pt")
        embeds = _features(dual.get_text_features(**tokens))
        rows.append(torch.nn.functional.normalize(embeds, dim=-1).mean(0))
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def _timm_config(dual, processor, id2label: dict):
    from transformers import TimmWrapperConfig

    vision = dual.config.vision_config
    model_type = dual.config.model_type
    act = _ACTIVATIONS.get(vision.hidden_act)
    if act is None:
        raise ValueError(f"Vision activation {vision.hidden_act!r} has no timm equivalent.")
    expected_eps = 1e-5 if model_type == "clip" else 1e-6  # timm's CLIP ViTs use nn.LayerNorm, the others 1e-6
    if abs(vision.layer_norm_eps - expected_eps) > 1e-12:
        raise ValueError(f"layer_norm_eps {vision.layer_norm_eps} is not timm's {expected_eps} for {model_type}.")
    model_args = {
        "patch_size": vision.patch_size,
        "embed_dim": vision.hidden_size,
        "depth": vision.num_hidden_layers,
        "num_heads": vision.num_attention_heads,
        "mlp_ratio": vision.intermediate_size / vision.hidden_size,
        "act_layer": act,
        # other input sizes (--image_size) resample the position embeddings
        "dynamic_img_size": True,
    }
    arch = "vit_base_patch16_clip_224" if model_type == "clip" else "vit_base_patch16_siglip_224"
    if model_type == "siglip2":  # NaFlex has no fixed size: the square grid its processor gives a square image
        side = naflex_grid(processor) * vision.patch_size
        size = {"height": side, "width": side}
    else:
        size = processor.size
        side = int(size.get("shortest_edge") or size.get("height"))
    model_args["img_size"] = side if model_type == "siglip2" else vision.image_size
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    input_side = int(crop["height"]) if crop else side
    resample = {2: "bilinear", 3: "bicubic"}.get(int(getattr(processor, "resample", 3)), "bicubic")
    pretrained_cfg = {
        "input_size": [3, input_side, input_side],
        "interpolation": resample,
        # shortest-edge resize + centre crop (CLIP), or a plain resize to height × width (SigLIP)
        "crop_pct": input_side / side if "shortest_edge" in size else 1.0,
        "crop_mode": "center" if "shortest_edge" in size else "squash",
        "mean": list(processor.image_mean),
        "std": list(processor.image_std),
        "num_classes": len(id2label),
    }
    return TimmWrapperConfig(
        architecture=arch,
        model_args=model_args,
        pretrained_cfg=pretrained_cfg,
        num_labels=len(id2label),
        id2label=dict(id2label),
        label2id={v: k for k, v in id2label.items()},
    )


def _attention_blocks(state: dict, prefix: str, depth: int) -> dict:
    out = {}
    for i in range(depth):
        src, dst = f"{prefix}encoder.layers.{i}.", f"blocks.{i}."
        attn = src + "self_attn."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat([state[f"{attn}{p}_proj.{kind}"] for p in ("q", "k", "v")])
            out[f"{dst}attn.proj.{kind}"] = state[f"{attn}out_proj.{kind}"]
            out[f"{dst}norm1.{kind}"] = state[f"{src}layer_norm1.{kind}"]
            out[f"{dst}norm2.{kind}"] = state[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.fc1.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.fc2.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
    return out


def naflex_grid(processor) -> int:
    """Patches per side SigLIP 2's processor gives a square image: the largest square within max_num_patches."""
    return math.isqrt(processor.max_num_patches)


def _naflex_patch_embedding(state: dict, vision, grid: int) -> dict:
    """SigLIP 2's patch embedding is a Linear over patches flattened as (row, column, channel) with a learned
    position grid resized per image; as timm's conv: the same weights as (out, channel, row, column), and the grid
    resized once, by SigLIP 2's own resize (bilinear, antialiased), to the `grid` × `grid` of a square input."""
    from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

    p, channels = vision.patch_size, vision.num_channels
    weight = state["embeddings.patch_embedding.weight"]
    stored = math.isqrt(vision.num_patches)
    positions = state["embeddings.position_embedding.weight"].reshape(stored, stored, -1)
    resized = Siglip2VisionEmbeddings.resize_positional_embeddings(
        positions, torch.tensor([[grid, grid]]), max_length=grid * grid
    )
    return {
        "patch_embed.proj.weight": weight.reshape(len(weight), p, p, channels).permute(0, 3, 1, 2).contiguous(),
        "pos_embed": resized.reshape(1, grid * grid, -1),
    }


def timm_vision_state(dual, processor=None) -> tuple[dict, torch.Tensor | None]:
    """The vision tower's weights under timm's ViT names, and CLIP's projection matrix (None for SigLIP); SigLIP 2
    needs its image `processor` (the input grid)."""
    state = {k: v.detach().clone() for k, v in dual.vision_model.state_dict().items()}
    vision = dual.config.vision_config
    out = _attention_blocks(state, "", vision.num_hidden_layers)
    if dual.config.model_type == "siglip2":
        out.update(_naflex_patch_embedding(state, vision, naflex_grid(processor)))
    else:
        out["patch_embed.proj.weight"] = state["embeddings.patch_embedding.weight"]
        out["pos_embed"] = state["embeddings.position_embedding.weight"].unsqueeze(0)
    for kind in ("weight", "bias"):
        out[f"norm.{kind}"] = state[f"post_layernorm.{kind}"]
    if dual.config.model_type == "clip":
        out["cls_token"] = state["embeddings.class_embedding"].reshape(1, 1, -1)
        for kind in ("weight", "bias"):
            out[f"norm_pre.{kind}"] = state[f"pre_layrnorm.{kind}"]
        return out, dual.visual_projection.weight.detach().clone()
    out["patch_embed.proj.bias"] = state["embeddings.patch_embedding.bias"]
    dim = dual.config.vision_config.hidden_size
    in_w, in_b = state["head.attention.in_proj_weight"], state["head.attention.in_proj_bias"]
    out.update(
        {
            "attn_pool.latent": state["head.probe"],
            "attn_pool.q.weight": in_w[:dim],
            "attn_pool.q.bias": in_b[:dim],
            "attn_pool.kv.weight": in_w[dim:],
            "attn_pool.kv.bias": in_b[dim:],
        }
    )
    for kind in ("weight", "bias"):
        out[f"attn_pool.proj.{kind}"] = state[f"head.attention.out_proj.{kind}"]
        out[f"attn_pool.norm.{kind}"] = state[f"head.layernorm.{kind}"]
        out[f"attn_pool.mlp.fc1.{kind}"] = state[f"head.mlp.fc1.{kind}"]
        out[f"attn_pool.mlp.fc2.{kind}"] = state[f"head.mlp.fc2.{kind}"]
    return out, None


def _timm_tower_classifier(dual, id2label: dict):
    """A VisionTextDualEncoderModel's timm vision tower with a fresh classifier, and its projection matrix."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    vision = dual.config.vision_config
    config = TimmWrapperConfig(
        architecture=vision.architecture,
        model_args=getattr(vision, "model_args", None),
        pretrained_cfg={**vision.pretrained_cfg, "num_classes": len(id2label)},
        num_labels=len(id2label),
        id2label=dict(id2label),
        label2id={v: k for k, v in id2label.items()},
    )
    classifier = TimmWrapperForImageClassification(config)
    state = dual.vision_model.timm_model.state_dict()
    state.update({k: v for k, v in classifier.timm_model.state_dict().items() if k not in state})
    classifier.timm_model.load_state_dict(state, strict=True)
    return classifier, dual.visual_projection.weight.detach().clone()


def _vision_classifier(dual, processor, id2label: dict):
    """(the vision tower as a TimmWrapperForImageClassification with a fresh head, the projection or None)."""
    from transformers import TimmWrapperForImageClassification

    if dual.config.model_type == VISION_TEXT:
        return _timm_tower_classifier(dual, id2label)
    config = _timm_config(dual, processor, id2label)
    classifier = TimmWrapperForImageClassification(config)
    vision, projection = timm_vision_state(dual, processor)
    fresh_head = {k: v for k, v in classifier.timm_model.state_dict().items() if k.startswith("head.")}
    vision.update(fresh_head)
    classifier.timm_model.load_state_dict(vision, strict=True)
    return classifier, projection


@torch.no_grad()
def build_classifier(dual, processor, tokenizer, id2label: dict, templates: list[str] | None, head: str = "text"):
    """A `TimmWrapperForImageClassification` holding `dual`'s vision tower, with the zero-shot head (head="text")
    or a freshly initialised one (head="random")."""
    classifier, projection = _vision_classifier(dual, processor, id2label)
    config = classifier.config
    classifier.eval()
    if head == "text":
        names = [id2label[i] for i in range(len(id2label))]
        weight = class_text_embeddings(dual, tokenizer, names, templates or list(DEFAULT_TEMPLATES))
        weight = weight @ projection if projection is not None else weight
        # the norm of a mean-grey image's embedding: mean pixels normalise to 0. A CNN's pooled ReLU features of a
        # flat image are ~0 (EfficientNet-Lite0: 0.005, against ~16 for noise), which made logits thousands of
        # times too large and left a probe from this head stuck where it started; timm towers take the mean norm
        # over seeded noise images instead.
        shape = (1, 3, *config.pretrained_cfg["input_size"][1:])
        if dual.config.model_type == VISION_TEXT:
            probe = torch.randn((8, *shape[1:]), generator=torch.Generator().manual_seed(0))
        else:
            probe = torch.zeros(shape)
        reference = classifier.timm_model.forward_head(classifier.timm_model.forward_features(probe), pre_logits=True)
        reference = reference @ projection.T if projection is not None else reference
        scale = dual.logit_scale.exp().item() / max(reference.norm(dim=-1).mean().item(), 1e-6)
        linear = classifier.timm_model.get_classifier()
        linear.weight.copy_(weight * scale)
        bias = getattr(dual, "logit_bias", None)
        linear.bias.fill_(bias.item() if bias is not None else 0.0)
    return classifier


def load_classifier(path: str, model_args, id2label: dict, strategy_args):
    """(TimmWrapperForImageClassification, its image processor) from a dual-encoder checkpoint at `path`."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, TimmWrapperImageProcessor

    common = {"revision": model_args.revision, "trust_remote_code": model_args.trust_remote_code}
    dual = AutoModel.from_pretrained(path, **common)
    check_convertible(dual.config, model_args.model)
    # a timm vision tower keeps its preprocessing in its config (TimmWrapper saves no processor file)
    timm_tower = dual.config.model_type == VISION_TEXT
    hf_processor = None if timm_tower else AutoImageProcessor.from_pretrained(path, **common)
    tokenizer = AutoTokenizer.from_pretrained(path, **common)
    wants_text = strategy_args.strategy == "zero-shot" or strategy_args.head_init == "text"
    templates = parse_templates(strategy_args.prompt_templates)
    model = build_classifier(dual, hf_processor, tokenizer, id2label, templates, "text" if wants_text else "random")
    del dual
    processor = TimmWrapperImageProcessor(pretrained_cfg=model.config.pretrained_cfg)
    return model, processor


def is_dual_encoder_path(path: str | Path, model_args) -> str | None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            path, revision=model_args.revision, trust_remote_code=model_args.trust_remote_code
        )
    except (OSError, ValueError):
        return None  # load_model_and_processor reports it with the fix
    return dual_encoder_type(config)


def check_needs_dual_encoder(strategy_args, model_name: str) -> None:
    needs = "--strategy zero-shot" if strategy_args.strategy == "zero-shot" else None
    if strategy_args.head_init == "text":
        needs = "--head_init text"
    if strategy_args.wise_ft_alpha:
        needs = "--wise_ft_alpha"
    if needs:
        raise ValueError(
            f"{needs} needs a CLIP-family dual encoder (a model with a text tower, e.g. openai/clip-vit-base-patch32 "
            f"or google/siglip-base-patch16-224); {model_name} has none."
        )


def evaluate_only(task, model, eval_dataset, collate, config, accelerator, id2label: dict):
    """`--strategy zero-shot`: no training; the validation split is evaluated once, recorded like an epoch."""
    from hftl.trainer import TrainResult, TrainState, evaluate, make_loader

    args = config.train
    loader = make_loader(eval_dataset, collate, args.eval_batch_size or 2 * args.batch_size, False, args.seed, 0)
    model = model.to(accelerator.device)
    metrics, _ = evaluate(task, model, accelerator.prepare(loader), accelerator, id2label)
    record = {"epoch": 0, "step": 0, **{f"eval_{k}": v for k, v in metrics.items() if isinstance(v, int | float)}}
    state = TrainState(best_epoch=0, history=[record])
    return TrainResult(state, record, 0.0, 0.0)
