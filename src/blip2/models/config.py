"""Model configuration: frozen dataclasses read from (and written as) a checkpoint's ``config.json``.

The hub's ``config.json`` (current form with ``image_token_index``, and the older form without it) is
translated once, here, into our own field names; no other module reads or writes the hub's keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..json_fields import JsonFields, is_integer

# The activation functions a config may name (``layers.ACTIVATIONS`` holds them); a plain tuple here, so
# that reading a config needs no torch.
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu", "relu", "silu")

# Architectures we can build, keyed by the hub's class name.
GENERATION_ARCHITECTURES = {"Blip2ForConditionalGeneration", "Blip2Model"}
# InstructBLIP: the same parts, with a Q-Former that also reads the instruction.
INSTRUCT_ARCHITECTURES = {"InstructBlipForConditionalGeneration", "InstructBlipModel"}
RETRIEVAL_ARCHITECTURES = {"Blip2ForImageTextRetrieval"}

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    """EVA-style ViT (ViT-g/14 in the released checkpoints)."""

    hidden_size: int = 1408
    num_layers: int = 39
    num_heads: int = 16
    mlp_size: int = 6144
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    activation: str = "gelu"


@dataclass(frozen=True)
class QFormerConfig:
    """BERT-base Q-Former: learned queries cross-attending to the image every few layers."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_size: int = 3072
    layer_norm_eps: float = 1e-12
    cross_attention_every: int = 2
    encoder_hidden_size: int = 1408
    activation: str = "gelu"
    has_text_input: bool = False  # word/position embeddings and the text feed-forward
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    pad_token_id: int = 0


@dataclass(frozen=True)
class OPTConfig:
    """OPT decoder-only language model (facebook/opt-2.7b and friends)."""

    vocab_size: int = 50272
    hidden_size: int = 2560
    num_layers: int = 32
    num_heads: int = 32
    mlp_size: int = 10240
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int = 2560
    pre_norm: bool = True  # do_layer_norm_before
    final_norm: bool = True
    bias: bool = True
    norm_affine: bool = True
    activation: str = "relu"
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | None = 2
    pad_token_id: int | None = 1

    kind = "opt"


@dataclass(frozen=True)
class T5Config:
    """T5 v1.1 / Flan-T5 encoder-decoder."""

    vocab_size: int = 32128
    hidden_size: int = 2048
    head_dim: int = 64
    num_heads: int = 32
    mlp_size: int = 5120
    num_layers: int = 24
    num_decoder_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_eps: float = 1e-6
    gated: bool = True
    activation: str = "gelu_new"
    tie_word_embeddings: bool = False
    scale_decoder_outputs: bool = False  # original T5 scales by d_model**-0.5 before a tied lm_head
    decoder_start_token_id: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = 1
    pad_token_id: int | None = 0

    kind = "t5"


@dataclass(frozen=True)
class LlamaConfig:
    """LLaMA decoder-only language model (lmsys/vicuna-7b-v1.1 and friends in InstructBLIP)."""

    vocab_size: int = 32001
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    mlp_size: int = 11008
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    activation: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 0

    kind = "llama"


@dataclass(frozen=True)
class Blip2Config:
    """The whole model: vision → Q-Former → projection → language model (or retrieval heads)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    text: OPTConfig | T5Config | LlamaConfig | None = field(default_factory=OPTConfig)
    num_query_tokens: int = 32
    image_token_index: int | None = None  # None: the image prefix is prepended (older configs)
    image_text_hidden_size: int = 256
    retrieval: bool = False  # Blip2ForImageTextRetrieval layout (no language model)
    instruction_aware: bool = False  # InstructBLIP: the Q-Former reads the prompt beside its queries

    @property
    def is_encoder_decoder(self) -> bool:
        return isinstance(self.text, T5Config)

    @property
    def is_decoder_only(self) -> bool:
        return isinstance(self.text, OPTConfig | LlamaConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Blip2Config:
        return _blip2_from_dict(d)

    @classmethod
    def from_file(cls, path: str | Path) -> Blip2Config:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no config.json in this checkpoint folder") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{path}: not a readable JSON config ({e})") from None
        return _blip2_from_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The hub's ``config.json`` for this model (current form), as the reference writes it;
        ``from_dict`` reads it back to an equal config."""
        return _blip2_to_dict(self)


# ---- reading: the hub's keys -> our fields, each value checked ------------------------------------------


def _vision_from_dict(f: JsonFields) -> VisionConfig:
    base = VisionConfig()
    hidden = f.integer("hidden_size", default=base.hidden_size, min=1)
    heads = f.integer("num_attention_heads", default=base.num_heads, min=1)
    f.divisible("hidden_size", "num_attention_heads", hidden, heads)
    image_size = f.integer("image_size", default=base.image_size, min=1, listed=True)
    patch_size = f.integer("patch_size", default=base.patch_size, min=1, listed=True)
    if patch_size > image_size:
        raise f.fail("patch_size", f"at most the image size ({image_size})")
    return VisionConfig(
        hidden_size=hidden,
        num_layers=f.integer("num_hidden_layers", default=base.num_layers, min=1),
        num_heads=heads,
        mlp_size=f.integer("intermediate_size", default=base.mlp_size, min=1),
        image_size=image_size,
        patch_size=patch_size,
        layer_norm_eps=f.number("layer_norm_eps", default=base.layer_norm_eps, positive=True),
        qkv_bias=f.flag("qkv_bias", default=base.qkv_bias),
        activation=f.text("hidden_act", default=base.activation, choices=ACTIVATIONS),
    )


def _qformer_from_dict(f: JsonFields, vision: VisionConfig, reads_text: bool) -> QFormerConfig:
    """``reads_text``: whether the layout has the text branch when the config does not say (retrieval
    and InstructBLIP checkpoints do)."""
    base = QFormerConfig()
    hidden = f.integer("hidden_size", default=base.hidden_size, min=1)
    heads = f.integer("num_attention_heads", default=base.num_heads, min=1)
    f.divisible("hidden_size", "num_attention_heads", hidden, heads)
    vocab = f.integer("vocab_size", default=base.vocab_size, min=1)
    return QFormerConfig(
        hidden_size=hidden,
        num_layers=f.integer("num_hidden_layers", default=base.num_layers, min=1),
        num_heads=heads,
        mlp_size=f.integer("intermediate_size", default=base.mlp_size, min=1),
        layer_norm_eps=f.number("layer_norm_eps", default=base.layer_norm_eps, positive=True),
        cross_attention_every=f.integer(
            "cross_attention_frequency", default=base.cross_attention_every, min=1
        ),
        encoder_hidden_size=vision.hidden_size,
        activation=f.text("hidden_act", default=base.activation, choices=ACTIVATIONS),
        has_text_input=f.flag("use_qformer_text_input", default=reads_text),
        vocab_size=vocab,
        max_position_embeddings=f.integer(
            "max_position_embeddings", default=base.max_position_embeddings, min=1
        ),
        pad_token_id=f.integer("pad_token_id", default=base.pad_token_id, min=0),
    )


def _opt_from_dict(f: JsonFields) -> OPTConfig:
    base = OPTConfig()
    hidden = f.integer("hidden_size", default=base.hidden_size, min=1)
    heads = f.integer("num_attention_heads", default=base.num_heads, min=1)
    f.divisible("hidden_size", "num_attention_heads", hidden, heads)
    vocab = f.integer("vocab_size", default=base.vocab_size, min=1)
    pre_norm = f.flag("do_layer_norm_before", default=True)
    return OPTConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=f.integer("num_hidden_layers", default=base.num_layers, min=1),
        num_heads=heads,
        mlp_size=f.integer("ffn_dim", default=base.mlp_size, min=1),
        max_position_embeddings=f.integer(
            "max_position_embeddings", default=base.max_position_embeddings, min=1
        ),
        word_embed_proj_dim=f.integer("word_embed_proj_dim", default=hidden, min=1),
        pre_norm=pre_norm,
        final_norm=pre_norm and not f.flag("_remove_final_layer_norm", default=False),
        bias=f.flag("enable_bias", default=True),
        norm_affine=f.flag("layer_norm_elementwise_affine", default=True),
        activation=f.text("activation_function", default="relu", choices=ACTIVATIONS),
        tie_word_embeddings=f.flag("tie_word_embeddings", default=True),
        bos_token_id=f.token_id("bos_token_id", base.bos_token_id),
        eos_token_id=f.token_id("eos_token_id", base.eos_token_id),
        pad_token_id=f.token_id("pad_token_id", base.pad_token_id, vocab_size=vocab),  # an embedding row
    )


def _t5_from_dict(f: JsonFields) -> T5Config:
    base = T5Config()
    ff = f.text("feed_forward_proj", default="gated-gelu")
    gated = ff.startswith("gated-")
    act = ff.split("-")[-1]
    # T5's own config maps "gated-gelu" to the tanh approximation.
    act = "gelu_new" if act == "gelu" else act
    if not f.has("dense_act_fn") and act not in ACTIVATIONS:
        raise f.fail(
            "feed_forward_proj", f"'[gated-]ACTIVATION' with ACTIVATION one of {sorted(ACTIVATIONS)}"
        )
    num_layers = f.integer("num_layers", default=base.num_layers, min=1)
    return T5Config(
        vocab_size=f.integer("vocab_size", default=base.vocab_size, min=1),
        hidden_size=f.integer("d_model", default=base.hidden_size, min=1),
        head_dim=f.integer("d_kv", default=base.head_dim, min=1),
        num_heads=f.integer("num_heads", default=base.num_heads, min=1),
        mlp_size=f.integer("d_ff", default=base.mlp_size, min=1),
        num_layers=num_layers,
        num_decoder_layers=f.integer("num_decoder_layers", default=num_layers, min=1),
        relative_attention_num_buckets=f.integer(
            "relative_attention_num_buckets", default=base.relative_attention_num_buckets, min=1
        ),
        relative_attention_max_distance=f.integer(
            "relative_attention_max_distance", default=base.relative_attention_max_distance, min=1
        ),
        layer_norm_eps=f.number("layer_norm_epsilon", default=base.layer_norm_eps, positive=True),
        gated=f.flag("is_gated_act", default=gated),
        activation=f.text("dense_act_fn", default=act, choices=ACTIVATIONS),
        tie_word_embeddings=f.flag("tie_word_embeddings", default=True),
        scale_decoder_outputs=f.flag(
            "scale_decoder_outputs", default=f.data.get("tie_word_embeddings") is not False
        ),
        decoder_start_token_id=f.integer("decoder_start_token_id", default=0, min=0),
        bos_token_id=f.token_id("bos_token_id", None),
        eos_token_id=f.token_id("eos_token_id", base.eos_token_id),
        pad_token_id=f.token_id("pad_token_id", base.pad_token_id),
    )


def _llama_from_dict(f: JsonFields) -> LlamaConfig:
    base = LlamaConfig()
    hidden = f.integer("hidden_size", default=base.hidden_size, min=1)
    heads = f.integer("num_attention_heads", default=base.num_heads, min=1)
    kv_heads = f.integer("num_key_value_heads", default=heads, min=1)
    if heads % kv_heads:
        raise f.fail("num_key_value_heads", f"a divisor of num_attention_heads ({heads})")
    rope_key = "rope_parameters" if f.has("rope_parameters") else "rope_scaling"
    rope = f.section(rope_key)
    rope_type = rope.text("rope_type", "type", default="default")
    if rope_type != "default":
        raise f.fail(f"{rope_key}.rope_type", "'default' (the only rope type blip2 runs)")
    theta = rope.number("rope_theta", default=None, positive=True)
    if theta is None:
        theta = f.number("rope_theta", default=base.rope_theta, positive=True)
    vocab = f.integer("vocab_size", default=base.vocab_size, min=1)
    eos = f.data.get("eos_token_id")
    if isinstance(
        eos, list
    ):  # several end tokens: the first is the model's own (generation_config.json has all)
        if not eos or not all(is_integer(e) and e >= 0 for e in eos):
            raise f.fail("eos_token_id", "a token id or a non-empty list of them")
        eos = eos[0]
    else:
        eos = f.token_id("eos_token_id", base.eos_token_id)
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=f.integer("num_hidden_layers", default=base.num_layers, min=1),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=f.integer("head_dim", default=hidden // heads, min=1),
        mlp_size=f.integer("intermediate_size", default=base.mlp_size, min=1),
        max_position_embeddings=f.integer(
            "max_position_embeddings", default=base.max_position_embeddings, min=1
        ),
        rms_norm_eps=f.number("rms_norm_eps", default=base.rms_norm_eps, positive=True),
        rope_theta=float(theta),
        activation=f.text("hidden_act", default=base.activation, choices=ACTIVATIONS),
        attention_bias=f.flag("attention_bias", default=False),
        mlp_bias=f.flag("mlp_bias", default=False),
        tie_word_embeddings=f.flag("tie_word_embeddings", default=False),
        bos_token_id=f.token_id("bos_token_id", base.bos_token_id),
        eos_token_id=eos,
        pad_token_id=f.token_id("pad_token_id", base.pad_token_id, vocab_size=vocab),
    )


_KNOWN_ARCHITECTURES = GENERATION_ARCHITECTURES | RETRIEVAL_ARCHITECTURES | INSTRUCT_ARCHITECTURES


def _blip2_from_dict(d: Any, source: str = "config.json") -> Blip2Config:
    f = JsonFields(d, source)
    archs = set(f.texts("architectures"))
    model_type = f.text("model_type")
    known = _KNOWN_ARCHITECTURES
    if model_type not in (None, "blip-2", "blip_2", "instructblip") and not archs & known:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not a BLIP-2 or InstructBLIP checkpoint "
            f"(expected 'blip-2' or 'instructblip' with one of {sorted(known)})"
        )
    unknown = archs - known
    if unknown and not archs & known:
        raise CheckpointError(
            f"{source}: unknown architecture {sorted(unknown)}; blip2 builds {sorted(known)}"
        )
    retrieval = bool(archs & RETRIEVAL_ARCHITECTURES)
    instruct = bool(archs & INSTRUCT_ARCHITECTURES) or model_type == "instructblip"
    vision = _vision_from_dict(f.section("vision_config"))
    qformer = _qformer_from_dict(f.section("qformer_config"), vision, retrieval or instruct)
    text: OPTConfig | T5Config | LlamaConfig | None = None
    if not retrieval:
        tf = f.section("text_config")
        text_type = tf.text("model_type", default="opt")
        if text_type == "opt":
            text = _opt_from_dict(tf)
        elif text_type in ("t5", "mt5", "umt5"):
            text = _t5_from_dict(tf)
        elif text_type == "llama":
            text = _llama_from_dict(tf)
        else:
            raise CheckpointError(
                f"{source}: language model type {text_type!r} is not supported "
                "(blip2 runs 'opt', 't5' and 'llama')"
            )
    return Blip2Config(
        vision=vision,
        qformer=qformer,
        text=text,
        num_query_tokens=f.integer("num_query_tokens", default=32, min=1),
        image_token_index=f.integer("image_token_index", "image_token_id", min=0),
        image_text_hidden_size=f.integer("image_text_hidden_size", default=256, min=1),
        retrieval=retrieval,
        instruction_aware=instruct,
    )


# ---- writing: our fields -> the hub's keys -----------------------------------------------------------


def _encoder_keys(c: VisionConfig | QFormerConfig) -> dict[str, Any]:
    """The keys the vision encoder's and the Q-Former's configs share."""
    return {
        "hidden_size": c.hidden_size,
        "intermediate_size": c.mlp_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "layer_norm_eps": c.layer_norm_eps,
        "hidden_act": c.activation,
    }


def _vision_to_dict(v: VisionConfig) -> dict[str, Any]:
    return {
        "model_type": "blip_2_vision_model",
        **_encoder_keys(v),
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "qkv_bias": v.qkv_bias,
        "attention_dropout": 0.0,
    }


def _qformer_to_dict(q: QFormerConfig) -> dict[str, Any]:
    return {
        "model_type": "blip_2_qformer",
        **_encoder_keys(q),
        "cross_attention_frequency": q.cross_attention_every,
        "encoder_hidden_size": q.encoder_hidden_size,
        "use_qformer_text_input": q.has_text_input,
        "vocab_size": q.vocab_size,
        "max_position_embeddings": q.max_position_embeddings,
        "pad_token_id": q.pad_token_id,
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
    }


def _opt_to_dict(t: OPTConfig) -> dict[str, Any]:
    d = {
        "model_type": "opt",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "ffn_dim": t.mlp_size,
        "max_position_embeddings": t.max_position_embeddings,
        "word_embed_proj_dim": t.word_embed_proj_dim,
        "do_layer_norm_before": t.pre_norm,
        "enable_bias": t.bias,
        "layer_norm_elementwise_affine": t.norm_affine,
        "activation_function": t.activation,
        "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
        "dropout": 0.0,
        "attention_dropout": 0.0,
    }
    if t.pre_norm and not t.final_norm:  # OPT-350m's layout with the final norm taken out
        d["_remove_final_layer_norm"] = True
    return d


def _t5_to_dict(t: T5Config) -> dict[str, Any]:
    return {
        "model_type": "t5",
        "vocab_size": t.vocab_size,
        "d_model": t.hidden_size,
        "d_kv": t.head_dim,
        "num_heads": t.num_heads,
        "d_ff": t.mlp_size,
        "num_layers": t.num_layers,
        "num_decoder_layers": t.num_decoder_layers,
        "relative_attention_num_buckets": t.relative_attention_num_buckets,
        "relative_attention_max_distance": t.relative_attention_max_distance,
        "layer_norm_epsilon": t.layer_norm_eps,
        "feed_forward_proj": ("gated-" if t.gated else "")
        + ("gelu" if t.activation == "gelu_new" else t.activation),
        "dense_act_fn": t.activation,
        "is_gated_act": t.gated,
        "tie_word_embeddings": t.tie_word_embeddings,
        "scale_decoder_outputs": t.scale_decoder_outputs,
        "decoder_start_token_id": t.decoder_start_token_id,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
        "dropout_rate": 0.0,
    }


def _llama_to_dict(t: LlamaConfig) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim,
        "intermediate_size": t.mlp_size,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_parameters": {"rope_theta": t.rope_theta, "rope_type": "default"},
        "hidden_act": t.activation,
        "attention_bias": t.attention_bias,
        "mlp_bias": t.mlp_bias,
        "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
    }


_TEXT_WRITERS = {"opt": _opt_to_dict, "t5": _t5_to_dict, "llama": _llama_to_dict}


def _blip2_to_dict(cfg: Blip2Config) -> dict[str, Any]:
    if cfg.retrieval:
        arch, model_type = "Blip2ForImageTextRetrieval", "blip-2"
    elif cfg.instruction_aware:
        arch, model_type = "InstructBlipForConditionalGeneration", "instructblip"
    else:
        arch, model_type = "Blip2ForConditionalGeneration", "blip-2"
    d: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "num_query_tokens": cfg.num_query_tokens,
        "image_text_hidden_size": cfg.image_text_hidden_size,
        "vision_config": _vision_to_dict(cfg.vision),
        "qformer_config": _qformer_to_dict(cfg.qformer),
    }
    if cfg.instruction_aware:
        d["vision_config"]["model_type"] = "instructblip_vision_model"
        d["qformer_config"]["model_type"] = "instructblip_qformer"
    if cfg.text is not None and not cfg.retrieval:
        d["text_config"] = _TEXT_WRITERS[cfg.text.kind](cfg.text)
        d["use_decoder_only_language_model"] = cfg.is_decoder_only
        if cfg.image_token_index is not None:
            d["image_token_index"] = cfg.image_token_index
    return d
