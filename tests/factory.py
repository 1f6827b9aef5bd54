"""Small random BLIP-2 checkpoints in the Hugging Face hub layout, built with the reference library.

`build_checkpoint` writes a directory that `transformers` (and `blip2.load`) can read: config.json,
weights (safetensors or `.bin`, optionally sharded), generation_config.json, the tokenizer files and
the processor / preprocessor configs. Weights are re-drawn at a scale where outputs depend on the
input (the reference's own init is std 0.02 with zero query tokens, which makes parity tests vacuous).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
LM_HEAD = "language_model.lm_head.weight"
LM_EMBED = "language_model.model.decoder.embed_tokens.weight"

# ----------------------------------------------------------------------------- sentences

_COLOURS = [
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "orange",
    "purple",
    "brown",
    "grey",
    "pink",
    "golden",
]
_SHAPES = [
    "cube",
    "ball",
    "cone",
    "square",
    "circle",
    "triangle",
    "box",
    "ring",
    "star",
    "disk",
    "pyramid",
    "cylinder",
]
_ANIMALS = [
    "cat",
    "dog",
    "bird",
    "horse",
    "cow",
    "fish",
    "sheep",
    "mouse",
    "bear",
    "duck",
    "zebra",
    "giraffe",
    "elephant",
    "monkey",
    "rabbit",
    "turtle",
]
_PLACES = [
    "on the table",
    "in the grass",
    "near a tree",
    "under the bed",
    "by the river",
    "in a room",
    "on a beach",
    "in the kitchen",
    "beside the window",
    "across the street",
    "inside a garden",
]
_COUNTS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_VERBS = [
    "sits",
    "runs",
    "sleeps",
    "jumps",
    "stands",
    "plays",
    "eats",
    "swims",
    "climbs",
    "watches",
    "carries",
]


def make_sentences(n: int = 800, seed: int = 0) -> list[str]:
    """Deterministic made-up English captions, questions and answers (training text for tokenizers)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c, s, a = rng.choice(_COLOURS), rng.choice(_SHAPES), rng.choice(_ANIMALS)
        p, k, v = rng.choice(_PLACES), rng.choice(_COUNTS), rng.choice(_VERBS)
        kind = i % 8
        if kind == 0:
            out.append(f"a {c} {s} {p}.")
        elif kind == 1:
            out.append(f"what colour is the {s}?")
        elif kind == 2:
            out.append(f"Question: how many {a}s are there? Answer: {k}")
        elif kind == 3:
            out.append(f"the {a} {v} {p} next to a {c} {s}.")
        elif kind == 4:
            out.append(f"There are {k} {c} {s}s and a {a}.")
        elif kind == 5:
            out.append(f"Is the {a} {c}? Yes, it is {c}.")
        elif kind == 6:
            out.append(f"A photo of {k} {a}s, {v} {p}!")
        else:
            out.append(f"Where is the {c} {a}? It {v} {p}.")
    return out


# ----------------------------------------------------------------------------- tokenizers


def _opt_tokenizer(sentences: list[str], vocab_size: int = 400):
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # OPT's layout: <s>=0, <pad>=1, </s>=2, <unk>=3; </s> doubles as BOS
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sentences, trainer=trainer)
    bos_id = tok.token_to_id("</s>")
    # released OPT tokenizers prepend </s> to every text (add_bos_token=True in the slow tokenizer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", bos_id)]
    )
    return GPT2TokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
        add_prefix_space=False,
    )


def _t5_tokenizer(sentences: list[str], vocab_size: int = 300):
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(sentences, trainer=trainer)
    # the trainer's piece set is stable, but the scores it gives single characters (appended with
    # small hash-ordered decrements) and the last bits of the others change from run to run:
    # fix the character scores, round the rest, and put the pieces in a canonical order
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    rest = [(p, -20.0 if len(p) == 1 else round(sc, 4)) for p, sc in vocab[3:]]
    rest.sort(key=lambda x: (-x[1], x[0]))
    spec["model"]["vocab"] = [[p, sc] for p, sc in vocab[:3]] + [[p, sc] for p, sc in rest]
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return T5TokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )


def _bert_tokenizer(sentences: list[str], held_out: int = 20):
    """BERT-uncased style WordPiece (the demo's builder), leaving out the ``held_out`` rarest words so
    that some words split into pieces."""
    from transformers import BertTokenizerFast

    from blip2.demo.checkpoint import bert_tokenizer

    tok = bert_tokenizer(sentences, alphabet="", held_out=held_out)
    return BertTokenizerFast(tokenizer_object=tok, do_lower_case=True)


# ----------------------------------------------------------------------------- weights


@torch.no_grad()
def redraw_parameters(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every floating parameter at a scale where outputs depend on the input.

    Linear/conv weights ~ N(0, 1/fan_in); biases ~ N(0, 0.1^2); norm weights ~ 1 + N(0, 0.1^2);
    embeddings (incl. T5 relative attention bias, vision positions/class token) and query tokens ~ N(0, 1).
    Tied parameters are drawn once (named_parameters de-duplicates them).
    """
    gen = torch.Generator().manual_seed(seed)
    norm_params, embed_params = set(), set()
    for module in model.modules():
        cls = type(module).__name__
        if isinstance(module, torch.nn.LayerNorm) or "LayerNorm" in cls or "RMSNorm" in cls:
            norm_params.update(id(p) for p in module.parameters(recurse=False))
        elif isinstance(module, torch.nn.Embedding):
            embed_params.update(id(p) for p in module.parameters(recurse=False))

    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        leaf = name.rsplit(".", 1)[-1]
        if id(p) in norm_params:
            noise = torch.randn(p.shape, generator=gen) * 0.1
            value = noise + 1.0 if leaf == "weight" else noise
        elif (
            id(p) in embed_params
            or name == "query_tokens"
            or leaf in ("class_embedding", "position_embedding")
        ):
            value = torch.randn(p.shape, generator=gen)
        elif p.dim() >= 2:
            fan_in = math.prod(p.shape[1:])
            value = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
        else:
            value = torch.randn(p.shape, generator=gen) * 0.1
        p.copy_(value.to(p.dtype))


OPT_GAIN = 3.0  # the OPT decoder's query projections and residual writers, over redraw_parameters' scale


@torch.no_grad()
def sharpen_opt(model: torch.nn.Module, gain: float = OPT_GAIN) -> None:
    """Scale the OPT decoder's ``q_proj``, ``out_proj`` and ``fc2`` weights by ``gain``.

    At the plain scale the image barely reaches the text: the tied head scores every token against the
    last position's residual, which is mostly that position's own embedding (the model repeats its input
    token), and attention scores of std ~1 spread evenly over image and text positions. Sharper queries
    make attention pick positions by content, and stronger writers outweigh the input embedding, so the
    generated text depends on the image for most prompts.
    """
    for name, p in model.named_parameters():
        if name.startswith("language_model.") and name.endswith(
            ("self_attn.q_proj.weight", "self_attn.out_proj.weight", "fc2.weight")
        ):
            p.mul_(gain)


def _shard(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if max_bytes is None:
        return [state]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def _parse_size(s: str) -> int:
    s = s.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def read_state(out_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, whatever its file layout."""
    out_dir = Path(out_dir)
    files = sorted(out_dir.glob("*.safetensors")) or sorted(out_dir.glob("pytorch_model*.bin"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            state.update(load_file(str(f)))
        else:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def _write_weights(
    out_dir: Path, state: dict[str, torch.Tensor], fmt: str, max_shard_size: str | None
) -> None:
    """Write `state` as the hub does: one file, or shards `<stem>-0000i-of-0000n.<ext>` plus an index."""
    for f in [
        *out_dir.glob("*.safetensors"),
        *out_dir.glob("pytorch_model*.bin"),
        *out_dir.glob("*.index.json"),
    ]:
        f.unlink()
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    # contiguous, unshared copies: safetensors refuses shared storage
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    shards = _shard(state, None if max_shard_size is None else _parse_size(max_shard_size))

    def dump(tensors: dict[str, torch.Tensor], path: Path) -> None:
        if fmt == "safetensors":
            save_file(tensors, str(path), metadata={"format": "pt"})
        else:
            torch.save(tensors, path)

    if len(shards) == 1:
        dump(shards[0], out_dir / f"{stem}.{ext}")
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
        dump(shard, out_dir / fname)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _edit_json(path: Path, fn) -> None:
    if path.exists():
        data = json.loads(path.read_text())
        fn(data)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- build


def reference_opt_config(tokenizer, **shape):
    """The reference's OPTConfig for a BLIP-2 OPT of this ``shape`` (pre-LN, ReLU, tied head, no dropout)."""
    from transformers import OPTConfig

    return OPTConfig(
        **shape,
        word_embed_proj_dim=shape["hidden_size"],
        do_layer_norm_before=True,
        activation_function="relu",
        dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def reference_t5_config(**shape):
    """The reference's T5Config for a Flan-T5 of this ``shape`` (gated GELU, untied head, no dropout)."""
    from transformers import T5Config

    return T5Config(
        **shape,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def reference_image_processor(image_size: int):
    """The reference's BLIP image processor (bicubic resize, CLIP normalisation) for square images."""
    from transformers import BlipImageProcessor

    return BlipImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=3,  # PIL bicubic
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )


def build_checkpoint(
    out_dir: Path,
    *,
    lm: str | None = "opt",
    retrieval: bool = False,
    seed: int = 0,
    image_size: int = 28,
    patch_size: int = 7,
    vision_hidden: int = 48,
    vision_layers: int = 2,
    vision_heads: int = 4,
    qformer_hidden: int = 32,
    qformer_layers: int = 2,
    qformer_heads: int = 4,
    cross_attention_frequency: int = 2,
    num_query_tokens: int = 4,
    lm_hidden: int = 32,
    lm_layers: int = 2,
    lm_heads: int = 4,
    t5_decoder_layers: int | None = None,
    legacy_config: bool = False,
    weights_format: str = "safetensors",
    max_shard_size: str | None = None,
    drop_lm_head: bool = False,
    legacy_preprocessor: bool = True,
    image_text_hidden: int = 16,
) -> Path:
    """Build a small random BLIP-2 checkpoint under `out_dir` and return `out_dir`.

    `lm` is "opt" or "t5" for Blip2ForConditionalGeneration; `retrieval=True` (lm ignored, may be None)
    gives the Blip2ForImageTextRetrieval layout of `Salesforce/blip2-itm-vit-g` with a BERT WordPiece tokenizer.
    The same `seed` gives bit-identical tensors whatever the file options (`legacy_config`,
    `weights_format`, `max_shard_size`, `drop_lm_head`, `legacy_preprocessor`).
    """
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2ForImageTextRetrieval,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
    )

    if retrieval:
        lm = None
    if lm not in ("opt", "t5", None):
        raise ValueError(f"lm must be 'opt', 't5' or None, got {lm!r}")
    if lm is None and not retrieval:
        raise ValueError("lm=None needs retrieval=True")
    if weights_format not in ("safetensors", "bin"):
        raise ValueError(f"weights_format must be 'safetensors' or 'bin', got {weights_format!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    sentences = make_sentences()
    tokenizer = {"opt": _opt_tokenizer, "t5": _t5_tokenizer, None: _bert_tokenizer}[lm](sentences)
    image_processor = reference_image_processor(image_size)
    generation = not retrieval
    processor = Blip2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_query_tokens=num_query_tokens if generation and not legacy_config else None,
    )  # adds <image> to the tokenizer
    vocab = len(tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    vision = Blip2VisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        layer_norm_eps=1e-6,
        qkv_bias=True,
    )
    qformer = Blip2QFormerConfig(
        vocab_size=vocab if retrieval else 30522,
        hidden_size=qformer_hidden,
        num_hidden_layers=qformer_layers,
        num_attention_heads=qformer_heads,
        intermediate_size=2 * qformer_hidden,
        cross_attention_frequency=cross_attention_frequency,
        max_position_embeddings=64,
        encoder_hidden_size=vision_hidden,
        use_qformer_text_input=retrieval,
        pad_token_id=0,
    )
    if lm == "opt":
        text = reference_opt_config(
            tokenizer,
            vocab_size=vocab,
            hidden_size=lm_hidden,
            num_hidden_layers=lm_layers,
            num_attention_heads=lm_heads,
            ffn_dim=4 * lm_hidden,
            max_position_embeddings=128,
        )
    elif lm == "t5":
        text = reference_t5_config(
            vocab_size=vocab,
            d_model=lm_hidden,
            d_kv=lm_hidden // lm_heads,
            d_ff=2 * lm_hidden,
            num_layers=lm_layers,
            num_decoder_layers=t5_decoder_layers if t5_decoder_layers is not None else lm_layers,
            num_heads=lm_heads,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=20,
        )
    else:
        text = None
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict() if text is not None else None,
        num_query_tokens=num_query_tokens,
        image_text_hidden_size=image_text_hidden,
        image_token_index=image_token_id if generation else None,
    )

    torch.manual_seed(seed)
    model_cls = Blip2ForImageTextRetrieval if retrieval else Blip2ForConditionalGeneration
    model = model_cls(config).eval()
    redraw_parameters(model, seed)
    if lm == "opt":
        sharpen_opt(model)
        assert model.language_model.lm_head.weight is model.language_model.get_input_embeddings().weight
    extra: dict[str, torch.Tensor] = {}
    if lm == "t5":
        # 5.23 builds T5 with lm_head tied to `shared` whatever the config says, and unties on load when
        # the file holds a different lm_head: write an independent (Flan-T5 style, untied) lm_head ourselves.
        gen = torch.Generator().manual_seed(seed + 7919)
        extra[LM_HEAD] = torch.randn(vocab, lm_hidden, generator=gen) / math.sqrt(lm_hidden)

    model.save_pretrained(out_dir, max_shard_size=max_shard_size or "50GB")
    processor.save_pretrained(out_dir)

    # tensors as written, re-written in the requested form (format, shards, lm_head present or not)
    state = read_state(out_dir)
    state.update(extra)
    if lm == "opt":
        if drop_lm_head:
            state.pop(LM_HEAD, None)
        elif LM_HEAD not in state:
            state[LM_HEAD] = state[LM_EMBED]
    _write_weights(out_dir, state, weights_format, max_shard_size)

    if legacy_preprocessor:
        pre = {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": OPENAI_CLIP_MEAN,
            "image_processor_type": "BlipImageProcessor",
            "image_std": OPENAI_CLIP_STD,
            "processor_class": "Blip2Processor",
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"height": image_size, "width": image_size},
        }
        (out_dir / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    if lm == "t5":
        # the released Flan-T5 configs say tie_word_embeddings=false (5.23 writes true and scale_decoder_outputs=false)
        _edit_json(out_dir / "config.json", lambda d: d["text_config"].update(tie_word_embeddings=False))
    if legacy_config:
        _edit_json(out_dir / "config.json", lambda d: d.pop("image_token_index", None))
        for name in ("processor_config.json", "preprocessor_config.json"):
            _edit_json(out_dir / name, lambda d: d.pop("num_query_tokens", None))
    return out_dir


# ----------------------------------------------------------------------------- helpers


def load_reference(path: Path):
    """(reference model in float32 eval mode, reference processor) for a factory checkpoint."""
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Processor

    config = json.loads((Path(path) / "config.json").read_text())
    archs = config.get("architectures") or []
    cls = (
        Blip2ForImageTextRetrieval if "Blip2ForImageTextRetrieval" in archs else Blip2ForConditionalGeneration
    )
    model = cls.from_pretrained(str(path), dtype=torch.float32).eval()
    processor = Blip2Processor.from_pretrained(str(path))
    return model, processor


def make_images(n: int, size: int = 28, seed: int = 0) -> list[Image.Image]:
    """`n` distinct random RGB images: coloured background, noise, a few random shapes."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        base = rng.integers(0, 256, size=3)
        arr = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = (int(v) for v in rng.integers(0, size // 2, size=2))
            x1, y1 = (int(v) for v in rng.integers(size // 2, size, size=2))
            fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
        images.append(img)
    return images
