"""A quantized LLaMA decoder's step in one native call (blip2.models.decoder_step.run_llama,
blip2_llama_decoder_step in csrc/decoder_step.c): the kernel against the PyTorch formula, then the
model's steps against its layers run one by one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import blip2
from blip2 import native
from blip2.generate import OPTRunner
from blip2.models import decoder_step
from blip2.quantize import kernels
from conftest import count_rows, kind_fixture
from factory import make_images

needs_lowbit = pytest.mark.skipif(kernels.native_kind() is None, reason="no native low-bit kernel here")


kernel = kind_fixture(native.llama_decoder_step_kernel, "LLaMA decoder step")


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    """InstructBLIP with a LLaMA whose keys and values have as many heads as its queries (Vicuna's)."""
    from factory_instruct import build_instruct_checkpoint

    return build_instruct_checkpoint(tmp_path_factory.mktemp("instruct_llama_mha"), lm="llama", lm_kv_heads=4)


@pytest.fixture
def step_calls(monkeypatch) -> list[int]:
    """Counts the native LLaMA steps taken (rows of each)."""
    return count_rows(monkeypatch, "llama_decoder_step", native.llama_decoder_step_kernel)


# odd widths (vector tails), an inner width unlike the hidden one, one row and several, the first
# position and a later one
CASES = [(1, 8, 2, 4, 12, 0), (3, 20, 4, 6, 36, 6), (2, 48, 3, 16, 100, 9)]


@pytest.mark.parametrize("rows, hidden, heads, head_dim, mlp, position", CASES)
def test_kernel_matches_the_pytorch_formula(kernel, rows, hidden, heads, head_dim, mlp, position):
    decoder = native.PythonLinearLlamaDecoder(rows + hidden, 3, hidden, heads, head_dim, mlp)
    same_caches, got, want = decoder.compare(kernel, rows, max_len=position + 3, position=position)
    assert same_caches
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_row_alone_equals_its_row_in_a_batch(kernel):
    decoder = native.PythonLinearLlamaDecoder(5, 2, 24, 4, 8, 40)
    x, caches, mask, cos, sin = decoder.step_inputs(3, 6, 4)
    alone = [tuple(t[-1:].clone() for t in pair) for pair in caches]
    batch = x.clone()
    native.llama_decoder_step(kernel, decoder.decoder, batch, caches, mask, cos, sin, 4)
    last = x[-1:].clone()
    native.llama_decoder_step(kernel, decoder.decoder, last, alone, mask[-1:], cos[-1:], sin[-1:], 4)
    assert torch.equal(last, batch[-1:])
    assert all(torch.equal(a, b[-1:]) for pair, whole in zip(alone, caches, strict=True)
               for a, b in zip(pair, whole, strict=True))  # fmt: skip


@pytest.mark.parametrize(
    "change",
    [
        lambda i: {**i, "cos": i["cos"][:, :-2]},  # not a head's width
        lambda i: {**i, "mask": i["mask"][:, :3]},  # shorter than the positions so far
        lambda i: {**i, "x": i["x"].double()},
        lambda i: {**i, "position": 6},  # past the cache
    ],
)
def test_refuses_what_it_cannot_take(kernel, change):
    decoder = native.PythonLinearLlamaDecoder(6, 2, 16, 2, 8, 24)
    x, caches, mask, cos, sin = decoder.step_inputs(2, 6, 4)
    inputs = change(dict(x=x, caches=caches, mask=mask, cos=cos, sin=sin, position=4))
    with pytest.raises(ValueError, match="llama_decoder_step takes"):
        native.llama_decoder_step(kernel, decoder.decoder, **inputs)


# ---- the model's steps against its layers ---------------------------------------------------------------


def _steps(lm, embeds: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, steps, V) logits of decode steps fed ``tokens`` (B, steps) after prefilling ``embeds``."""
    with torch.inference_mode():
        runner = OPTRunner(lm, embeds, mask, tokens.shape[1] + 1)
        runner.prefill()
        return torch.stack([runner.step(tokens[:, i]) for i in range(tokens.shape[1])], 1)


@needs_lowbit
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_llama_steps_equal_the_layers_run_one_by_one(kernel, step_calls, monkeypatch, llama_ckpt, method):
    lm = blip2.load(llama_ckpt, quantize=method).model.language_model
    generator = torch.Generator().manual_seed(3)
    embeds = torch.randn(3, 7, lm.hidden_size, generator=generator)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding: that row's positions start later
    tokens = torch.randint(3, lm.cfg.vocab_size, (3, 6), generator=generator)
    native_logits = _steps(lm, embeds, mask, tokens)
    assert step_calls == [3] * tokens.shape[1]
    monkeypatch.setattr(decoder_step, "run_llama", lambda *args: None)
    layered = _steps(lm, embeds, mask, tokens)
    # the RMS norms and SiLU round differently in their last bits: close, not equal
    cos = F.cosine_similarity(native_logits, layered, dim=-1)
    assert cos.min() > 0.9999, cos
    assert torch.equal(native_logits.argmax(-1), layered.argmax(-1))


@needs_lowbit
def test_quantized_llama_pipelines_take_it_and_others_do_not(step_calls, llama_ckpt, instruct_llama_ckpt):
    images = make_images(3, 28, seed=6)
    blip2.load(llama_ckpt).generate_ids(images, ["what is it?"] * 3, max_new_tokens=3)
    # grouped key/value heads: the layers, whose attention repeats them
    blip2.load(instruct_llama_ckpt, quantize="int4").generate_ids(
        images, ["what is it?"] * 3, max_new_tokens=3
    )
    assert step_calls == []  # float32 layers offer no native description
    m = blip2.load(llama_ckpt, quantize="int4")
    prompts = ["what is it?", "describe it", "colour?"]
    batch = m.generate_ids(images, prompts, max_new_tokens=5, min_new_tokens=5)
    assert step_calls and set(step_calls) == {3}
    alone = [
        m.generate_ids([image], [p], max_new_tokens=5, min_new_tokens=5)[0]
        for image, p in zip(images, prompts, strict=True)
    ]
    assert alone == batch
