"""Scoring a demo checkpoint on fresh held-out scenes, through the public API only.

``caption_exact_match``: the greedy caption equals the scene's canonical caption.
``vqa_accuracy``: the greedy answer (``Question: … Answer:`` prompt, as ``Pipeline.ask``) equals the
one-word answer, case and surrounding spaces aside.

The standard scores beside them (through :mod:`blip2.eval`): ``caption_scores``, pycocoevalcap's
BLEU-1..4, METEOR, ROUGE-L and CIDEr against the one canonical caption (or why they are unavailable:
they need pycocoevalcap and Java); ``vqa_official``, the official VQA accuracy in percent, overall
and per answer type, the scene's answer standing for all ten human answers, normalised as VQAv2's
annotations are.
"""

from __future__ import annotations

import os

import numpy as np

from ..chat import QUESTION_TEMPLATE
from .scenes import generate

QUESTIONS_PER_SCENE = 3


def evaluate(
    model: str | os.PathLike = "demo",
    seed: int = 0,
    count: int = 100,
    batch_size: int = 64,
    questions_per_scene: int = QUESTIONS_PER_SCENE,
    pipeline=None,
) -> dict:
    """Caption exact match and VQA accuracy on ``count`` held-out scenes drawn from ``seed``."""
    import blip2

    m = pipeline if pipeline is not None else blip2.load(model)
    scene_list = generate(seed, count, "heldout")
    images = [s.render() for s in scene_list]
    captions: list[str] = []
    for i in range(0, len(images), batch_size):
        captions += m.caption(images[i : i + batch_size])
    exact = [c.strip() == s.caption for c, s in zip(captions, scene_list, strict=True)]

    rng = np.random.default_rng([seed, 7])
    qa = [
        (image, q, a)
        for image, s in zip(images, scene_list, strict=True)
        for q, a in s.sample_questions(rng, questions_per_scene)
    ]
    answers: list[str] = []
    for i in range(0, len(qa), batch_size):
        chunk = qa[i : i + batch_size]
        answers += m.generate([x[0] for x in chunk], [QUESTION_TEMPLATE.format(x[1]) for x in chunk])
    right = [ans.strip().lower() == a for ans, (_, _, a) in zip(answers, qa, strict=True)]
    return {
        "model": str(model),
        "seed": seed,
        "count": count,
        "caption_exact_match": round(float(np.mean(exact)), 4),
        "vqa_accuracy": round(float(np.mean(right)), 4),
        "questions": len(qa),
        "caption_scores": standard_caption_scores(captions, [s.caption for s in scene_list]),
        "vqa_official": official_vqa_accuracy(answers, [(q, a) for _, q, a in qa]),
    }


def standard_caption_scores(captions: list[str], references: list[str]) -> dict:
    """pycocoevalcap's scores (no SPICE) of each caption against its one reference, rounded to 4
    places; ``{"unavailable": why}`` without pycocoevalcap or Java."""
    from ..errors import DependencyError
    from ..eval.caption import score_captions

    try:
        result = score_captions(
            dict(enumerate(captions)), {i: [r] for i, r in enumerate(references)}, spice=False
        )
    except DependencyError as e:
        return {"unavailable": str(e)}
    return {name: round(value, 4) for name, value in result.scores.items()}


def official_vqa_accuracy(answers: list[str], questions: list[tuple[str, str]]) -> dict:
    """The official VQA accuracy (percent) of ``answers`` to ``(question, answer)`` pairs, overall and per
    answer type (yes/no, number, other)."""
    from ..eval.vqa import VqaReference, normalize_answer, vqa_accuracy

    def answer_type(question: str, answer: str) -> str:
        return (
            "yes/no" if answer in ("yes", "no") else "number" if question.startswith("how many") else "other"
        )

    references = {
        i: VqaReference((normalize_answer(a),) * 10, answer_type(q, a)) for i, (q, a) in enumerate(questions)
    }
    scores, _ = vqa_accuracy(dict(enumerate(answers)), references)
    return {"overall": scores["overall"], **scores["perAnswerType"]}
