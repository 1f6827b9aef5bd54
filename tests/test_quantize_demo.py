"""int8 and int4 on a model that has learned something: the shipped demo model scores as in float32."""

from __future__ import annotations

import pytest

import blip2
from blip2.demo.evaluate import evaluate

SEED = 90210  # held-out scenes, as test_demo's


@pytest.fixture(scope="module")
def float32_scores():
    return evaluate(pipeline=blip2.load("demo"), seed=SEED, count=24)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_demo_scores_within_two_points_of_float32(method, float32_scores):
    scores = evaluate(pipeline=blip2.load("demo", quantize=method), seed=SEED, count=24)
    assert (
        float32_scores["caption_exact_match"] >= 0.8
    )  # the float model knows the task, so this means something
    for key in ("caption_exact_match", "vqa_accuracy"):
        assert abs(scores[key] - float32_scores[key]) <= 0.02, (key, scores, float32_scores)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("seed", [SEED, 4242])
def test_quantized_demo_scores_on_more_scenes(method, seed):
    reference = evaluate(pipeline=blip2.load("demo"), seed=seed, count=200)
    scores = evaluate(pipeline=blip2.load("demo", quantize=method), seed=seed, count=200)
    for key in ("caption_exact_match", "vqa_accuracy"):
        assert abs(scores[key] - reference[key]) <= 0.02, (key, scores, reference)
