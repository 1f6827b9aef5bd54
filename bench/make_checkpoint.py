"""Write a random-weight BLIP-2 checkpoint in the hub layout, in a real model's shapes.

    python bench/make_checkpoint.py --shape small      # ViT-B/14 224 px, BERT-base Q-Former, OPT-350m-sized
    python bench/make_checkpoint.py --shape opt-2.7b   # Salesforce/blip2-opt-2.7b shapes (15.5 GB float32)
    python bench/make_checkpoint.py --shape flan-t5-xl # Salesforce/blip2-flan-t5-xl shapes (15.5 GB float32)
    python bench/make_checkpoint.py --shape instructblip-vicuna-1b  # ViT-g + Vicuna-7B layers, 4 of them (8.8 GB)
    python bench/make_checkpoint.py --shape instructblip-vicuna-7b  # Salesforce/instructblip-vicuna-7b (31.5 GB)

The model is built by the reference library on the meta device (so nothing is allocated), then each
tensor is drawn and written shard by shard with safetensors: at most one shard (~1 GB) is in memory.
Scales follow tests/factory.py (linear ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norms ~ 1 + N(0, 0.01)),
so outputs depend on the image and greedy text varies. The tokenizer is the small byte-level BPE /
Unigram of tests/factory.py (InstructBLIP: the LLaMA BPE and the Q-Former's BERT WordPiece of
tests/factory_instruct.py, saved with ``InstructBlipProcessor``); language-model rows past its vocabulary
are drawn 100x smaller, so the (full-size) output layer still costs what it costs but generation picks
tokens that decode to text. Everything is float32 on disk, as the released checkpoints are.
Needs `transformers` (a bench-only dependency).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from factory import (  # noqa: E402
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    _bert_tokenizer,
    _opt_tokenizer,
    _t5_tokenizer,
    make_sentences,
    reference_opt_config,
    reference_t5_config,
)
from factory_instruct import _llama_tokenizer, reference_llama_config  # noqa: E402

VIT_B = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16)
SHAPES = {
    # for dry runs of the benchmarks' code: a narrow, shallow encoder and decoder (the Q-Former is full size)
    "tiny": dict(
        vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
        lm="opt",
        text=dict(hidden_size=128, ffn_dim=512, num_hidden_layers=2, num_attention_heads=4, vocab_size=2048),
    ),
    # OPT-350m's width and depth, but pre-LN with no projection (word_embed_proj_dim = hidden).
    "small": dict(
        vision=VIT_B,
        lm="opt",
        text=dict(
            hidden_size=1024, ffn_dim=4096, num_hidden_layers=24, num_attention_heads=16, vocab_size=50272
        ),
    ),
    "opt-2.7b": dict(
        vision=VIT_G,
        lm="opt",
        text=dict(
            hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32, vocab_size=50272
        ),
    ),
    "flan-t5-xl": dict(
        vision=VIT_G,
        lm="t5",
        text=dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32, vocab_size=32128),
    ),
}
# Vicuna-7B's layers (LLaMA-7B: SwiGLU, 32 heads, no grouped-query attention, vocabulary + <image>)
VICUNA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32001,
    max_position_embeddings=2048,
)
for _name, _layers in (("instructblip-vicuna-1b", 4), ("instructblip-vicuna-7b", 32)):
    SHAPES[_name] = dict(
        vision=VIT_G, lm="llama", instruct=True, text=dict(VICUNA_7B, num_hidden_layers=_layers)
    )
QFORMER_VOCAB = 30523  # bert-base-uncased + [DEC], the instruction-aware Q-Former's embedding rows
DISK_BYTES = {
    "tiny": 0.5e9,
    "small": 1.6e9,
    "instructblip-vicuna-1b": 8.8e9,
    "instructblip-vicuna-7b": 31.5e9,
}
SHARD_BYTES = 1 << 30


def default_dir(shape: str) -> Path:
    return ROOT / "bench" / "checkpoints" / shape


def build_config(shape: str, tokenizer, qformer_tokenizer=None):
    import transformers

    spec = SHAPES[shape]
    family = "InstructBlip" if spec.get("instruct") else "Blip2"
    vision = getattr(transformers, f"{family}VisionConfig")(
        **spec["vision"], image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True
    )
    qformer_text = {}
    if qformer_tokenizer is not None:  # the instruction-aware Q-Former reads the instruction
        qformer_text = dict(vocab_size=QFORMER_VOCAB, pad_token_id=qformer_tokenizer.pad_token_id)
    qformer = getattr(transformers, f"{family}QFormerConfig")(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        cross_attention_frequency=2,
        encoder_hidden_size=spec["vision"]["hidden_size"],
        **qformer_text,
    )
    if spec["lm"] == "opt":
        text = reference_opt_config(tokenizer, **spec["text"], max_position_embeddings=2048)
    elif spec["lm"] == "llama":
        text = reference_llama_config(tokenizer, **spec["text"])
    else:
        text = reference_t5_config(**spec["text"])
    return getattr(transformers, f"{family}Config")(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=32,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )


def draw(name: str, shape: tuple[int, ...], gen: torch.Generator, n_tokens: int) -> torch.Tensor:
    """A tensor for hub tensor ``name``, on the generator's device."""
    leaf = name.rsplit(".", 1)[-1]
    lname = name.lower()

    def randn() -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=gen.device)

    if "layernorm" in lname or "layer_norm" in lname or name.endswith("norm.weight"):  # LLaMA's final `norm`
        noise = randn() * 0.1
        return noise + 1.0 if leaf == "weight" else noise
    if any(k in name for k in ("embed", "shared", "relative_attention_bias", "query_tokens")) or leaf in (
        "class_embedding",
        "position_embedding",
    ):
        t = randn()
        if ("embed_tokens" in name or "shared" in name) and shape[0] > n_tokens:
            t[n_tokens:] *= 0.01  # rows the tokenizer cannot decode: kept, but rarely chosen
        return t
    if len(shape) >= 2:
        t = randn() / math.sqrt(math.prod(shape[1:]))
        if name.endswith("lm_head.weight") and shape[0] > n_tokens:
            t[n_tokens:] *= 0.01
        return t
    return randn() * 0.1


def write(
    shape: str, out: Path, seed: int = 0, device: str = "cpu", file_dtype: torch.dtype | None = None
) -> Path:
    """Write the checkpoint; ``device``: where the numbers are drawn (a GPU draws 15 GB in seconds),
    ``file_dtype``: the floats' dtype in the files (default float32, as the reference builds them)."""
    import transformers
    from transformers import BlipImageProcessor

    spec = SHAPES[shape]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    sentences = make_sentences(2000)
    make_tokenizer = {"opt": _opt_tokenizer, "llama": _llama_tokenizer}.get(spec["lm"])
    tokenizer = make_tokenizer(sentences, 1000) if make_tokenizer else _t5_tokenizer(sentences, 600)
    image_processor = BlipImageProcessor(
        size={"height": 224, "width": 224},
        resample=3,
        rescale_factor=1 / 255,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )
    if spec.get("instruct"):
        qformer_tokenizer = _bert_tokenizer(sentences)
        processor = transformers.InstructBlipProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            qformer_tokenizer=qformer_tokenizer,
            num_query_tokens=32,
        )
        model_class = transformers.InstructBlipForConditionalGeneration
    else:
        qformer_tokenizer = None
        processor = transformers.Blip2Processor(
            image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=32
        )
        model_class = transformers.Blip2ForConditionalGeneration
    n_tokens = len(tokenizer)  # the processor has added <image>
    config = build_config(shape, tokenizer, qformer_tokenizer)
    with torch.device("meta"):
        model = model_class(config)
    seen: set[int] = set()
    params: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # tied copies: the first name is written (the embedding, not lm_head)
            continue
        seen.add(id(t))
        params.append((name, tuple(t.shape), t.dtype))
    if spec["lm"] == "t5":  # Flan-T5: an untied lm_head of its own
        d = spec["text"]
        params = [p for p in params if p[0] != "language_model.lm_head.weight"]
        params.append(("language_model.lm_head.weight", (d["vocab_size"], d["d_model"]), torch.float32))
    del model

    gen = torch.Generator(device=device).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    files: list[tuple[str, list[str]]] = []
    total = 0

    def flush():
        i = len(files) + 1
        fname = f"model-{i:05d}.safetensors"
        save_file(shards[-1], str(out / fname), metadata={"format": "pt"})
        files.append((fname, list(shards[-1])))
        shards[-1] = {}

    for name, shp, dtype in params:
        t = (
            draw(name, shp, gen, n_tokens).to(dtype=file_dtype or dtype).cpu()
            if dtype.is_floating_point
            else torch.zeros(shp, dtype=dtype)
        )
        if name.endswith("position_ids"):
            t = torch.arange(shp[-1]).expand(shp).contiguous()
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > SHARD_BYTES:
            flush()
            size = 0
        shards[-1][name] = t
        size += n
        total += n
    flush()
    # hub names: model-0000i-of-0000n.safetensors
    weight_map = {}
    for i, (fname, names) in enumerate(files, 1):
        final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        (out / fname).rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    config.save_pretrained(out)
    if spec["lm"] == "t5":
        data = json.loads((out / "config.json").read_text())
        data["text_config"]["tie_word_embeddings"] = False
        (out / "config.json").write_text(json.dumps(data, indent=2) + "\n")
    text = config.text_config
    gen_cfg = {"eos_token_id": text.eos_token_id, "pad_token_id": text.pad_token_id}
    if spec["lm"] == "t5":  # T5 has no BOS: the decoder starts from its start token
        gen_cfg["decoder_start_token_id"] = text.decoder_start_token_id
    else:
        gen_cfg["bos_token_id"] = text.bos_token_id
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    processor.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/checkpoints/<shape>")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = args.out or default_dir(args.shape)
    free = shutil.disk_usage(out.parent if out.parent.exists() else ROOT).free
    need = DISK_BYTES.get(args.shape, 16.5e9)
    if free < need * 1.2:
        sys.exit(f"not enough disk for {args.shape}: {free / 1e9:.1f} GB free, ~{need / 1e9:.1f} GB needed")
    t0 = time.perf_counter()
    write(args.shape, out, args.seed)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
