"""LoRA (PEFT) for any vision backbone: target choice, head saving, mergeability, and adapter loading.

PEFT was written for language models; three of its rules need care on vision models, and this module owns them:
- `modules_to_save` matches a name as a bare suffix (`"head"` also wraps `head.head` and `auxiliary_head`) and
  refuses `ModuleList`s: heads are named element-wise and only by names whose matches are exactly the heads.
- Models with a tied-weights mapping (Deformable DETR, RT-DETRv2, DAB-DETR) make PEFT look for tied word
  embeddings through `get_input_embeddings()`, which transformers refuses for vision models; wrapping and loading
  run under `vision_peft_guard`, which tells PEFT there are no word embeddings to tie for that call only.
- Default targets are derived from module types when no preset fits: every plain `nn.Linear` / `nn.Conv2d` of the
  body that PEFT can merge back (grouped and depthwise convolutions cannot be merged, so they are skipped).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from torch import nn

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


def _plain(module: nn.Module) -> bool:
    """A layer PEFT's LoRA wraps faithfully: Linear/Conv2d (or a subclass that keeps their forward, e.g. timm's
    `Linear`), ungrouped. Subclasses with their own forward (timm's `Conv2dSame` pads first) would lose it."""
    if not isinstance(module, SUPPORTED_LAYERS):
        return False
    if isinstance(module, nn.Conv2d):
        return type(module).forward is nn.Conv2d.forward and module.groups == 1
    return True


def _inside(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def peft_target_matches(targets: list[str] | str, key: str) -> bool:
    """PEFT's own rule for `target_modules` (a regex is a full match, a list entry an exact name or dotted
    suffix), so `--lora_target_modules qkv.linear` means what it means to PEFT."""
    from peft.tuners.tuners_utils import check_target_module_exists

    class _Config:  # the two fields the rule reads
        target_modules = targets
        exclude_modules = None
        layers_to_transform = None
        layers_pattern = None
        modules_to_save = None
        target_parameters = None

    return bool(check_target_module_exists(_Config, key))


def matched_modules(model: nn.Module, targets: list[str] | str) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if name and peft_target_matches(targets, name)}


def derive_targets(model: nn.Module, heads: list[str], body: nn.Module | None = None) -> list[str]:
    """Plain Linear/Conv2d leaves of the body (never a head), written as short PEFT names: a leaf's own name
    when that suffix matches nothing else, its full path otherwise."""
    body_ids = None if body is None else {id(m) for m in body.modules()}
    wanted = {
        name
        for name, module in model.named_modules()
        if _plain(module)
        and not _inside(name, heads)
        and (body_ids is None or id(module) in body_ids)
        and not any(True for _ in module.children())
    }
    targets: list[str] = []
    for leaf in sorted({name.rsplit(".", 1)[-1] for name in wanted}):
        if set(matched_modules(model, [leaf])) <= wanted:
            targets.append(leaf)
        else:
            targets += sorted(n for n in wanted if n.rsplit(".", 1)[-1] == leaf)
    return targets


def usable_preset(model: nn.Module, names: Iterable[str], heads: list[str]) -> list[str]:
    """The preset names the model has, kept only where every module they match is a plain layer outside the head
    (timm's RegNet `conv1` is a ConvNormAct wrapper, not a layer PEFT can wrap)."""
    kept = []
    for name in names:
        matched = matched_modules(model, [name])
        if matched and all(_plain(m) and not _inside(n, heads) for n, m in matched.items()):
            kept.append(name)
    return kept


def check_targets(model: nn.Module, targets: list[str] | str, heads: list[str], rank: int, merge: bool) -> None:
    """Before any training: the targets must match a layer PEFT supports, none inside a head, and (when the run
    saves a merged model) none that PEFT cannot merge; grouped convolutions only where PEFT takes them."""
    matched = matched_modules(model, targets)
    if not matched:
        raise ValueError(
            f"None of the LoRA target modules {targets} match a module of {type(model).__name__} (PEFT's rule: an "
            "exact name or a dotted suffix of one); pass --lora_target_modules with names from model.named_modules()."
        )
    in_head = sorted(n for n in matched if _inside(n, heads))
    if in_head:
        raise ValueError(
            f"LoRA targets {in_head[:5]} are inside the head, which is trained whole (modules_to_save); "
            "choose body modules in --lora_target_modules."
        )
    unsupported = sorted(n for n, m in matched.items() if not isinstance(m, (*SUPPORTED_LAYERS, nn.Embedding)))
    if unsupported:
        kinds = sorted({type(matched[n]).__name__ for n in unsupported})
        raise ValueError(
            f"LoRA targets {unsupported[:5]} are {kinds} modules, not layers PEFT can adapt; name the "
            "Linear/Conv2d layers inside them (e.g. 'conv1.conv') in --lora_target_modules."
        )
    grouped = sorted(n for n, m in matched.items() if isinstance(m, nn.Conv2d) and m.groups > 1)
    indivisible = [n for n in grouped if rank % matched[n].groups]
    if indivisible:
        raise ValueError(
            f"LoRA targets {indivisible[:5]} are grouped/depthwise convolutions whose groups "
            f"({matched[indivisible[0]].groups}) do not divide --lora_r {rank}, which PEFT requires; leave them out "
            "of --lora_target_modules."
        )
    if grouped and merge:
        raise ValueError(
            f"LoRA targets {grouped[:5]} are grouped/depthwise convolutions, which PEFT cannot merge into the model; "
            "leave them out of --lora_target_modules, or pass --merge_lora false to keep only the adapter."
        )


def save_names(model: nn.Module, heads: list[str]) -> list[str]:
    """Names for PEFT's `modules_to_save` that wrap exactly the head modules, once each.

    PEFT matches these by plain suffix and cannot wrap containers, so a head whose name also matches a module
    outside or inside the heads (`head` vs `head.head`), or that is a ModuleList, is replaced by its children."""
    keys = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    units = list(heads)
    for _ in range(16):  # each pass goes one level deeper; heads are shallow
        matches = {u: [k for k in keys if k.endswith(u)] for u in units}
        every = {k for found in matches.values() for k in found}
        bad = {
            u
            for u, found in matches.items()
            if isinstance(model.get_submodule(u), (nn.ModuleList, nn.ModuleDict))
            or any(not _inside(k, heads) for k in found)
            or any(other.startswith(k + ".") for k in found for other in every)
        }
        if not bad:
            return units
        split = []
        for unit in units:
            if unit not in bad:
                split.append(unit)
                continue
            children = [f"{unit}.{n}" for n, c in model.get_submodule(unit).named_children() if _has_params(c)]
            if not children:
                raise ValueError(f"Cannot name head module {unit!r} unambiguously for PEFT's modules_to_save.")
            split += children
        units = split
    raise ValueError(f"Cannot name the head modules {heads} unambiguously for PEFT's modules_to_save.")


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


# model types whose adapter `PeftModel.from_pretrained` alone cannot load (`needs_peft_guard`); the model card's
# adapter snippet names `load_adapter` for them (tests/test_families.py checks this list against the families)
ADAPTER_NEEDS_HFTL = ("deformable_detr", "dab-detr", "rt_detr_v2", "d_fine")


def needs_peft_guard(model: nn.Module) -> bool:
    """PEFT resolves tied weights through `get_input_embeddings()` when a model declares a tied-weights mapping
    (Deformable DETR ties its per-layer heads), and transformers raises for vision models."""
    if getattr(model, "config", None) is None or not isinstance(getattr(model, "_tied_weights_keys", None), dict):
        return False
    try:
        model.get_input_embeddings()
        return False
    except (NotImplementedError, AttributeError):
        return True


@contextlib.contextmanager
def vision_peft_guard(model: nn.Module):
    """Where `needs_peft_guard`: tells PEFT the model ties no word embeddings (`tie_word_embeddings=False`, PEFT's
    own opt-out) for the duration of the call; the config is restored after, so transformers' own head tying is
    untouched."""
    config = getattr(model, "config", None)
    if not needs_peft_guard(model):
        yield
        return
    before = config.tie_word_embeddings
    config.tie_word_embeddings = False
    try:
        yield
    finally:
        config.tie_word_embeddings = before


_CONV_ATTRIBUTES = ("stride", "padding", "dilation", "kernel_size", "groups", "padding_mode")


def _expose_conv_attributes(model: nn.Module) -> nn.Module:
    """Some models read a convolution's settings in their own forward (MobileNet's TF-style padding reads
    `conv.stride`); PEFT's LoRA convolution does not forward them, so they are copied onto it."""
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Conv2d) and module is not base:
            for attribute in _CONV_ATTRIBUTES:
                if attribute not in module.__dict__:
                    setattr(module, attribute, getattr(base, attribute))
    return model


def wrap(model: nn.Module, peft_config) -> nn.Module:
    from peft import get_peft_model

    with vision_peft_guard(model):
        return _expose_conv_attributes(get_peft_model(model, peft_config))


def load_adapter(base: nn.Module, adapter_dir, **kwargs) -> nn.Module:
    """`PeftModel.from_pretrained` for any vision model hftl trains (see `vision_peft_guard`)."""
    from peft import PeftModel

    with vision_peft_guard(base):
        return _expose_conv_attributes(PeftModel.from_pretrained(base, str(adapter_dir), **kwargs))
