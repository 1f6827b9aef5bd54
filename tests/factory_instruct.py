"""Small random InstructBLIP checkpoints in the hub layout, built with the reference library.

The layout of ``Salesforce/instructblip-flan-t5-xl`` / ``-vicuna-7b``: ``InstructBlipForConditionalGeneration``
with a Flan-T5 or a LLaMA language model, the language model's tokenizer at the top level and the
Q-Former's BERT tokenizer in ``qformer_tokenizer/``. Weights are re-drawn as in ``factory.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from factory import (
    _bert_tokenizer,
    _t5_tokenizer,
    make_sentences,
    redraw_parameters,
    reference_image_processor,
    reference_t5_config,
)


def _llama_tokenizer(sentences: list[str], vocab_size: int = 500):
    """A LLaMA-style BPE with byte fallback (``<0x00>``..``<0xFF>``) that puts ``<s>`` in front of every text."""
    from transformers import LlamaTokenizer

    tok = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens], show_progress=False
    )
    tok.train_from_iterator(sentences, trainer=trainer)
    spec = json.loads(tok.to_str())
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["model"]["merges"]]
    tokenizer = LlamaTokenizer(vocab=spec["model"]["vocab"], merges=merges, legacy=False, add_bos_token=True)
    # Vicuna has no pad token; the InstructBLIP repos use <unk> for padding
    tokenizer.pad_token = "<unk>"
    assert tokenizer("a").input_ids[0] == tokenizer.bos_token_id
    return tokenizer


def reference_llama_config(tokenizer, **shape):
    """The reference's LlamaConfig for a Vicuna of this ``shape`` (SwiGLU, RMSNorm, untied head)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        **shape,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_bias=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_instruct_checkpoint(
    out_dir: Path,
    *,
    lm: str = "llama",
    seed: int = 0,
    image_size: int = 28,
    patch_size: int = 7,
    vision_hidden: int = 48,
    vision_layers: int = 2,
    vision_heads: int = 4,
    qformer_hidden: int = 32,
    qformer_layers: int = 2,
    qformer_heads: int = 4,
    num_query_tokens: int = 4,
    lm_hidden: int = 32,
    lm_layers: int = 2,
    lm_heads: int = 4,
    lm_kv_heads: int | None = None,
) -> Path:
    """Build a small random InstructBLIP checkpoint (``lm`` "llama" or "t5") under ``out_dir``."""
    from transformers import (
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
    )

    if lm not in ("llama", "t5"):
        raise ValueError(f"lm must be 'llama' or 't5', got {lm!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sentences = make_sentences()
    tokenizer = _llama_tokenizer(sentences) if lm == "llama" else _t5_tokenizer(sentences)
    qformer_tokenizer = _bert_tokenizer(sentences)
    image_processor = reference_image_processor(image_size)
    processor = InstructBlipProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=num_query_tokens,
    )  # adds <image> to the tokenizer
    vocab = len(tokenizer)
    vision = InstructBlipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        layer_norm_eps=1e-6,
        qkv_bias=True,
    )
    qformer = InstructBlipQFormerConfig(
        vocab_size=len(qformer_tokenizer),
        hidden_size=qformer_hidden,
        num_hidden_layers=qformer_layers,
        num_attention_heads=qformer_heads,
        intermediate_size=2 * qformer_hidden,
        cross_attention_frequency=2,
        max_position_embeddings=64,
        encoder_hidden_size=vision_hidden,
        pad_token_id=qformer_tokenizer.pad_token_id,
    )
    if lm == "llama":
        text = reference_llama_config(
            tokenizer,
            vocab_size=vocab,
            hidden_size=lm_hidden,
            intermediate_size=3 * lm_hidden,
            num_hidden_layers=lm_layers,
            num_attention_heads=lm_heads,
            num_key_value_heads=lm_kv_heads or lm_heads,
            max_position_embeddings=128,
        )
    else:
        text = reference_t5_config(
            vocab_size=vocab,
            d_model=lm_hidden,
            d_kv=lm_hidden // lm_heads,
            d_ff=2 * lm_hidden,
            num_layers=lm_layers,
            num_heads=lm_heads,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=20,
        )
    config = InstructBlipConfig(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config).eval()
    redraw_parameters(model, seed)
    if lm == "t5" or not text.tie_word_embeddings:
        # an untied head of its own (5.23 may build it tied to the embedding)
        head = model.language_model.get_output_embeddings()
        if head.weight is model.language_model.get_input_embeddings().weight:
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
        gen = torch.Generator().manual_seed(seed + 7919)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) / lm_hidden**0.5)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    if lm == "t5":
        path = out_dir / "config.json"
        data = json.loads(path.read_text())
        data["text_config"]["tie_word_embeddings"] = False
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_instruct_reference(path: Path):
    """(reference InstructBLIP in float32 eval mode, its processor)."""
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    model = InstructBlipForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, InstructBlipProcessor.from_pretrained(str(path))


__all__ = ["build_instruct_checkpoint", "load_instruct_reference", "processors"]
