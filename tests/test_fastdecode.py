"""Static-shape decode steps (``blip2.fastdecode``) on the CPU: the steps a CUDA graph captures, run
eagerly (``compile="static"``), give the plain decode's tokens; buffers are kept per shape and reused.
The capture itself runs in tests/test_gpu.py."""

from __future__ import annotations

import logging

import pytest
import torch

import blip2
from blip2.fastdecode import LENGTH_BUCKET, StaticDecoder
from factory import make_images

PROMPTS = ["a photo of", "question: what colour is the ball? answer:", ""]
GEN = [
    dict(max_new_tokens=12),
    dict(max_new_tokens=10, num_beams=3),
    dict(max_new_tokens=6, repetition_penalty=1.3, min_new_tokens=3),
    dict(max_new_tokens=8, do_sample=True, seed=4, top_k=20),
]


@pytest.fixture(scope="module")
def pipes(lm_kind_ckpt):
    _, path = lm_kind_ckpt
    return blip2.load(path), blip2.load(path, compile="static")


def test_static_steps_give_the_plain_tokens(pipes):
    plain, static = pipes
    images = make_images(3, seed=7)
    for gen in GEN:
        assert static.generate_ids(images, PROMPTS, **gen) == plain.generate_ids(images, PROMPTS, **gen), gen
    shapes = static.decoder._shapes
    assert shapes and all(not s.busy for s in shapes.values())
    assert all(key[2] % LENGTH_BUCKET == 0 for key in shapes)  # lengths rounded up: shapes are reused
    steps = {key: s.steps for key, s in shapes.items()}
    assert static.generate(images[:1], PROMPTS[:1], max_new_tokens=9) == plain.generate(
        images[:1], PROMPTS[:1], max_new_tokens=9
    )
    assert static.generate(images[:1], "a", max_new_tokens=7) == plain.generate(
        images[:1], "a", max_new_tokens=7
    )
    after = {key: s.steps for key, s in static.decoder._shapes.items()}
    reused = [k for k in after if k in steps and after[k] > steps[k]]
    assert len(after) == len(steps) + 1 and not reused  # one new shape (one row), used twice
    one_row = next(k for k in after if k not in steps)
    assert after[one_row] > 9


def test_forced_tokens_through_static_steps(pipes):
    """A resumed run (``forced`` tokens, rows forced to different lengths) on static steps gives the
    plain decode's steps."""
    plain, static = pipes
    images = make_images(3, seed=10)
    whole = plain.generate_ids(images, PROMPTS, max_new_tokens=8)
    forced = [row[:k] for row, k in zip(whole, (3, 0, 5), strict=True)]
    gen = dict(forced=forced, max_new_tokens=8)
    steps = list(static.generate_steps(images, PROMPTS, **gen))
    assert steps == list(plain.generate_steps(images, PROMPTS, **gen))
    assert [[t for t in col if t is not None] for col in zip(*steps, strict=True)] == whole


def test_static_step_logits_equal_the_plain_step(pipes):
    plain, _ = pipes
    from blip2.generate import make_runner

    lm, embeds, mask, *_ = plain._prepare(make_images(2, seed=8), PROMPTS[:2], {})
    with torch.inference_mode():
        a = make_runner(lm, embeds, mask, 5)
        b = StaticDecoder("static").wrap(make_runner(lm, embeds, mask, 5))
        assert torch.equal(a.prefill(), b.prefill())
        tokens = torch.tensor([5, 9])
        for _ in range(4):
            la, lb = a.step(tokens), b.step(tokens)
            assert torch.allclose(la, lb, atol=1e-5, rtol=1e-5)
            tokens = la.argmax(-1)
        b.close()


def test_a_shape_in_use_decodes_the_plain_way_and_old_shapes_leave(pipes):
    plain, static = pipes
    images = make_images(3, seed=9)
    first = static.generate_steps(images, PROMPTS, max_new_tokens=6)
    second = static.generate_steps(images, PROMPTS, max_new_tokens=6)
    rows = list(zip(first, second, strict=True))  # interleaved: the second finds the buffers busy
    assert [a for a, _ in rows] == [b for _, b in rows]
    assert [a for a, _ in rows] == list(plain.generate_steps(images, PROMPTS, max_new_tokens=6))
    decoder = StaticDecoder("static", max_shapes=1)
    static.decoder, kept = decoder, static.decoder
    try:
        for n in (1, 2, 3):
            static.generate(images[:n], PROMPTS[:n], max_new_tokens=4)
            assert len(decoder._shapes) == 1 and next(iter(decoder._shapes))[1] == n
    finally:
        static.decoder = kept


def test_compile_outside_cuda_decodes_the_plain_way(opt_ckpt, caplog):
    with caplog.at_level(logging.WARNING, logger="blip2.api"):
        pipe = blip2.load(opt_ckpt, compile=True)
    assert pipe.decoder is None and "runs on CUDA only" in caplog.text
    with pytest.raises(ValueError, match="compile must be False, True"):
        blip2.load(opt_ckpt, compile="fast")
