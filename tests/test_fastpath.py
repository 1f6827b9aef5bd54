"""CPU fast paths give what the plain path gives: reused prefill keys/values equal recomputing them."""

from __future__ import annotations

import pytest
import torch

import blip2
from blip2.generate import GenerationConfig, PrefillCache, generate_ids
from factory import make_images


def _lm_inputs(m, image, question):
    lm, embeds, mask, *_ = m._prepare(image, f"Question: {question} Answer:", {})
    return lm, embeds, mask


def test_prefill_cache_equals_recompute(opt_ckpt):
    m = blip2.load(opt_ckpt)
    image = make_images(1)[0]
    shared = m.model.cfg.num_query_tokens + 1
    cache = PrefillCache()
    cfg = GenerationConfig(max_new_tokens=8, min_new_tokens=8)
    with torch.inference_mode():
        for i, question in enumerate(["what is it?", "how many dogs are there?", "is it red?"]):
            lm, embeds, mask = _lm_inputs(m, image, question)
            plain = generate_ids(lm, embeds, mask, cfg)
            cached = generate_ids(lm, embeds, mask, cfg, prefill_cache=cache, shared=shared)
            assert cached == plain
            assert cache.hits == i  # the first question fills the cache, the others reuse it
        # the logits themselves: prefill from the cache against a full prefill
        from blip2.generate import OPTRunner

        full = OPTRunner(lm, embeds, mask, 4).prefill()
        reused = OPTRunner(lm, embeds, mask, 4, cache, shared).prefill()
        torch.testing.assert_close(reused, full, rtol=1e-4, atol=1e-4)


def test_prefill_cache_keyed_by_image(opt_ckpt):
    m = blip2.load(opt_ckpt)
    a, b = make_images(2)
    cfg = GenerationConfig(max_new_tokens=6, min_new_tokens=6)
    shared = m.model.cfg.num_query_tokens + 1
    cache = PrefillCache()
    with torch.inference_mode():
        for image in (a, b, a):
            lm, embeds, mask = _lm_inputs(m, image, "what is it?")
            assert generate_ids(lm, embeds, mask, cfg, prefill_cache=cache, shared=shared) == generate_ids(
                lm, embeds, mask, cfg
            )
    assert cache.hits == 1


def test_pipeline_questions_reuse_the_image(opt_ckpt):
    m = blip2.load(opt_ckpt)
    image = make_images(1)[0]
    first = [m.ask(image, q, max_new_tokens=5) for q in ("what is it?", "where is it?")]
    assert m.prefill_cache.hits >= 1
    m.prefill_cache.clear()
    m.prefill_cache.size = 0  # off
    again = [m.ask(image, q, max_new_tokens=5) for q in ("what is it?", "where is it?")]
    assert first == again


def test_batched_images_do_not_use_the_prefill_cache(opt_ckpt):
    m = blip2.load(opt_ckpt)
    images = make_images(2)
    out = m.generate(
        images, ["Question: what? Answer:", "Question: where is the cat? Answer:"], max_new_tokens=4
    )
    assert len(out) == 2 and m.prefill_cache.hits == 0 and len(m.prefill_cache._entries) == 0


QUESTIONS = ["what is it?", "how many dogs are there in the picture?", "where?"]


def test_questions_together_equal_each_alone(opt_ckpt, t5_ckpt):
    image = make_images(1, seed=9)[0]
    for ckpt in (opt_ckpt, t5_ckpt):
        m = blip2.load(ckpt)
        together = m.ask(image, QUESTIONS, max_new_tokens=6)
        m.prefix_cache.clear()
        m.prefill_cache.clear()
        assert together == [m.ask(image, q, max_new_tokens=6) for q in QUESTIONS]


def test_questions_together_encode_and_prefill_the_image_once(opt_ckpt):
    m = blip2.load(opt_ckpt)
    image = make_images(1, seed=9)[0]
    q = m.model.cfg.num_query_tokens
    seen: list[tuple[int, int]] = []  # (rows, positions) of each language-model pass
    images: list[int] = []
    lm_hook = m.model.language_model.register_forward_pre_hook(
        lambda _, a: seen.append(tuple(a[0].shape[:2]))
    )
    vision_hook = m.model.vision.register_forward_pre_hook(lambda _, a: images.append(a[0].shape[0]))
    try:
        m.ask(image, QUESTIONS, max_new_tokens=3)
    finally:
        lm_hook.remove()
        vision_hook.remove()
    assert images == [1]
    # image slots + BOS once for one row, then each question's own tokens for all rows, then decode steps
    assert seen[0] == (1, q + 1)
    assert seen[1][0] == len(QUESTIONS) and seen[2] == (len(QUESTIONS), 1)
    assert len(m.prefill_cache) == 1


def test_questions_must_be_strings(opt_ckpt):
    m = blip2.load(opt_ckpt)
    with pytest.raises(blip2.InputError, match="non-empty list of strings"):
        m.ask(make_images(1)[0], [])


def test_a_caption_is_prefilled_in_one_pass(opt_ckpt):
    """With nothing after BOS to share it with, image + BOS go through the language model in one pass."""
    m = blip2.load(opt_ckpt)
    q = m.model.cfg.num_query_tokens
    seen: list[tuple[int, int]] = []
    hook = m.model.language_model.register_forward_pre_hook(lambda _, a: seen.append(tuple(a[0].shape[:2])))
    try:
        m.caption(make_images(1, seed=4)[0], max_new_tokens=2, min_new_tokens=2)
        m.caption(make_images(2, seed=5), max_new_tokens=2, min_new_tokens=2)
    finally:
        hook.remove()
    assert seen == [(1, q + 1), (1, 1), (2, q + 1), (2, 1)]


def test_linear_matches_plain_linear_and_still_trains():
    from blip2.models.layers import Linear

    torch.manual_seed(0)
    layer = Linear(64, 48)
    plain = torch.nn.Linear(64, 48)
    plain.load_state_dict(layer.state_dict())
    for shape in [(1, 64), (4, 64), (2, 7, 64), (130, 64)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 5, 64)[:, ::2]  # a strided view
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-5)
    # with gradients on, it is nn.Linear: same values, same gradients
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).square().sum().backward()
    plain(x.detach().requires_grad_()).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad)
    assert x.grad is not None
    # half precision and no bias take the plain path
    half = Linear(64, 48, bias=False).to(torch.bfloat16)
    with torch.inference_mode():
        assert half(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
