"""A quantized T5 decoder's step in one native call (blip2.models.decoder_step.run_t5,
blip2_t5_decoder_step in csrc/decoder_step.c): the kernel against the PyTorch formula, then the model's
steps against its layers run one by one."""

from __future__ import annotations

import pytest
import torch

import blip2
from blip2 import native
from blip2.models import decoder_step
from blip2.quantize import kernels
from conftest import assert_steps_match_layers, count_rows, kind_fixture
from factory import make_images

needs_lowbit = pytest.mark.skipif(kernels.native_kind() is None, reason="no native low-bit kernel here")


kernel = kind_fixture(native.t5_decoder_step_kernel, "T5 decoder step")


@pytest.fixture
def step_calls(monkeypatch) -> list[int]:
    """Counts the native T5 steps taken (rows of each)."""
    return count_rows(monkeypatch, "t5_decoder_step", native.t5_decoder_step_kernel)


# odd widths (vector tails), an inner width unlike the hidden one, one row and several, the first
# position and a later one
CASES = [(1, 8, 2, 3, 12, 0, 1), (3, 20, 4, 5, 36, 6, 9), (2, 48, 3, 16, 100, 9, 17)]


@pytest.mark.parametrize("rows, hidden, heads, head_dim, mlp, position, cross_len", CASES)
def test_kernel_matches_the_pytorch_formula(kernel, rows, hidden, heads, head_dim, mlp, position, cross_len):
    decoder = native.PythonLinearT5Decoder(rows + hidden, 3, hidden, heads, head_dim, mlp)
    same_caches, got, want = decoder.compare(
        kernel, rows, max_len=position + 3, position=max(position, 1), cross_len=cross_len
    )
    assert same_caches
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _t5_inputs(decoder, rows: int, max_len: int, cross_len: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    heads, head_dim, hidden = decoder.heads, decoder.head_dim, decoder.decoder.hidden
    x = torch.randn(rows, hidden, generator=generator)
    caches = [tuple(torch.randn(rows, heads, max_len, head_dim, generator=generator) for _ in range(2))
              for _ in decoder.blocks]  # fmt: skip
    cross = [tuple(torch.randn(rows, heads, cross_len, head_dim, generator=generator) for _ in range(2))
             for _ in decoder.blocks]  # fmt: skip
    bias = torch.randn(1, heads, 1, max_len, generator=generator)
    cross_bias = torch.zeros(rows, 1, 1, cross_len)
    return x, caches, cross, bias, cross_bias


def test_a_row_alone_equals_its_row_in_a_batch(kernel):
    decoder = native.PythonLinearT5Decoder(5, 2, 24, 4, 8, 40)
    x, caches, cross, bias, cross_bias = _t5_inputs(decoder, 3, 6, 7, seed=1)
    alone = [tuple(t[-1:].clone() for t in pair) for pair in caches]
    batch = x.clone()
    native.t5_decoder_step(kernel, decoder.decoder, batch, caches, cross, bias, cross_bias, 4)
    last = x[-1:].clone()
    cross_last = [tuple(t[-1:] for t in pair) for pair in cross]
    native.t5_decoder_step(kernel, decoder.decoder, last, alone, cross_last, bias, cross_bias[-1:], 4)
    assert torch.equal(last, batch[-1:])
    assert all(torch.equal(a, b[-1:]) for pair, whole in zip(alone, caches, strict=True)
               for a, b in zip(pair, whole, strict=True))  # fmt: skip


@pytest.mark.parametrize(
    "change",
    [
        lambda i: {**i, "bias": i["bias"][..., :3]},  # shorter than the positions so far
        lambda i: {**i, "cross_bias": i["cross_bias"][:, :, :, :-1]},
        lambda i: {**i, "x": i["x"].double()},
        lambda i: {**i, "position": 6},  # past the cache
        lambda i: {**i, "cross": i["cross"][:1]},  # one layer's encoder keys for two layers
    ],
)
def test_refuses_what_it_cannot_take(kernel, change):
    decoder = native.PythonLinearT5Decoder(6, 2, 16, 2, 8, 24)
    x, caches, cross, bias, cross_bias = _t5_inputs(decoder, 2, 6, 5, seed=2)
    inputs = change(dict(x=x, caches=caches, cross=cross, bias=bias, cross_bias=cross_bias, position=4))
    with pytest.raises(ValueError, match="t5_decoder_step takes"):
        native.t5_decoder_step(kernel, decoder.decoder, **inputs)


# ---- the model's steps against its layers ---------------------------------------------------------------


def _teacher_forced_logits(lm, encoder_out: torch.Tensor, encoder_mask: torch.Tensor, tokens: torch.Tensor):
    """The logits of each step of decoding ``tokens`` one at a time through a fresh cache."""
    rows, steps = tokens.shape
    cache = lm.new_cache(encoder_out, encoder_mask, steps + 1)
    logits = []
    with torch.inference_mode():
        for t in range(steps):
            hidden = lm.decode(lm.embed(tokens[:, t : t + 1]), cache=cache, start=t)
            logits.append(lm.logits(hidden)[:, -1])
    return torch.stack(logits, 1)


@needs_lowbit
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_t5_steps_equal_the_layers_run_one_by_one(kernel, step_calls, monkeypatch, t5_ckpt, method):
    lm = blip2.load(t5_ckpt, quantize=method).model.language_model
    generator = torch.Generator().manual_seed(3)
    encoder_mask = torch.ones(3, 9, dtype=torch.long)
    encoder_mask[1, -2:] = 0  # a padded encoder row
    with torch.inference_mode():
        encoder_out = lm.encode(torch.randn(3, 9, lm.hidden_size, generator=generator), encoder_mask)
    tokens = torch.randint(2, lm.cfg.vocab_size, (3, 6), generator=generator)
    native_logits = _teacher_forced_logits(lm, encoder_out, encoder_mask, tokens)
    assert step_calls == [3] * tokens.shape[1]
    monkeypatch.setattr(decoder_step, "run_t5", lambda *args: None)
    layered = _teacher_forced_logits(lm, encoder_out, encoder_mask, tokens)
    assert_steps_match_layers(native_logits, layered)


@needs_lowbit
def test_quantized_t5_pipelines_take_it_and_float32_does_not(step_calls, t5_ckpt):
    images = make_images(3, 28, seed=6)
    blip2.load(t5_ckpt).generate_ids(images, None, max_new_tokens=3)
    assert step_calls == []  # float32 layers offer no native description
    m = blip2.load(t5_ckpt, quantize="int4")
    batch = m.generate_ids(images, None, max_new_tokens=5, min_new_tokens=5)
    assert step_calls and set(step_calls) == {3}
    assert [m.generate_ids([image], None, max_new_tokens=5, min_new_tokens=5)[0] for image in images] == batch
