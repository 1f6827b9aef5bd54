"""Writing the demo's hub-layout checkpoints: config.json, weights, tokenizers, processor and generation files.

Two layouts, as the released checkpoints: ``Blip2ForImageTextRetrieval`` (stage 1: vision encoder,
Q-Former with its text branch, ITC/ITM heads, a BERT-style WordPiece tokenizer) and
``Blip2ForConditionalGeneration`` (stage 2: vision encoder, Q-Former, projection, OPT, a byte-level BPE
tokenizer that prepends ``</s>`` as OPT's does). Tensor names come from :func:`blip2.models.weights.hub_name`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from ..models.blip2 import Blip2
from ..models.config import CLIP_MEAN, CLIP_STD, Blip2Config
from ..models.weights import hub_tensors, save_safetensors
from ..processor import IMAGE_TOKEN

OPT_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0..3; </s> is BOS and EOS
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# ---- tokenizers -------------------------------------------------------------------------------------


def opt_tokenizer(corpus: list[str]) -> Tokenizer:
    """Byte-level BPE trained on the scene text until every word is one token; ``</s>`` prepended."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,  # an upper bound: merging stops once every word is a single token
        special_tokens=OPT_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sorted(set(corpus)), trainer=trainer)
    bos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", bos)]
    )
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    return tok


def bert_tokenizer(
    corpus: list[str], alphabet: str = "abcdefghijklmnopqrstuvwxyz0123456789", held_out: int = 0
) -> Tokenizer:
    """Uncased WordPiece holding every word of ``corpus`` whole but the ``held_out`` rarest.

    Every character of the corpus and of ``alphabet``, alone and as a ``##`` continuation, is a
    piece too, so nothing is unknown. The vocabulary is counted here, not by ``WordPieceTrainer``,
    whose result changes from run to run (hash-ordered ties).
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts = Counter(w for s in corpus for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(s)))
    chars = sorted({c for w in counts for c in w} | set(alphabet))
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    pieces = [*BERT_SPECIALS, *chars, *("##" + c for c in chars), *words[: len(words) - held_out]]
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return tok


OPT_TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": "</s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "errors": "replace",
    "processor_class": "Blip2Processor",
    "tokenizer_class": "GPT2Tokenizer",
}
BERT_TOKENIZER_CONFIG = {
    "cls_token": "[CLS]",
    "do_lower_case": True,
    "mask_token": "[MASK]",
    "pad_token": "[PAD]",
    "processor_class": "Blip2Processor",
    "sep_token": "[SEP]",
    "strip_accents": None,
    "tokenize_chinese_chars": True,
    "tokenizer_class": "BertTokenizer",
    "unk_token": "[UNK]",
}


# ---- processor ---------------------------------------------------------------------------------------


def processor_dict(cfg: Blip2Config) -> dict:
    size = cfg.vision.image_size
    d = {
        "image_processor": {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD),
            "image_processor_type": "BlipImageProcessor",
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"height": size, "width": size},
        },
        "processor_class": "Blip2Processor",
    }
    if not cfg.retrieval:
        d["num_query_tokens"] = cfg.num_query_tokens
    return d


# ---- writing ------------------------------------------------------------------------------------------


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_checkpoint(
    model: Blip2, out: str | os.PathLike, tokenizer: Tokenizer, max_new_tokens: int = 40
) -> Path:
    """``model`` as a hub-layout folder: config, float32 safetensors, tokenizer, processor, generation config."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    save_safetensors(hub_tensors(model, cfg), out / "model.safetensors")
    _dump(out / "config.json", cfg.to_dict())
    _dump(out / "processor_config.json", processor_dict(cfg))
    tokenizer.save(str(out / "tokenizer.json"))
    _dump(out / "tokenizer_config.json", BERT_TOKENIZER_CONFIG if cfg.retrieval else OPT_TOKENIZER_CONFIG)
    if not cfg.retrieval:
        text = cfg.text
        _dump(
            out / "generation_config.json",
            {
                "bos_token_id": text.bos_token_id,
                "eos_token_id": text.eos_token_id,
                "pad_token_id": text.pad_token_id,
                "max_new_tokens": max_new_tokens,
            },
        )
    return out


CHECKPOINT_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "processor_config.json",
    "generation_config.json",
)


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """The checkpoint files of a training output (no training state or logs) into ``dst``."""
    import shutil

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return dst


@torch.no_grad()
def init_fresh(module: torch.nn.Module) -> None:
    """Fresh layers at unit scale: linear weights normal(0, 1/fan_in), zero biases, embeddings normal(0, 0.02),
    norms at identity. BERT's std 0.02 (LAVIS starts from a trained BERT instead) leaves a from-scratch
    Q-Former's cross-attention almost uniform, so it learns *what* is in the image but not *where*."""
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.normal_(0.0, m.in_features**-0.5)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, torch.nn.Embedding):
            m.weight.normal_(0.0, 0.02)
        elif isinstance(m, torch.nn.LayerNorm) and m.elementwise_affine:
            m.weight.fill_(1.0)
            m.bias.zero_()
