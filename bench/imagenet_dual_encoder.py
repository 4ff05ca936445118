r"""An offline stand-in for CLIP: the bundled ImageNet EfficientNet-Lite0 as the image tower, a tiny BERT trained
here as the text tower, saved as a transformers `VisionTextDualEncoderModel` folder.

No pretrained CLIP or SigLIP is reachable offline, so a dual encoder is assembled from what ships: the vision tower
is the ImageNet model without its classifier (pooled 1280-d features, `visual_projection` = identity), and the text
tower learns to put a class's words where the ImageNet classifier's weight row W_c is: an image whose features
point along W_c is class c, so text pointing there names it. Its texts are the WordNet words timm ships
(`timm/data/_info/`): for the 1,000 ImageNet classes, prompts from the class lemmas (CLIP's templates) and the
glosses, trained with a softmax over all 1,000 normalised W_c (InfoNCE against fixed targets); for the other ~21k
synsets of ImageNet-21k, which have no image-side target, a contrastive loss pulls each lemma prompt to its own
gloss, so words outside the 1,000 names ("sneaker": "a canvas shoe with a pliable rubber sole") land where their
definitions' words point. Nothing here reads an image; the Fashion-MNIST validation split is only used to watch
the zero-shot accuracy of the result (`--watch`), never the test split.

    python bench/imagenet_dual_encoder.py --out /tmp/hftl-bench/imagenet-wordnet-dual --steps 1500 --watch
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from bench.common import WORK  # noqa: E402

TEXT_TOWER = {"hidden_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 256}
MAX_TOKENS = 32
VOCAB_SIZE = 8000


def wordnet_text() -> tuple[list[str], dict[str, list[str]], dict[str, str]]:
    """(the 1k ImageNet synsets in class order, synset -> lemmas, synset -> gloss) for all ~21k synsets."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    folder = Path(sys.modules["timm.data"].__file__).parent / "_info"

    def table(name: str) -> dict[str, str]:
        rows = (line.rstrip("\n").split("\t", 1) for line in (folder / name).read_text().splitlines() if line)
        return {k: v for k, v in rows}

    lemmas = {
        k: [w.strip() for w in v.split(",") if w.strip()] for k, v in table("imagenet_synset_to_lemma.txt").items()
    }
    return list(info.label_names()), lemmas, table("imagenet_synset_to_definition.txt")


def build_tokenizer(texts: list[str], folder: Path):
    """A lower-cased WordPiece tokenizer trained on the WordNet texts, saved as a BertTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=VOCAB_SIZE, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    fast = BertTokenizerFast(tokenizer_object=tok, model_max_length=MAX_TOKENS)
    fast.save_pretrained(folder)
    return fast


def class_targets(vision_folder: str) -> torch.Tensor:
    """(1000, 1280) normalised rows of the ImageNet classifier: the image-side direction of each class."""
    from transformers import TimmWrapperForImageClassification

    model = TimmWrapperForImageClassification.from_pretrained(vision_folder)
    return F.normalize(model.timm_model.get_classifier().weight.detach(), dim=-1)


def build_dual(vision_folder: str, tokenizer):
    from transformers import BertConfig, BertModel, TimmWrapperModel, VisionTextDualEncoderModel

    vision = TimmWrapperModel.from_pretrained(vision_folder)
    width = vision.timm_model.num_features
    vision.config.hidden_size = width  # VisionTextDualEncoder sizes visual_projection from it
    text = BertModel(BertConfig(vocab_size=len(tokenizer), max_position_embeddings=MAX_TOKENS, **TEXT_TOWER))
    dual = VisionTextDualEncoderModel(vision_model=vision, text_model=text)
    dual.config.projection_dim = width
    dual.visual_projection = torch.nn.Linear(width, width, bias=False)
    dual.text_projection = torch.nn.Linear(TEXT_TOWER["hidden_size"], width, bias=False)
    with torch.no_grad():
        dual.visual_projection.weight.copy_(torch.eye(width))
    dual.visual_projection.requires_grad_(False)
    dual.vision_model.requires_grad_(False)
    return dual


def training_texts(classes, lemmas, glosses, templates):
    """1k supervised (text, class) pairs and ~21k (lemma prompt, gloss) pairs for the rest."""
    supervised = []
    for c, synset in enumerate(classes):
        names, gloss = lemmas[synset], glosses.get(synset, "")
        for name in names:
            supervised += [(t.format(name), c) for t in templates] + [(f"{name}: {gloss}", c)]
        if gloss:
            supervised.append((gloss, c))
    known = set(classes)
    paired = [(names, glosses[s]) for s, names in lemmas.items() if s not in known and glosses.get(s)]
    return supervised, paired


def embed(dual, tokenizer, texts: list[str]) -> torch.Tensor:
    tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    out = dual.get_text_features(**tokens)
    return F.normalize(out.pooler_output if hasattr(out, "pooler_output") else out, dim=-1)


def watch_features(vision_folder: str, size: int, per_class: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Pooled features of a fixed class-balanced sample of Fashion-MNIST *validation* (never test)."""
    import numpy as np
    import timm
    from transformers import TimmWrapperModel

    from hftl.bundled import load_bundled_dataset

    ds = load_bundled_dataset("hftl/fashion-mnist")["validation"]
    labels = np.array(ds["label"])
    rng = np.random.default_rng(0)
    idx = np.sort(
        np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)])
    )
    model = TimmWrapperModel.from_pretrained(vision_folder).eval()
    cfg = model.config.pretrained_cfg
    tf = timm.data.create_transform(
        input_size=(3, size, size), interpolation="bicubic", mean=cfg["mean"], std=cfg["std"], crop_pct=1.0
    )
    feats = []
    with torch.no_grad():
        for start in range(0, len(idx), 100):
            images = ds.select(idx[start : start + 100])["image"]
            pixels = torch.stack([tf(im.convert("RGB")) for im in images])
            feats.append(model(pixel_values=pixels).pooler_output)
    return F.normalize(torch.cat(feats), dim=-1), torch.tensor(labels[idx]), ds.features["label"].names


@torch.no_grad()
def zero_shot_accuracy(dual, tokenizer, names, templates, feats, labels) -> float:
    dual.eval()
    heads = torch.stack(
        [F.normalize(embed(dual, tokenizer, [t.format(n) for t in templates]).mean(0), dim=-1) for n in names]
    )
    dual.train()
    return (feats @ heads.T).argmax(1).eq(labels).float().mean().item()


def train(dual, tokenizer, targets, supervised, paired, templates, args, watch=None) -> None:
    params = [p for p in dual.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    rng = random.Random(args.seed)
    scale = args.temperature**-1
    dual.train()
    start = time.time()
    for step in range(1, args.steps + 1):
        batch = rng.sample(supervised, args.batch)
        texts, ys = zip(*batch)
        loss = F.cross_entropy(scale * embed(dual, tokenizer, list(texts)) @ targets.T, torch.tensor(ys))
        if args.pair_weight > 0:
            pairs = rng.sample(paired, args.batch)
            names = [rng.choice(templates).format(rng.choice(n)) for n, _ in pairs]
            a, b = embed(dual, tokenizer, names), embed(dual, tokenizer, [g for _, g in pairs])
            logits = scale * a @ b.T
            target = torch.arange(len(pairs))
            loss = loss + args.pair_weight * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optim.zero_grad()
        loss.backward()
        optim.step()
        sched.step()
        if step % args.log_every == 0 or step == args.steps:
            line = f"step {step} loss {loss.item():.3f} {time.time() - start:.0f}s"
            if watch is not None:
                line += f" fashion-mnist validation zero-shot {zero_shot_accuracy(dual, tokenizer, *watch):.3f}"
            print(line, flush=True)


def write(out: Path, args) -> Path:
    from transformers import TimmWrapperImageProcessor

    from hftl.bundled import resolve_model
    from hftl.zeroshot import DEFAULT_TEMPLATES

    torch.manual_seed(args.seed)
    vision_folder = resolve_model("hftl/efficientnet-lite0")
    classes, lemmas, glosses = wordnet_text()
    templates = list(DEFAULT_TEMPLATES)
    out.mkdir(parents=True, exist_ok=True)
    corpus = [", ".join(v) for v in lemmas.values()] + list(glosses.values()) + templates
    tokenizer = build_tokenizer(corpus, out)
    dual = build_dual(vision_folder, tokenizer)
    supervised, paired = training_texts(classes, lemmas, glosses, templates)
    print(f"{len(supervised)} class texts, {len(paired)} lemma-gloss pairs, vocab {len(tokenizer)}", flush=True)
    watch = None
    if args.watch:
        feats, labels, names = watch_features(vision_folder, args.watch_size, args.watch_per_class)
        watch = (names, templates, feats, labels)
    train(dual, tokenizer, class_targets(vision_folder), supervised, paired, templates, args, watch)
    dual.logit_scale.data.fill_(torch.tensor(args.temperature**-1).log().item())
    dual.eval().save_pretrained(out)
    processor = TimmWrapperImageProcessor.from_pretrained(vision_folder)
    processor.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=WORK / "imagenet-wordnet-dual")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--pair_weight", type=float, default=1.0, help="Weight of the 21k lemma-gloss loss (0: off).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log_every", type=int, default=250)
    parser.add_argument("--watch", action="store_true", help="Log zero-shot accuracy on Fashion-MNIST validation.")
    parser.add_argument("--watch_size", type=int, default=128)
    parser.add_argument("--watch_per_class", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)  # 2 shared cores: one thread steps faster than two contending
    print(write(args.out, args))


if __name__ == "__main__":
    main()
