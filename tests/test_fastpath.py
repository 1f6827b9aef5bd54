"""CPU fast paths give what the plain path gives: reused prefill keys/values equal recomputing them."""

from __future__ import annotations

import torch

import blip2
from blip2.generate import GenerationConfig, PrefillCache, generate_ids
from factory import make_images


def _lm_inputs(m, image, question):
    lm, embeds, mask, ids, ids_mask, cfg = m._prepare(image, f"Question: {question} Answer:", {})
    return lm, embeds, mask, cfg


def test_prefill_cache_equals_recompute(opt_ckpt):
    m = blip2.load(opt_ckpt)
    image = make_images(1)[0]
    shared = m.model.cfg.num_query_tokens + 1
    cache = PrefillCache()
    cfg = GenerationConfig(max_new_tokens=8, min_new_tokens=8)
    with torch.inference_mode():
        for i, question in enumerate(["what is it?", "how many dogs are there?", "is it red?"]):
            lm, embeds, mask, _ = _lm_inputs(m, image, question)
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
            lm, embeds, mask, _ = _lm_inputs(m, image, "what is it?")
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


def test_batched_prompts_do_not_use_the_prefill_cache(opt_ckpt):
    m = blip2.load(opt_ckpt)
    images = make_images(2)
    out = m.generate(
        images, ["Question: what? Answer:", "Question: where is the cat? Answer:"], max_new_tokens=4
    )
    assert len(out) == 2 and m.prefill_cache.hits == 0 and len(m.prefill_cache._entries) == 0
