"""The native decode-step attention kernel (blip2.native.decode_attention): equal to the PyTorch
formula, batch- and thread-invariant, used by ``layers.attention`` for float32 CPU decode steps only."""

from __future__ import annotations

import pytest
import torch

import blip2
from blip2 import native
from blip2.models import layers
from conftest import kind_fixture, reset_kernel_choice
from factory import make_images

kernel = kind_fixture(native.decode_attention_kernel, "decode attention kernel")


def _inputs(batch, heads, length, head_dim, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, head_dim, generator=generator)
    # keys and values as a KV cache holds them: the first `length` of more positions
    k, v = (
        torch.randn(batch, heads, length + 5, head_dim, generator=generator)[:, :, :length] for _ in range(2)
    )
    keep = torch.rand(batch, 1, 1, length, generator=generator) > 0.4
    keep[..., -1] = True
    masks = {
        "none": None,
        "bool": keep,
        "bool per head": torch.rand(batch, heads, 1, length, generator=generator) > 0.2,
        "float": torch.randn(1, heads, 1, length, generator=generator),
        "float per row": torch.randn(batch, heads, 1, length, generator=generator).masked_fill(
            ~keep, float("-inf")
        ),
    }
    masks["bool per head"][..., 0] = True
    return q, k, v, masks


# odd head dims and lengths: vector tails of every kind; one position; the bench shape (16 x 64)
SHAPES = [(1, 1, 1, 1), (1, 16, 40, 64), (3, 4, 17, 13), (2, 3, 9, 80), (5, 2, 33, 7), (2, 2, 70, 129)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [None, 1.0, 0.37])
def test_matches_the_pytorch_formula(kernel, shape, scale):
    q, k, v, masks = _inputs(*shape, seed=sum(shape))
    for name, mask in masks.items():
        got = native.decode_attention(q, k, v, mask, scale, kernel)
        assert got.shape == q.shape
        want = native.reference_attention(q, k, v, mask, scale)
        torch.testing.assert_close(
            got, want, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name} mask: {m}"
        )


@pytest.mark.parametrize("shape", [(5, 16, 40, 64), (7, 3, 19, 13)])
def test_a_row_alone_equals_it_in_a_batch_at_any_thread_count(kernel, shape):
    q, k, v, masks = _inputs(*shape, seed=7)
    threads = torch.get_num_threads()
    for mask in masks.values():
        batched = native.decode_attention(q, k, v, mask, None, kernel)
        for row in range(shape[0]):
            row_mask = mask if mask is None or mask.shape[0] == 1 else mask[row : row + 1]
            alone = native.decode_attention(
                q[row : row + 1], k[row : row + 1], v[row : row + 1], row_mask, None, kernel
            )
            assert torch.equal(alone, batched[row : row + 1])
        try:
            torch.set_num_threads(1)
            assert torch.equal(native.decode_attention(q, k, v, mask, None, kernel), batched)
        finally:
            torch.set_num_threads(threads)


def test_a_fully_masked_row_gives_nan_as_pytorch_does(kernel):
    q, k, v, _ = _inputs(2, 3, 6, 8, seed=3)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1] = False
    got = native.decode_attention(q, k, v, mask, None, kernel)
    assert native.reference_attention(q, k, v, mask, None)[1].isnan().all()
    assert got[1].isnan().all()
    torch.testing.assert_close(
        got[0], native.reference_attention(q, k, v, mask, None)[0], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_infinite_score_gives_nan_as_pytorch_does(kernel, bad):
    """Vectorized exponentials would turn a NaN score into a zero weight: the kernel must not."""
    q, k, v, _ = _inputs(2, 3, 21, 8, seed=4)
    q[1, 2, 0, 0] = 1.0
    k[1, 2, 17, 0] = bad  # one score (NaN or +inf) of row 1, head 2, past the first blocks of four
    got = native.decode_attention(q, k, v, None, None, kernel)
    want = native.reference_attention(q, k, v, None, None)
    assert want[1, 2].isnan().all() and got[1, 2].isnan().all()
    assert not got[0].isnan().any() and not got[1, :2].isnan().any()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_merging_the_heads_after_is_a_view(kernel):
    q, k, v, _ = _inputs(2, 4, 5, 8, seed=1)
    out = native.decode_attention(q, k, v, None, None, kernel)
    merged = layers.merge_heads(out)
    assert merged.data_ptr() == out.data_ptr()
    assert torch.equal(merged, layers.merge_heads(out.contiguous()))


@pytest.mark.parametrize(
    "change",
    [
        lambda q, k, v, m: (q.double(), k.double(), v.double(), m),  # another dtype
        lambda q, k, v, m: (q.expand(-1, -1, 2, -1), k, v, m),  # two queries
        lambda q, k, v, m: (q, k, v[:, :, :-1], m),  # keys and values of different lengths
        lambda q, k, v, m: (q, k, v, m[..., :-1]),  # a mask of the wrong length
        lambda q, k, v, m: (q, k, v, m.expand(-1, -1, 3, -1)),  # a mask for three queries
        lambda q, k, v, m: (q, k, v, m.half()),  # a mask of another dtype
    ],
)
def test_refuses_what_it_does_not_take(kernel, change):
    q, k, v, masks = _inputs(2, 3, 6, 8, seed=2)
    with pytest.raises(ValueError):
        native.decode_attention(*change(q, k, v, masks["float"]), None, kernel)


def test_attention_takes_it_for_decode_steps_only(kernel, monkeypatch):
    q, k, v, masks = _inputs(2, 3, 6, 8, seed=4)
    calls = []
    real = native.decode_attention
    monkeypatch.setattr(native, "decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = layers.attention(q, k, v, masks["bool"])
    assert calls and torch.equal(got, real(q, k, v, masks["bool"], None, kernel))
    calls.clear()
    layers.attention(q, k, v, masks["bool"], row_invariant=False)  # exact=True: PyTorch's fused kernel
    layers.attention(q.expand(-1, -1, 2, -1), k, v, masks["bool"])  # a prefill
    layers.attention(q.double(), k.double(), v.double(), masks["bool"])
    assert not calls
    q.requires_grad_(True)  # training: the matmuls, with their gradient
    out = layers.attention(q, k, v, masks["bool"])
    out.sum().backward()
    assert not calls and q.grad is not None


def test_captions_run_on_it_and_equal_the_exact_path(opt_ckpt, monkeypatch):
    if native.decode_attention_kernel() is None:
        pytest.skip("no native decode attention kernel on this machine (see blip2.native)")
    calls = []
    real = native.decode_attention
    monkeypatch.setattr(native, "decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    images = make_images(3, seed=5)
    fast = blip2.load(opt_ckpt).caption(images, max_new_tokens=6)
    assert calls
    calls.clear()
    assert blip2.load(opt_ckpt, exact=True).caption(images, max_new_tokens=6) == fast
    assert not calls


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("BLIP2_NATIVE", "0")
    reset_kernel_choice()
    try:
        assert native.decode_attention_kernel() is None
        q, k, v, masks = _inputs(2, 3, 6, 8, seed=6)
        torch.testing.assert_close(
            layers.attention(q, k, v, masks["bool"]), native.reference_attention(q, k, v, masks["bool"], None)
        )
    finally:
        monkeypatch.delenv("BLIP2_NATIVE")
        reset_kernel_choice()


@pytest.mark.parametrize("mask_name", ["bool", "float per row"])
def test_cached_attention_writes_the_cache_and_attends_as_write_then_attention(
    kernel, monkeypatch, mask_name
):
    batch, heads, head_dim, start = 3, 4, 13, 6
    q, _, _, masks = _inputs(batch, heads, start + 1, head_dim, seed=8)
    generator = torch.Generator().manual_seed(9)
    k_new, v_new = (
        torch.randn(batch, 1, heads, head_dim, generator=generator).transpose(1, 2) for _ in range(2)
    )
    fused, plain = (layers.KVCache(batch, heads, 10, head_dim, torch.float32, "cpu") for _ in range(2))
    fused.k[:, :, :start] = torch.randn(batch, heads, start, head_dim, generator=generator)
    fused.v[:, :, :start] = torch.randn(batch, heads, start, head_dim, generator=generator)
    plain.k.copy_(fused.k), plain.v.copy_(fused.v)
    calls = []
    real = native.decode_attention
    monkeypatch.setattr(native, "decode_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    mask = masks[mask_name]
    got = layers.cached_attention(q, k_new, v_new, fused, start, mask)
    assert calls and calls[0]["new"][2] == start  # one native call wrote and attended
    keys, values = plain.write(k_new, v_new, start)
    assert torch.equal(fused.k, plain.k) and torch.equal(fused.v, plain.v)
    torch.testing.assert_close(
        got, native.reference_attention(q, keys, values, mask, None), rtol=1e-5, atol=1e-5
    )
    # a row alone (its own cache) gets the same bits
    alone = layers.KVCache(1, heads, 10, head_dim, torch.float32, "cpu")
    alone.k[:, :, :start], alone.v[:, :, :start] = plain.k[-1:, :, :start], plain.v[-1:, :, :start]
    row_mask = mask[-1:]
    assert torch.equal(
        layers.cached_attention(q[-1:], k_new[-1:], v_new[-1:], alone, start, row_mask), got[-1:]
    )


def test_cached_attention_past_the_cache_says_so(kernel):
    q, k, v, _ = _inputs(1, 2, 1, 8, seed=10)
    cache = layers.KVCache(1, 2, 4, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="KV cache holds 4 positions"):
        layers.cached_attention(q, k, v, cache, 4, torch.ones(1, 1, 1, 5, dtype=torch.bool))


def test_a_query_scale_rounds_as_scaling_the_query_first(kernel):
    q, k, v, masks = _inputs(3, 4, 11, 13, seed=11)
    for mask in masks.values():
        got = native.decode_attention(q, k, v, mask, 1.0, kernel, q_scale=13**-0.5)
        assert torch.equal(got, native.decode_attention(q * 13**-0.5, k, v, mask, 1.0, kernel))
        want = native.reference_attention(q * 13**-0.5, k, v, mask, 1.0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
