"""A row's logits are the same bits alone and in any batch: captions, beams, T5, image embeddings.

Batches are sized past both kinds' old row limits (16 and 256 rows per linear call): 16 demo images
are 272 rows in the image encoder and 336 in the prefill; each image alone is 17 and 21.
"""

from __future__ import annotations

import pytest
import torch

import blip2
from blip2.demo import scenes
from blip2.models import layers
from factory import make_images


@pytest.fixture
def native_kernel():
    """The process's own kernel choice, which must be the native kernel (both kinds: native_kind)."""
    if layers.float32_kernel()[0] != "native":
        pytest.skip("no native kernel here (see blip2.native)")


def _images(count: int, seed: int):
    return [scene.render() for scene in scenes.generate(seed, count)]


def _logits_of(pipeline):
    """A list that collects every next-token logits tensor the language model produces."""
    seen: list[torch.Tensor] = []
    pipeline.model.language_model.lm_head.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    return seen


def _alone(pipeline, image, **gen) -> list[int]:
    pipeline.prefix_cache.clear()  # the image encoded alone, not taken from the batch's cache
    pipeline.prefill_cache.clear()
    return pipeline.generate_ids(image, None, **gen)[0]


def test_captions_alone_equal_their_rows_in_a_batch(native_kind):
    _check_captions(16)


def test_captions_of_8_alone_equal_their_rows(native_kernel):
    _check_captions(8)


def _check_captions(count: int) -> None:
    m = blip2.load("demo")
    seen = _logits_of(m)
    images = _images(count, seed=7)
    gen = dict(max_new_tokens=6, min_new_tokens=6)
    batch_ids = m.generate_ids(images, None, **gen)
    batch_logits = list(seen)
    assert len(batch_logits) == 6 and batch_logits[0].shape[0] == count
    for i in range(0, count, 3):
        seen.clear()
        assert _alone(m, images[i], **gen) == batch_ids[i]
        assert all(torch.equal(step[i : i + 1], own) for step, own in zip(batch_logits, seen, strict=True)), i


def test_beams_alone_equal_their_rows_in_a_batch(native_kernel):
    m = blip2.load("demo")
    seen = _logits_of(m)
    images, beams = _images(5, seed=3), 4
    gen = dict(max_new_tokens=5, min_new_tokens=5, num_beams=beams)
    batch_ids = m.generate_ids(images, None, **gen)
    batch_logits = list(seen)  # the prefill (5 rows), then 5 x 4 beam rows per step
    for i in (0, 4):
        seen.clear()
        assert _alone(m, images[i], **gen) == batch_ids[i]
        assert torch.equal(batch_logits[0][i : i + 1], seen[0])
        rows = slice(i * beams, (i + 1) * beams)
        assert all(torch.equal(step[rows], own) for step, own in zip(batch_logits[1:], seen[1:], strict=True))


def test_t5_answers_alone_equal_their_rows_in_a_batch(native_kernel, t5_ckpt):
    m = blip2.load(t5_ckpt)
    seen = _logits_of(m)
    images = make_images(6, seed=5)
    prompts = ["Question: what is it? Answer:"] * 6
    gen = dict(max_new_tokens=5, min_new_tokens=5)
    batch_ids = m.generate_ids(images, prompts, **gen)
    batch_logits = list(seen)
    for i in (0, 5):
        seen.clear()
        m.prefix_cache.clear()
        assert m.generate_ids(images[i], prompts[:1], **gen)[0] == batch_ids[i]
        assert all(torch.equal(step[i : i + 1], own) for step, own in zip(batch_logits, seen, strict=True))


def test_image_embeddings_alone_equal_their_rows_in_a_batch(native_kernel):
    m = blip2.load("demo-itm")
    images = _images(16, seed=11)
    together = m.embed_images(images)
    for i in (0, 9, 15):
        assert torch.equal(m.embed_images([images[i]]), together[i : i + 1])
