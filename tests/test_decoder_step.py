"""A whole decode step in one native call (``blip2.native.decoder_step``, ``blip2.models.decoder_step``):
equal to the PyTorch formula, to the OPT layers run one by one, and batch-invariant; used for int8 and
int4 OPT decoders only, and only where it may run."""

from __future__ import annotations

import pytest
import torch

import blip2
from blip2 import native
from blip2.generate import OPTRunner
from blip2.models import decoder_step
from blip2.models.config import OPTConfig
from blip2.models.language.opt import OPT
from blip2.models.layers import Linear, normal_init_
from blip2.quantize import Int4Linear, Int8Linear, kernels
from conftest import assert_steps_match_layers, count_rows, kind_fixture
from factory import make_images

needs_lowbit = pytest.mark.skipif(kernels.native_kind() is None, reason="no native low-bit kernel here")


kernel = kind_fixture(native.decoder_step_kernel, "decoder step")


@pytest.fixture
def step_calls(monkeypatch) -> list[int]:
    """Counts the native steps taken (rows of each)."""
    return count_rows(monkeypatch, "decoder_step", native.decoder_step_kernel)


def _layer_by_layer(monkeypatch) -> None:
    monkeypatch.setattr(decoder_step, "run", lambda *args: False)


# ---- the kernel against the formula -----------------------------------------------------------------

# odd widths (vector tails), one row and several, the first position and a later one
CASES = [(1, 8, 2, 12, 0), (3, 20, 4, 36, 6), (2, 48, 3, 100, 9), (5, 64, 4, 256, 3)]


@pytest.mark.parametrize("rows, hidden, heads, mlp, position", CASES)
@pytest.mark.parametrize("pre_norm, affine", [(True, True), (True, False), (False, True)])
def test_kernel_matches_the_pytorch_formula(kernel, rows, hidden, heads, mlp, position, pre_norm, affine):
    decoder = native.PythonLinearDecoder(rows + hidden, 3, hidden, heads, mlp, pre_norm, affine)
    same_caches, got, want = decoder.compare(kernel, rows, max_len=position + 3, position=position)
    assert same_caches
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_row_alone_equals_its_row_in_a_batch(kernel):
    decoder = native.PythonLinearDecoder(5, 2, 20, 4, 36, pre_norm=True, affine=True)
    x, caches, mask = decoder.step_inputs(rows=4, max_len=9, position=6)
    alone = [(k[2:3].clone(), v[2:3].clone()) for k, v in caches]
    row = x[2:3].clone()
    native.decoder_step(kernel, decoder.decoder, x, caches, mask, 6)
    native.decoder_step(kernel, decoder.decoder, row, alone, mask[2:3], 6)
    assert torch.equal(row, x[2:3])  # (the callback computes each row alone, as the real kernels do)
    assert all(
        torch.equal(a[0], b[2])
        for pair, alone_pair in zip(caches, alone, strict=True)
        for a, b in zip(alone_pair, pair, strict=True)
    )


def test_self_check_catches_a_kernel_that_does_nothing():
    assert native._decoder_step_self_check(lambda decoder, call: 0) is False


def test_refuses_what_it_cannot_take(kernel):
    decoder = native.PythonLinearDecoder(0, 2, 12, 3, 20, pre_norm=True, affine=True)
    x, caches, mask = decoder.step_inputs(rows=2, max_len=5, position=4)
    bad = {
        "a full cache": (x, caches, mask, 5),
        "a layer short": (x, caches[:1], mask, 4),
        "a float mask": (x, caches, mask.float(), 4),
        "a short mask": (x, caches, mask[:, :4], 4),
        "a strided x": (x.t().contiguous().t(), caches, mask, 4),
        "a cache of another shape": (x, [(k[:, :, :4], v) for k, v in caches], mask, 4),
    }
    for what, (x_, caches_, mask_, position) in bad.items():
        with pytest.raises(ValueError, match="decoder_step takes"):
            native.decoder_step(kernel, decoder.decoder, x_, caches_, mask_, position)
            pytest.fail(f"took {what}")


# ---- OPT models -------------------------------------------------------------------------------------


def _steps(lm: OPT, embeds: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, steps, V) logits of decode steps fed ``tokens`` (B, steps) after prefilling ``embeds``."""
    with torch.inference_mode():
        runner = OPTRunner(lm, embeds, mask, tokens.shape[1] + 1)
        runner.prefill()
        return torch.stack([runner.step(tokens[:, i]) for i in range(tokens.shape[1])], 1)


def _quantized_opt(pre_norm: bool, method: str, seed: int = 0) -> OPT:
    cfg = OPTConfig(vocab_size=300, hidden_size=64, num_layers=3, num_heads=4, mlp_size=160,
                    word_embed_proj_dim=64, pre_norm=pre_norm, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(seed)
    lm = OPT(cfg).eval()
    normal_init_(lm, std=0.2)
    for module in lm.modules():
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.weight, 1.0, 0.2)
            torch.nn.init.normal_(module.bias, 0.0, 0.2)
    for name, module in list(lm.named_modules()):
        if isinstance(module, Linear) and name != "lm_head":
            quantized = (
                Int4Linear.from_linear(module, 128) if method == "int4" else Int8Linear.from_linear(module)
            )
            parent, _, child = name.rpartition(".")
            setattr(lm.get_submodule(parent), child, quantized)
    return lm


def _inputs(lm: OPT, rows: int = 3, length: int = 7, steps: int = 6, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(rows, length, lm.cfg.hidden_size, generator=generator)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    tokens = torch.randint(3, lm.cfg.vocab_size, (rows, steps), generator=generator)
    return embeds, mask, tokens


@needs_lowbit
@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("pre_norm", [True, False])
def test_opt_steps_equal_the_layers_run_one_by_one(kernel, step_calls, monkeypatch, method, pre_norm):
    lm = _quantized_opt(pre_norm, method)
    embeds, mask, tokens = _inputs(lm)
    native_logits = _steps(lm, embeds, mask, tokens)
    assert step_calls == [3] * tokens.shape[1]
    _layer_by_layer(monkeypatch)
    layered = _steps(lm, embeds, mask, tokens)
    # the layer norms round differently in their last bits, which can move an activation across an int8
    # rounding boundary: close, not equal
    assert_steps_match_layers(native_logits, layered)
    torch.testing.assert_close(native_logits, layered, rtol=0.02, atol=0.02 * float(layered.abs().max()))


@needs_lowbit
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_opt_row_alone_equals_its_row_in_a_batch(kernel, step_calls, method):
    lm = _quantized_opt(True, method, seed=3)
    embeds, mask, tokens = _inputs(lm, rows=5, seed=4)
    batch = _steps(lm, embeds, mask, tokens)
    for i in (0, 1, 4):
        assert torch.equal(_steps(lm, embeds[i : i + 1], mask[i : i + 1], tokens[i : i + 1])[0], batch[i]), i
    assert step_calls and set(step_calls) == {5, 1}


def _replace_bias(lm: OPT) -> None:
    q = lm.layers[1].attn.q
    q.bias = q.bias + 1.0  # a new tensor: the layer's description is made again


def _replace_layer(lm: OPT) -> None:
    fc1 = lm.layers[2].mlp.fc1
    torch.manual_seed(9)
    lm.layers[2].mlp.fc1 = Int8Linear.from_linear(
        Linear(fc1.in_features, fc1.out_features).requires_grad_(False)
    )


def _replace_norm(lm: OPT) -> None:
    norm = lm.layers[0].norm2
    norm.weight = torch.nn.Parameter(norm.weight.detach() * 2.0)


@needs_lowbit
@pytest.mark.parametrize("replace", [_replace_bias, _replace_layer, _replace_norm])
def test_replaced_weights_are_described_again(step_calls, monkeypatch, replace):
    lm = _quantized_opt(True, "int8", seed=5)
    embeds, mask, tokens = _inputs(lm)
    before = _steps(lm, embeds, mask, tokens)
    replace(lm)
    after = _steps(lm, embeds, mask, tokens)
    assert len(step_calls) == 2 * tokens.shape[1]
    assert not torch.allclose(before, after)
    _layer_by_layer(monkeypatch)
    torch.testing.assert_close(
        after, _steps(lm, embeds, mask, tokens), rtol=0.02, atol=0.02 * float(after.abs().max())
    )


def test_float32_and_training_keep_the_layers(step_calls, opt_ckpt):
    m = blip2.load(opt_ckpt)  # float32 layers offer no native description
    images = make_images(2, 28, seed=2)
    m.generate_ids(images, None, max_new_tokens=3)
    assert step_calls == []


@needs_lowbit
def test_quantized_pipelines_take_the_native_step(step_calls, opt_ckpt):
    m = blip2.load(opt_ckpt, quantize="int4")
    images = make_images(3, 28, seed=6)
    batch = m.generate_ids(images, None, max_new_tokens=5, min_new_tokens=5)
    assert step_calls == [3] * 4
    assert [m.generate_ids([image], None, max_new_tokens=5, min_new_tokens=5)[0] for image in images] == batch
    beams = m.generate_ids(images[:2], None, max_new_tokens=4, min_new_tokens=4, num_beams=3)
    assert len(beams) == 2 and 6 in step_calls  # 2 images x 3 beams


@needs_lowbit
def test_a_full_cache_is_still_refused_by_the_layers(step_calls):
    lm = _quantized_opt(True, "int8")
    embeds, mask, tokens = _inputs(lm, steps=2)
    rows, length = mask.shape
    cache = lm.new_cache(rows, length + 1)  # room for one new position
    full_mask = torch.cat([mask, torch.ones(rows, 2, dtype=torch.long)], 1)
    with torch.inference_mode():
        lm(embeds, mask, cache, start=0)
        lm(lm.embed(tokens[:, :1]), full_mask[:, : length + 1], cache, start=length)
        assert step_calls == [rows]
        with pytest.raises(ValueError, match="KV cache holds"):
            lm(lm.embed(tokens[:, 1:]), full_mask, cache, start=length + 1)
