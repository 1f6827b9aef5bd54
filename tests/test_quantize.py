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


PROMPTS = [
    "a photo of",
    "Question: how many dogs are there? Answer:",
    "",
    "the red",
    "a",
    "Question: where is the cat? Answer:",
    "There are two green cubes and a",
    "the",
]


def _logits_along(m, image, prompt: str, ids: list[int], lm: str) -> torch.Tensor:
    """(len(ids), V) next-token logits at each step of the given continuation (teacher forcing)."""
    enc = m.processor(images=[image], text=[prompt])
    with torch.inference_mode():
        if lm == "t5":
            start = m.model.cfg.text.decoder_start_token_id
            return m.model(**enc, decoder_input_ids=torch.tensor([[start, *ids]])).logits[0, : len(ids)]
        k = enc["input_ids"].shape[1]
        full = torch.cat([enc["input_ids"], torch.tensor([ids], dtype=torch.long)], dim=1)
        out = m.model(**dict(enc, input_ids=full, attention_mask=torch.ones_like(full))).logits
    return out[0, k - 1 : k - 1 + len(ids)]


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_int8_generation_agrees_with_float32(lm, opt_ckpt, t5_ckpt):
    """int8 greedy texts held to float32's on 8 images x 8 prompts.

    Random test weights give next-token distributions full of near ties (the median gap between the
    two best logits is ~0.3 logit std), so int8's rounding flips some of them and the texts part from
    there. Measured on these checkpoints: texts identical 44/64 (OPT) and 34/64 (T5); along float32's
    text int8 picks the same token at 95% / 92% of steps, with logit cosine >= 0.992; every text parts
    at a step where float32's two best logits are within 0.24 std. The thresholds below leave room for
    other CPUs' rounding, and still fail for any real fault (chance agreement is ~1/400 a token).
    """
    path = opt_ckpt if lm == "opt" else t5_ckpt
    ref, m = blip2.load(path), blip2.load(path, quantize="int8")
    images = make_images(8, 28, seed=21)
    same_texts = steps = same_steps = 0
    for prompt in PROMPTS:
        want = ref.generate_ids(images, prompt, max_new_tokens=8)
        got = m.generate_ids(images, prompt, max_new_tokens=8)
        for image, a, b in zip(images, want, got, strict=True):
            la = _logits_along(ref, image, prompt, a, lm)
            lb = _logits_along(m, image, prompt, a, lm)
            assert la.argmax(-1).tolist() == a  # the forward pass is the float32 generation's
            cos = F.cosine_similarity(la, lb, dim=-1)
            assert cos.min() >= 0.98 and cos.mean() >= 0.99, (prompt, cos)
            steps += len(a)
            same_steps += int((la.argmax(-1) == lb.argmax(-1)).sum())
            same_texts += a == b
            if a != b:  # int8 parts from float32 only where float32 was all but tied
                j = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
                top = la[j].topk(2).values
                assert top[0] - top[1] < 0.4 * la[j].std(), (prompt, j, top)
    n = len(PROMPTS) * len(images)
    assert same_texts >= 0.4 * n, f"int8 texts equal float32's for {same_texts}/{n}"
    assert same_steps >= 0.85 * steps, f"int8 picks float32's token at {same_steps}/{steps} steps"
