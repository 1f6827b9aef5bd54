"""LLaMA decoder-only language model (Vicuna in InstructBLIP).

Shapes: ``B`` batch, ``T`` new positions, ``S`` all positions so far (cache + new), ``D`` width,
``H`` query heads, ``G`` key/value heads (``H`` is a multiple of ``G``), ``Dh`` head width.
Pre-norm blocks with RMS norms, rotary positions taken from the attention mask's cumulative sum (so
left padding does not shift them), a SwiGLU feed-forward, an untied ``lm_head``. It offers the same
methods as ``OPT`` (``embed``, ``new_cache``, ``forward``, ``logits``), so generation treats both alike.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import decoder_step
from ..config import LlamaConfig
from ..layers import (
    GatedMLP,
    KVCache,
    Linear,
    RMSNorm,
    attention,
    cached_attention,
    causal_mask,
    decoder_mask,
    layer_caches,
    merge_heads,
    run_layer,
    split_heads,
    window,
)


class Rotary:
    """Rotary position embedding: rotates pairs ``(i, i + Dh/2)`` of each head by ``position × θ_i``.

    Not an ``nn.Module`` buffer: the frequencies are derived (never loaded), so they are made on first
    use on the device of the activations, also for a model built on the meta device.
    """

    def __init__(self, head_dim: int, theta: float):
        self.head_dim, self.theta = head_dim, theta
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            exponents = (
                torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
            )
            self._inv_freq[device] = 1.0 / (self.theta**exponents)
        return self._inv_freq[device]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) positions -> cos, sin of shape (B, 1, T, Dh), in ``dtype``."""
        freqs = positions[..., None].float() * self.inv_freq(positions.device)  # (B, T, Dh/2)
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply the rotation to (B, H, T, Dh) queries or keys."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated_half * sin


class LlamaAttention(nn.Module):
    fast_kernels: bool = True  # False (exact=True): decode steps keep PyTorch's fused attention kernel

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d, dh = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.q = Linear(d, cfg.num_heads * dh, bias=cfg.attention_bias)
        self.k = Linear(d, cfg.num_kv_heads * dh, bias=cfg.attention_bias)
        self.v = Linear(d, cfg.num_kv_heads * dh, bias=cfg.attention_bias)
        self.out = Linear(cfg.num_heads * dh, d, bias=cfg.attention_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache: KVCache | None,
        start: int | torch.Tensor,
    ) -> torch.Tensor:
        q = rotate(split_heads(self.q(x), self.num_heads), *cos_sin)  # (B, H, T, Dh)
        k = rotate(split_heads(self.k(x), self.num_kv_heads), *cos_sin)  # (B, G, T, Dh)
        v = split_heads(self.v(x), self.num_kv_heads)
        if self.num_kv_heads == self.num_heads:  # into the cache, if any, and attended to: (B, H, S, Dh)
            return self.out(
                merge_heads(cached_attention(q, k, v, cache, start, mask, row_invariant=self.fast_kernels))
            )
        if cache is not None:
            k, v = cache.write(k, v, start)  # (B, G, S, Dh)
        # grouped-query attention: each K/V head serves H/G heads
        repeat = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        return self.out(merge_heads(attention(q, k, v, mask, row_invariant=self.fast_kernels)))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = LlamaAttention(cfg)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.mlp_size, cfg.activation, bias=cfg.mlp_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache: KVCache | None,
        start: int | torch.Tensor,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos_sin, mask, cache, start)
        return x + self.mlp(self.norm2(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.gradient_checkpointing = False

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def new_cache(
        self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None
    ) -> list[KVCache]:
        """Per-layer caches (``layers.layer_caches``)."""
        c = self.cfg
        dtype = dtype or self.embed_tokens.weight.dtype
        return layer_caches(self.layers, batch, c.num_kv_heads, max_len, c.head_dim, dtype, device)

    @staticmethod
    def positions(attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, S) 0/1 mask -> (B, S) position ids counting real tokens only (padding gets 0)."""
        return (attention_mask.long().cumsum(1) - 1).clamp_min(0) * attention_mask.long()

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
        start: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Hidden states (B, T, D) for new positions [start, start+T), after the final norm.

        attention_mask: (B, start+T) 0/1 over every position so far (cache included).
        cache: per-layer KV caches from ``new_cache``, or None to run without one.
        start: an int, or a 0-dim tensor (a decode step of static shapes, as ``OPT.forward``).
        """
        t = inputs_embeds.shape[1]
        attention_mask = decoder_mask(inputs_embeds, attention_mask, cache, start)
        x = inputs_embeds
        cos_sin = self.rotary.cos_sin(window(self.positions(attention_mask), start, t), x.dtype)
        mask = causal_mask(attention_mask, start, t)  # (B, 1, T, S)
        # a quantized decode step: every layer in one native call where it can
        if (native := decoder_step.run_llama(self, x, cos_sin, mask, cache, start)) is not None:
            return self.norm(native)
        for i, layer in enumerate(self.layers):
            layer_cache = cache[i] if cache is not None else None
            x = run_layer(self, layer, x, cos_sin, mask, layer_cache, start)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
