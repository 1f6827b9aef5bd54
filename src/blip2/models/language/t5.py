"""T5 v1.1 / Flan-T5 encoder-decoder.

Shapes: ``B`` batch, ``L`` encoder length, ``T`` new decoder positions, ``S`` decoder positions so
far, ``D`` width, ``H`` heads. RMS norms, bucketed relative position bias (computed by the first
block of each stack and shared by the rest), gated GELU, unscaled attention, untied ``lm_head``
(tied and scaled for original T5). The encoder and decoder may have different depths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import decoder_step
from ..config import T5Config
from ..layers import (
    MLP,
    GatedMLP,
    KVCache,
    Linear,
    RMSNorm,
    cached_attention,
    device_of,
    layer_caches,
    merge_heads,
    positions_from,
    split_heads,
)


def relative_position_bucket(
    relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
):
    """Map key-minus-query distances to buckets: exact for small distances, log-spaced beyond."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = -torch.clamp(relative, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # Float math in this exact order reproduces the reference's bucket boundaries.
    large = (
        max_exact
        + (
            torch.log(distance.float() / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RelativeBias(nn.Module):
    """Learned per-head bias indexed by relative-position bucket: (1, H, T, S)."""

    def __init__(self, cfg: T5Config, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.embed = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def forward(self, query_len: int, key_len: int, query_start: int | torch.Tensor = 0) -> torch.Tensor:
        device = self.embed.weight.device
        q_pos = positions_from(query_start, query_len, device)[:, None]
        k_pos = torch.arange(key_len, device=device)[None, :]
        buckets = relative_position_bucket(
            k_pos - q_pos, self.bidirectional, self.num_buckets, self.max_distance
        )
        return self.embed(buckets).permute(2, 0, 1)[None]


class T5Attention(nn.Module):
    fast_kernels: bool = True  # False (exact=True): decode steps keep PyTorch's fused attention kernel

    def __init__(self, cfg: T5Config):
        super().__init__()
        inner = cfg.num_heads * cfg.head_dim
        self.num_heads = cfg.num_heads
        self.q = Linear(cfg.hidden_size, inner, bias=False)
        self.k = Linear(cfg.hidden_size, inner, bias=False)
        self.v = Linear(cfg.hidden_size, inner, bias=False)
        self.o = Linear(inner, cfg.hidden_size, bias=False)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_heads(self.k(context), self.num_heads), split_heads(self.v(context), self.num_heads)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """bias: additive float (B or 1, H, T, S), position bias and mask together; T5 does not scale."""
        q = split_heads(self.q(x), self.num_heads)
        if kv is None:
            k, v = self.project_kv(x)
        else:
            k, v, cache = *kv, None
        bias = bias.to(q.dtype)
        return self.o(
            merge_heads(
                cached_attention(q, k, v, cache, start, bias, scale=1.0, row_invariant=self.fast_kernels)
            )
        )


def _clamp_half(x: torch.Tensor) -> torch.Tensor:
    # float16 overflows in T5's residual stream; clamp as the reference does.
    if x.dtype == torch.float16:
        big = torch.finfo(torch.float16).max
        limit = torch.where(torch.isinf(x).any(), big - 1000, big)
        x = torch.clamp(x, min=-limit, max=limit)
    return x


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, is_decoder: bool):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.self_attn = T5Attention(cfg)
        if is_decoder:
            self.norm_cross = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
            self.cross_attn = T5Attention(cfg)
        else:
            self.cross_attn = None
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        if cfg.gated:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.mlp_size, cfg.activation)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.mlp_size, cfg.activation, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        self_bias: torch.Tensor,
        cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        cross_bias: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        x = _clamp_half(x + self.self_attn(self.norm1(x), self_bias, cache=cache, start=start))
        if self.cross_attn is not None:
            x = _clamp_half(x + self.cross_attn(self.norm_cross(x), cross_bias, kv=cross_kv))
        return _clamp_half(x + self.mlp(self.norm2(x)))


@dataclass
class T5DecoderCache:
    """Decoder self-attention caches plus the cross-attention keys/values of the encoder output."""

    self_attn: list[KVCache]
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]
    cross_bias: torch.Tensor  # (B, 1, 1, L) additive encoder padding mask

    def reorder(self, index: torch.Tensor) -> None:
        for c in self.self_attn:
            c.reorder(index)
        self.cross_kv = [_rows(k, index) for k in self.cross_kv]
        self.cross_bias = self.cross_bias.index_select(0, index.to(self.cross_bias.device))

    def reorder_(self, index: torch.Tensor) -> None:
        """As :meth:`reorder`, in place (a captured decode step reads these tensors)."""
        for c in self.self_attn:
            c.reorder_(index)
        for kv in self.cross_kv:
            for t, moved in zip(kv, _rows(kv, index), strict=True):
                t.copy_(moved)
        self.cross_bias.copy_(self.cross_bias.index_select(0, index.to(self.cross_bias.device)))


def _rows(kv: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = kv
    index = index.to(k.device)
    return k.index_select(0, index), v.index_select(0, index)


def _cross_kv(layer: T5Block, encoder_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's cross-attention keys/values, on the layer's device (a placement may split the
    decoder over devices)."""
    return layer.cross_attn.project_kv(encoder_out.to(device_of(layer)))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0/1 mask -> additive mask (0 where visible, most negative value where hidden)."""
    return (1.0 - mask.to(dtype)) * torch.finfo(dtype).min


class T5(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.encoder = nn.ModuleList(T5Block(cfg, is_decoder=False) for _ in range(cfg.num_layers))
        self.encoder_bias = RelativeBias(cfg, bidirectional=True)
        self.encoder_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.decoder = nn.ModuleList(T5Block(cfg, is_decoder=True) for _ in range(cfg.num_decoder_layers))
        self.decoder_bias = RelativeBias(cfg, bidirectional=False)
        self.decoder_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def _run(self, layer: nn.Module, *args) -> torch.Tensor:
        if self.gradient_checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def encode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, D) embeddings and (B, L) 0/1 mask -> (B, L, D) encoder output."""
        b, n, _ = inputs_embeds.shape
        x = inputs_embeds
        bias = self.encoder_bias(n, n).to(x.dtype)  # (1, H, L, L)
        if attention_mask is not None:
            bias = bias + _additive(attention_mask, x.dtype)[:, None, None, :]
        for layer in self.encoder:
            x = self._run(layer, x, bias)
        return self.encoder_norm(x)

    def new_cache(
        self, encoder_out: torch.Tensor, encoder_mask: torch.Tensor | None, max_len: int
    ) -> T5DecoderCache:
        b = encoder_out.shape[0]
        h, dh = self.cfg.num_heads, self.cfg.head_dim
        if encoder_mask is None:
            encoder_mask = torch.ones(encoder_out.shape[:2], dtype=torch.long, device=encoder_out.device)
        return T5DecoderCache(
            self_attn=layer_caches(self.decoder, b, h, max_len, dh, encoder_out.dtype),
            cross_kv=[_cross_kv(layer, encoder_out) for layer in self.decoder],
            cross_bias=_additive(encoder_mask, encoder_out.dtype)[:, None, None, :],
        )

    def decode(
        self,
        decoder_embeds: torch.Tensor,
        encoder_out: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        decoder_mask: torch.Tensor | None = None,
        cache: T5DecoderCache | None = None,
        start: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Decoder hidden states (B, T, D) for positions [start, start+T).

        Without a cache, ``encoder_out`` is required and every position is recomputed.
        decoder_mask: optional (B, start+T) 0/1 padding mask over decoder positions.
        A 0-dim tensor ``start`` (a decode step of static shapes, see ``layers.window``) attends over
        every position the cache holds, those not written yet hidden by causality.
        """
        b, t, _ = decoder_embeds.shape
        x = decoder_embeds
        if isinstance(start, torch.Tensor):
            if cache is None:
                raise ValueError("a tensor start needs a cache")
            s = cache.self_attn[0].max_len
        else:
            s = start + t
        bias = self.decoder_bias(t, s, start).to(x.dtype)  # (1, H, T, S)
        q_pos = positions_from(start, t, x.device)[:, None]
        k_pos = torch.arange(s, device=x.device)[None, :]
        visible = (k_pos <= q_pos)[None]  # (1, T, S)
        if decoder_mask is not None:
            visible = visible & decoder_mask.bool()[:, None, :]
        bias = bias + _additive(visible, x.dtype)[:, None]
        if cache is None:
            if encoder_out is None:
                raise ValueError("decode needs encoder_out or a cache built from it")
            cache_list = None
            cross_kv = [_cross_kv(layer, encoder_out) for layer in self.decoder]
            mask = (
                encoder_mask
                if encoder_mask is not None
                else torch.ones(encoder_out.shape[:2], device=x.device)
            )
            cross_bias = _additive(mask, x.dtype)[:, None, None, :]
        else:
            # a quantized decode step: every layer in one native call where it can
            if (native := decoder_step.run_t5(self, x, bias, cache, start)) is not None:
                return self.decoder_norm(native)
            cache_list, cross_kv, cross_bias = cache.self_attn, cache.cross_kv, cache.cross_bias
        for i, layer in enumerate(self.decoder):
            c = cache_list[i] if cache_list is not None else None
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, bias, cross_kv[i], cross_bias, c, start, use_reentrant=False
                )
            else:
                x = layer(x, bias, cross_kv[i], cross_bias, c, start)
        return self.decoder_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.cfg.scale_decoder_outputs:
            hidden = hidden * (self.cfg.hidden_size**-0.5)
        return self.lm_head(hidden)
