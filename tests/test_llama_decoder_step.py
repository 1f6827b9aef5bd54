"""A quantized LLaMA decoder's step in one native call (blip2.models.decoder_step.run_llama,
blip2_llama_decoder_step in csrc/decoder_step.c): the kernel against the PyTorch formula, then the
model's steps against its layers run one by one."""

from __future__ import annotations

import pytest
import torch

import blip2
from blip2 import native
from blip2.generate import OPTRunner
from blip2.models import decoder_step
from blip2.quantize import kernels
from conftest import assert_steps_match_layers, count_rows, kind_fixture
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
# position and a later one; grouped key/value heads (2 and 4 query heads a key/value head) and one
# key/value head for all
CASES = [
    (1, 8, 2, 4, 12, 0, 2),
    (3, 20, 4, 6, 36, 6, 4),
    (2, 48, 3, 16, 100, 9, 3),
    (3, 20, 4, 6, 36, 6, 2),
    (2, 40, 8, 6, 24, 5, 2),
    (2, 24, 6, 4, 20, 3, 1),
]


@pytest.mark.parametrize("rows, hidden, heads, head_dim, mlp, position, kv_heads", CASES)
def test_kernel_matches_the_pytorch_formula(kernel, rows, hidden, heads, head_dim, mlp, position, kv_heads):
    decoder = native.PythonLinearLlamaDecoder(rows + hidden, 3, hidden, heads, head_dim, mlp, kv_heads)
    same_caches, got, want = decoder.compare(kernel, rows, max_len=position + 3, position=position)
    assert same_caches
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_grouped_heads_are_not_the_ungrouped_formula(kernel):
    """The reference's grouping is real: query head h meets key/value head h // group, and a kernel
    pairing them another way would not match it."""
    decoder = native.PythonLinearLlamaDecoder(4, 1, 16, 4, 4, 12, kv_heads=2)
    x, caches, mask, cos, sin = decoder.step_inputs(2, 5, 3)
    blocks = decoder.blocks
    want = native.reference_llama_decoder_step(
        x, blocks, [(k.clone(), v.clone()) for k, v in caches], mask, cos, sin, 3, 4, decoder.eps, 2
    )
    # the same step with the two key/value heads swapped for query heads 1 and 2
    swapped = [{**p, "q_weight": p["q_weight"].view(4, 4, -1)[[0, 2, 1, 3]].reshape(16, -1)} for p in blocks]
    swapped = [{**p, "o_weight": p["o_weight"].view(-1, 4, 4)[:, [0, 2, 1, 3]].reshape(-1, 16)}
               for p in swapped]  # fmt: skip
    other = native.reference_llama_decoder_step(
        x, swapped, [(k.clone(), v.clone()) for k, v in caches], mask, cos, sin, 3, 4, decoder.eps, 2
    )
    assert not torch.allclose(other, want, rtol=1e-3, atol=1e-3)
    got = x.clone()
    native.llama_decoder_step(kernel, decoder.decoder, got, caches, mask, cos, sin, 3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_a_row_alone_equals_its_row_in_a_batch(kernel, kv_heads):
    decoder = native.PythonLinearLlamaDecoder(5, 2, 24, 4, 8, 40, kv_heads)
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
        # caches with a head for every query head, where the decoder groups them two by two
        lambda i: {**i, "caches": [tuple(t.repeat_interleave(2, 1) for t in c) for c in i["caches"]]},
    ],
)
def test_refuses_what_it_cannot_take(kernel, change):
    decoder = native.PythonLinearLlamaDecoder(6, 2, 16, 4, 4, 24, kv_heads=2)
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
@pytest.mark.parametrize("method, grouped", [("int8", False), ("int4", False), ("int4", True)])
def test_llama_steps_equal_the_layers_run_one_by_one(
    kernel, step_calls, monkeypatch, llama_ckpt, instruct_llama_ckpt, method, grouped
):
    lm = blip2.load(instruct_llama_ckpt if grouped else llama_ckpt, quantize=method).model.language_model
    assert (lm.cfg.num_kv_heads < lm.cfg.num_heads) == grouped
    generator = torch.Generator().manual_seed(3)
    embeds = torch.randn(3, 7, lm.hidden_size, generator=generator)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding: that row's positions start later
    tokens = torch.randint(3, lm.cfg.vocab_size, (3, 6), generator=generator)
    native_logits = _steps(lm, embeds, mask, tokens)
    assert step_calls == [3] * tokens.shape[1]
    monkeypatch.setattr(decoder_step, "run_llama", lambda *args: None)
    layered = _steps(lm, embeds, mask, tokens)
    assert_steps_match_layers(native_logits, layered)


@needs_lowbit
def test_quantized_llama_pipelines_take_it_and_others_do_not(step_calls, llama_ckpt, instruct_llama_ckpt):
    images = make_images(3, 28, seed=6)
    blip2.load(llama_ckpt).generate_ids(images, ["what is it?"] * 3, max_new_tokens=3)
    assert step_calls == []  # float32 layers offer no native description
    prompts = ["what is it?", "describe it", "colour?"]
    for ckpt in (llama_ckpt, instruct_llama_ckpt):  # (the second's key/value heads grouped)
        step_calls.clear()
        m = blip2.load(ckpt, quantize="int4")
        batch = m.generate_ids(images, prompts, max_new_tokens=5, min_new_tokens=5)
        assert step_calls and set(step_calls) == {3}
        alone = [
            m.generate_ids([image], [p], max_new_tokens=5, min_new_tokens=5)[0]
            for image, p in zip(images, prompts, strict=True)
        ]
        assert alone == batch
