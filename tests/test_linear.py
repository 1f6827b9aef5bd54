"""layers.Linear and layers.attention: one kernel for every row count, chosen once, never switched off."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from blip2 import native
from blip2.errors import InputError
from blip2.models import layers
from conftest import reset_kernel_choice

# around both kinds' old row limits (16 where PyTorch reports AVX-512, 256 on AVX2) and past them
ROW_COUNTS = [1, 2, 15, 16, 17, 33, 255, 256, 257, 600]


@pytest.fixture
def fresh_choice():
    """The process's kernel choice made afresh in the test, and again after it."""
    reset_kernel_choice()
    yield
    reset_kernel_choice()


@pytest.mark.parametrize("in_features,out_features", [(768, 2304), (1100, 70)])
def test_a_row_gives_the_same_bits_alone_and_in_any_batch(native_kind, in_features, out_features):
    torch.manual_seed(in_features)
    layer = layers.Linear(in_features, out_features)
    x = torch.randn(max(ROW_COUNTS), in_features)
    with torch.inference_mode():
        alone = torch.cat([layer(x[i : i + 1]) for i in range(0, max(ROW_COUNTS), 37)] + [layer(x[-1:])])
        for rows in ROW_COUNTS:
            batch = layer(x[:rows])
            picked = [i for i in range(0, rows, 37)]
            assert torch.equal(batch[picked], alone[: len(picked)]), rows
        assert torch.equal(layer(x.view(20, 30, in_features))[-1, -1:], alone[-1:])  # (B, T, D) rows too


def test_the_choice_is_made_once_and_logged(fresh_choice, caplog):
    layer = layers.Linear(16, 8)
    with caplog.at_level(logging.INFO, logger="blip2"), torch.inference_mode():
        for rows in (1, 300, 2):
            layer(torch.randn(rows, 16))
    chosen = [r for r in caplog.records if "float32 linear layers run on" in r.getMessage()]
    assert len(chosen) == 1
    assert layers.float32_kernel()[0] in chosen[0].getMessage()


def _counting(monkeypatch, owner, name: str) -> list[int]:
    """Record the row count of each call of ``owner.name`` that returned."""
    calls: list[int] = []
    real = getattr(owner, name)

    def counted(x, *args, **kwargs):
        y = real(x, *args, **kwargs)
        calls.append(x.numel() // x.shape[-1])
        return y

    monkeypatch.setattr(owner, name, counted)
    return calls


def _onednn_choice(monkeypatch) -> None:
    if layers._onednn_unusable() is not None:
        pytest.skip(f"oneDNN's matmul: {layers._onednn_unusable()}")
    monkeypatch.setattr(layers, "float32_kernel", lambda: ("onednn", None))


def test_a_wrong_width_is_an_input_error_and_switches_nothing_off(native_kind, monkeypatch):
    native_calls = _counting(monkeypatch, native, "skinny_linear")
    layer = layers.Linear(64, 48)
    with torch.inference_mode():
        with pytest.raises(InputError, match="input width 64"):
            layer(torch.randn(3, 32))
        with pytest.raises(InputError, match="input width 64"):
            layer(torch.tensor(1.0))
        layer(torch.randn(3, 64))
    assert native_calls == [3]  # the bad calls reached no kernel; the next one ran on the native kernel


def test_a_wrong_width_is_an_input_error_on_the_other_paths_too(monkeypatch):
    _onednn_choice(monkeypatch)
    onednn_calls = _counting(monkeypatch, layers, "_onednn_linear")
    layer = layers.Linear(64, 48)
    with torch.inference_mode():
        with pytest.raises(InputError, match="input width 64"):
            layer(torch.randn(2, 65))
        layer(torch.randn(2, 64))
    assert onednn_calls == [2]
    layer.fast_kernels = False  # F.linear (exact=True): the same error
    with torch.inference_mode(), pytest.raises(InputError, match="input width 64"):
        layer(torch.randn(2, 65))


def test_a_failing_kernel_call_raises_and_switches_nothing_off(monkeypatch):
    _onednn_choice(monkeypatch)  # before the failing op is put in: the check runs it
    real = torch.ops.mkldnn._linear_pointwise
    failures = iter([RuntimeError("out of memory")])

    def fails_once(*args):
        if (error := next(failures, None)) is not None:
            raise error
        return real(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", fails_once)
    onednn_calls = _counting(monkeypatch, layers, "_onednn_linear")
    layer = layers.Linear(16, 8)
    x = torch.randn(4, 16)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="out of memory"):
            layer(x)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert onednn_calls == [4]  # still oneDNN after the failure


def test_an_unusable_onednn_is_found_at_the_choice_and_logged(fresh_choice, monkeypatch, caplog):
    monkeypatch.setenv("BLIP2_NATIVE", "0")

    def broken(*args):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", broken)
    with caplog.at_level(logging.INFO, logger="blip2"):
        assert layers.float32_kernel() == ("F.linear", None)
    assert any(r.levelno == logging.WARNING and "no oneDNN here" in r.getMessage() for r in caplog.records)
    layer = layers.Linear(16, 8)
    x = torch.randn(300, 16)
    with torch.inference_mode():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("heads,head_dim", [(4, 32), (12, 64)])
def test_one_query_attention_is_the_same_alone_and_in_a_batch(heads, head_dim):
    generator = torch.Generator().manual_seed(heads)
    for keys in (5, 24, 300):
        for batch in (3, 20):
            q = torch.randn(batch, heads, 1, head_dim, generator=generator)
            k, v = (
                torch.randn(batch, heads, keys + 3, head_dim, generator=generator)[:, :, :keys] for _ in "kv"
            )
            mask = torch.rand(batch, 1, 1, keys, generator=generator) > 0.3
            mask[..., -1] = True
            bias = torch.randn(1, heads, 1, keys, generator=generator)
            for m, scale in [(None, None), (mask, 1.0), (bias, 1.0), (mask, 0.3)]:
                together = layers.attention(q, k, v, m, scale=scale)
                sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)
                torch.testing.assert_close(together, sdpa, rtol=1e-5, atol=1e-5)
                for b in (0, 1, batch - 1):
                    row_mask = m[b : b + 1] if m is not None and m.shape[0] == batch else m
                    alone = layers.attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], row_mask, scale=scale)
                    assert torch.equal(together[b : b + 1], alone), (keys, batch, b)


def test_exact_attention_keeps_pytorchs_kernel():
    q, k, v = torch.randn(3, 4, 1, 32), torch.randn(3, 4, 20, 32), torch.randn(3, 4, 20, 32)
    assert torch.equal(
        layers.attention(q, k, v, row_invariant=False), F.scaled_dot_product_attention(q, k, v)
    )
