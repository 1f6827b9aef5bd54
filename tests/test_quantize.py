"""Weight-only int8: close to float32 on the test checkpoints, loads through `blip2.load`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import blip2
from blip2.layers import Linear
from blip2.quantize import Int8Linear, quantize_model_, quantize_weight
from factory import make_images


def test_quantize_weight_round_trip():
    w = torch.randn(64, 96)
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    assert q.abs().max() <= 127
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-6).all())


@pytest.mark.parametrize("kernel", ["fbgemm", "dequant"])
def test_int8_linear_close_to_float(kernel):
    if kernel == "fbgemm" and not blip2.quantize._fbgemm_available():
        pytest.skip("no fbgemm quantized ops in this torch build")
    torch.manual_seed(0)
    lin = nn.Linear(96, 64)
    q = Int8Linear.from_linear(lin, kernel)
    assert torch.equal(q.int8_weight(), quantize_weight(lin.weight)[0])
    for shape in [(1, 96), (3, 5, 96)]:
        x = torch.randn(*shape)
        ref, out = lin(x), q(x)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert F.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.999


def _inputs(m, n=2):
    enc = m.processor(images=make_images(n), text=["a photo of", "Question: what is it? Answer:"][:n])
    return enc


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_int8_logits_close_to_float32(lm, opt_ckpt, t5_ckpt):
    path = opt_ckpt if lm == "opt" else t5_ckpt
    ref = blip2.load(path)
    m = blip2.load(path, quantize="int8")
    kinds = {
        type(mod)
        for part in (m.model.vision, m.model.qformer, m.model.language_model)
        for mod in part.modules()
    }
    assert Int8Linear in kinds and Linear not in kinds  # vision, Q-Former and language model all int8
    assert type(m.model.projection) is Linear  # the projection stays float32
    enc = _inputs(ref)
    kwargs = {}
    if lm == "t5":
        kwargs["decoder_input_ids"] = torch.tensor([[0, 5, 9, 3], [0, 7, 2, 4]])
    with torch.inference_mode():
        a = ref.model(**enc, **kwargs).logits
        b = m.model(**enc, **kwargs).logits
    cos = F.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1)
    assert bool((cos >= 0.99).all()), cos
    # per position too: every next-token distribution stays close
    per_pos = F.cosine_similarity(a, b, dim=-1)
    assert per_pos.min() >= 0.98, per_pos.min()


def test_quantize_model_counts_and_rejects_unknown_mode(opt_ckpt):
    m = blip2.load(opt_ckpt)
    n_linear = sum(
        type(mod) is Linear
        for part in (m.model.vision, m.model.qformer, m.model.language_model)
        for mod in part.modules()
    )
    assert quantize_model_(m.model) == n_linear
    with pytest.raises(ValueError, match="quantize"):
        blip2.load(opt_ckpt, quantize="int4")


def test_int8_generation_runs(opt_ckpt):
    m = blip2.load(opt_ckpt, quantize="int8")
    if not hasattr(m, "caption"):
        pytest.skip("generation API not available")
    out = m.caption(make_images(2), max_new_tokens=5)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
