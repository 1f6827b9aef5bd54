"""int8 and int4 on a model that has learned something: the shipped demo model scores as in float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import blip2
from blip2.chat import QUESTION_TEMPLATE
from blip2.demo.evaluate import evaluate
from blip2.demo.scenes import generate

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


@pytest.mark.parametrize("method,bound", [("int8", 0.99), ("int4", 0.98)])
def test_quantized_demo_logits_close_to_float32(method, bound):
    """The issue's logit bounds, on held-out scenes: captions and questions, every position's logits.

    Measured: int8 >= 0.9999, int4 0.998 mean / 0.997 lowest (the random test checkpoints move further
    under int4: see test_quantize.test_logits_close_to_float32 and bench/README.md "Low-bit weights").
    """
    scenes = generate(SEED, 8, "heldout")
    rng = np.random.default_rng(SEED)
    questions = [QUESTION_TEMPLATE.format(s.sample_questions(rng, 1)[0][0]) for s in scenes[4:]]
    reference = blip2.load("demo")
    inputs = reference.processor(images=[s.render() for s in scenes], text=["a photo of"] * 4 + questions)
    with torch.inference_mode():
        expected = reference.model(**inputs).logits
        got = blip2.load("demo", quantize=method).model(**inputs).logits
    assert not torch.equal(got, expected)
    cos = F.cosine_similarity(got.flatten(1), expected.flatten(1), dim=-1)
    assert cos.min() >= bound, cos


@pytest.fixture(scope="module")
def calibrated_demo():
    """The demo model in int4 calibrated by GPTQ on training scenes (caption prompts and questions)."""
    from blip2.quantize.calibrate import quantize_calibrated

    scenes = generate(0, 32, "train")
    rng = np.random.default_rng(0)
    prompts = [  # one per scene (prompts go to the images in turn): a caption prompt or its own question
        "a photo of" if i % 2 == 0 else QUESTION_TEMPLATE.format(s.sample_questions(rng, 1)[0][0])
        for i, s in enumerate(scenes)
    ]
    pipe = blip2.load("demo")
    quantize_calibrated(pipe, [s.render() for s in scenes], prompts=prompts, progress=False)
    return pipe


def test_calibrated_demo_scores_and_logits(calibrated_demo, float32_scores):
    """Calibrated int4 on held-out scenes: scores within two points of float32, logits closer than
    rounded int4's (measured 0.9991 lowest against 0.995)."""
    scores = evaluate(pipeline=calibrated_demo, seed=SEED, count=24)
    for key in ("caption_exact_match", "vqa_accuracy"):
        assert abs(scores[key] - float32_scores[key]) <= 0.02, (key, scores, float32_scores)
    scenes = generate(SEED, 8, "heldout")
    reference = blip2.load("demo")
    inputs = reference.processor(images=[s.render() for s in scenes], text=["a photo of"] * 8)
    with torch.inference_mode():
        expected = reference.model(**inputs).logits
        calibrated = calibrated_demo.model(**inputs).logits
        rounded = blip2.load("demo", quantize="int4").model(**inputs).logits
    cos = F.cosine_similarity(calibrated.flatten(1), expected.flatten(1), dim=-1)
    assert cos.min() >= 0.998, cos
    assert cos.mean() > F.cosine_similarity(rounded.flatten(1), expected.flatten(1), dim=-1).mean()
