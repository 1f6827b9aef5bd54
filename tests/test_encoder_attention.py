"""The native image-encoder attention kernel (blip2.native.encoder_attention): equal to the PyTorch
formula, image- and thread-invariant, used by the vision encoder's float32 CPU forward only (not with
exact=True, not when a gradient is wanted)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import blip2
from blip2 import native
from blip2.models import layers
from conftest import kind_fixture, reset_kernel_choice
from factory import make_images

kernel = kind_fixture(native.encoder_attention_kernel, "encoder attention kernel")


def _qkv(batch, length, heads, head_dim, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, 3 * heads * head_dim, generator=generator)


def _pytorch(qkv, heads, scale=None):
    b, n, width = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(b, n, -1)


# tokens and head_dim below, at and past whole vectors of 8 and 16 lanes and tiles of 4 queries;
# (2, 257, 4, 88): the released image encoder's tokens and head_dim
SHAPES = [(1, 1, 1, 1), (2, 5, 3, 7), (1, 16, 2, 16), (3, 33, 2, 20), (2, 70, 3, 64), (2, 257, 4, 88)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [None, 0.3])
def test_matches_the_pytorch_formula(kernel, shape, scale):
    batch, length, heads, head_dim = shape
    qkv = _qkv(*shape, seed=1)
    got = native.encoder_attention(qkv, heads, scale, kernel)
    assert got.shape == (batch, length, heads * head_dim)
    torch.testing.assert_close(got, _pytorch(qkv, heads, scale), rtol=1e-5, atol=2e-6)


def test_large_scores_neither_overflow_nor_lose_the_peak(kernel):
    qkv = _qkv(2, 40, 2, 24, seed=2) * 30  # scores in the thousands: exp would overflow unshifted
    got = native.encoder_attention(qkv, 2, None, kernel)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _pytorch(qkv, 2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(3, 37, 3, 20), (4, 257, 2, 64)])
def test_an_image_alone_equals_it_in_a_batch_at_any_thread_count(kernel, shape):
    qkv = _qkv(*shape, seed=3)
    heads = shape[2]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        batch = native.encoder_attention(qkv, heads, None, kernel)
        torch.set_num_threads(1)
        for i in range(shape[0]):
            assert torch.equal(
                native.encoder_attention(qkv[i : i + 1], heads, None, kernel), batch[i : i + 1]
            )
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize(
    "change",
    [
        lambda x: x.double(),
        lambda x: x[..., :-1],  # not 3 * heads * head_dim wide
        lambda x: x[0],  # not (B, N, width)
        lambda x: x[:, :0],  # no tokens
    ],
)
def test_refuses_what_it_does_not_take(kernel, change):
    with pytest.raises(ValueError, match="encoder_attention"):
        native.encoder_attention(change(_qkv(2, 5, 3, 4, seed=4)), 3, None, kernel)


def test_the_vision_encoder_runs_on_it_but_not_for_gradients_or_exact(opt_ckpt, monkeypatch):
    if native.encoder_attention_kernel() is None:
        pytest.skip("no native encoder attention kernel on this machine (see blip2.native)")
    calls = []
    real = native.encoder_attention
    monkeypatch.setattr(native, "encoder_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    fast, exact = blip2.load(opt_ckpt), blip2.load(opt_ckpt, exact=True)
    pixels = fast.processor(images=make_images(2, seed=5))["pixel_values"]
    with torch.inference_mode():
        got = fast.model.vision(pixels)
        assert len(calls) == len(fast.model.vision.blocks)
        calls.clear()
        want = exact.model.vision(pixels)
        assert not calls
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    fast.model.vision.requires_grad_(True)  # training the image encoder: PyTorch's kernel, with gradients
    fast.model.vision(pixels).sum().backward()
    assert not calls and fast.model.vision.blocks[0].attn.qkv.weight.grad is not None


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("BLIP2_NATIVE", "0")
    reset_kernel_choice()
    try:
        assert native.encoder_attention_kernel() is None
        qkv = _qkv(2, 9, 3, 8, seed=6)
        assert layers.encoder_self_attention(qkv, 3) is None  # the vision encoder takes PyTorch's kernel
    finally:
        monkeypatch.delenv("BLIP2_NATIVE")
        reset_kernel_choice()
