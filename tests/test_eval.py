"""blip2.eval: VQA accuracy against hand-computed cases and an independent reading of the rules,
caption metrics against pycocoevalcap's own COCOEvalCap, retrieval recall against a hand-computed
score matrix, and the `blip2 eval` verbs on tiny COCO / VQAv2 / Karpathy files with the demo models."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

import blip2
from blip2.cli import main
from blip2.demo.scenes import generate
from blip2.eval import caption as caption_eval
from blip2.eval.data import clean_caption, read_karpathy
from blip2.eval.retrieval import (
    final_rankings,
    first_hit,
    rank_by_scores,
    rank_retrieval,
    recall_scores,
    rerank_pairs,
)
from blip2.eval.vqa import (
    CONTRACTIONS,
    PUNCTUATION,
    VqaReference,
    normalize_answer,
    question_accuracy,
    strip_punctuation,
    vqa_accuracy,
)
from blip2.retrieval import itm_logits, vision_features
from factory import make_images

# ---- VQA: each normalisation rule, by hand ----------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("black/white", "black white"),  # a mark inside a word becomes a space
        ("it's", "it s"),
        ("dog 's", "dog s"),  # a mark touching a space is deleted
        ("yes ,no", "yes no"),
        ("1,000 (about)", "1000 about"),  # a digit-comma-digit group: every mark is deleted
        ("(left)", " left "),
        ("t-shirt!", "t-shirt!"),  # '-' and '!' are not punctuation here
        ("3.5", "3.5"),  # a period before a digit stays
        ("end.", "end"),
        ("a.m.", "am"),
        ("5.5.", "5.5"),
        (".5", ".5"),
        ("x." * 40, "x" * 32 + "x." * 8),  # at most 32 periods go (the official count quirk)
    ],
)
def test_strip_punctuation(text, expected):
    assert strip_punctuation(text) == expected


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("  Yes\n", "yes"),  # whitespace and case
        ("\tno", "no"),
        ("The Dog", "dog"),  # articles
        ("a an the", ""),
        ("an apple", "apple"),
        ("Two", "2"),  # number words
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("eleven", "eleven"),
        ("dont", "don\u2019t"),  # contractions, with the official table's apostrophes
        ("cant", "can't"),
        ("isnt it", "isn\u2019t it"),
        ("somebody\u2019d", "somebodyd"),
        ("don't", "don t"),  # an ASCII apostrophe inside a word is punctuation first
        ("Two dogs.", "2 dogs"),
        ("1,000 (about)", "1000 about"),
    ],
)
def test_normalize_answer(answer, expected):
    assert normalize_answer(answer) == expected


@pytest.mark.parametrize(
    "prediction, humans, expected",
    [
        ("two", ["2"] * 3 + ["3"] * 7, 0.9),  # 3 matches: 3 subsets see 2 (2/3), 7 see 3 (1)
        ("3", ["2"] * 3 + ["3"] * 7, 1.0),
        ("2", ["2"] * 2 + ["3"] * 8, 0.6),  # 2 matches: 2 x 1/3 + 8 x 2/3, over 10
        ("2", ["2"] + ["3"] * 9, 0.3),  # 1 match: 9 x 1/3, over 10
        ("4", ["2"] * 3 + ["3"] * 7, 0.0),
        ("yes", ["Yes."] * 10, 0.0),  # all the same: the human answers are used as written
        ("yes", ["yes."] * 9 + ["no"], 1.0),  # they differ: their punctuation is stripped
        ("yes", ["Yes"] * 9 + ["no"], 0.0),  # ... but they are not lower-cased
    ],
)
def test_question_accuracy(prediction, humans, expected):
    assert question_accuracy(prediction, humans) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_aggregates_like_the_official_report():
    refs = {
        1: VqaReference(("2",) * 10, "number", "how many"),
        2: VqaReference(("yes",) * 2 + ("no",) * 8, "yes/no", "is the"),
        3: VqaReference(("red",) * 10, "other", "what color"),
    }
    scores, per_question = vqa_accuracy({1: "two", 2: "yes", 3: "blue"}, refs)
    assert per_question == pytest.approx({1: 1.0, 2: 0.6, 3: 0.0})
    assert scores["overall"] == round(100 * 1.6 / 3, 2) == 53.33
    assert scores["perAnswerType"] == {"number": 100.0, "other": 0.0, "yes/no": 60.0}
    assert scores["perQuestionType"]["is the"] == 60.0 and scores["questions"] == 3
    with pytest.raises(blip2.InputError, match="do not have"):
        vqa_accuracy({4: "x"}, refs)


# ---- VQA: against an independent, literal reading of the rules on random answers ----------------------


def _spec_punctuation(text: str) -> str:
    """The punctuation rule spelt out character by character (a second route to the same result)."""
    glued = any(
        text[i].isdecimal() and text[i + 1] == "," and text[i + 2].isdecimal() for i in range(len(text) - 2)
    )
    spaced = "".join(
        ("" if glued or f" {c}" in text or f"{c} " in text else " ") if c in PUNCTUATION else c for c in text
    )
    out, dropped = [], 0
    for i, c in enumerate(spaced):
        if c == "." and dropped < 32 and not (i + 1 < len(spaced) and spaced[i + 1].isdecimal()):
            dropped += 1
            continue
        out.append(c)
    return "".join(out)


def _spec_answer(text: str) -> str:
    """A prediction: whitespace, punctuation, then word by word numbers, articles, contractions."""
    text = _spec_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    numbers = ["none", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    words = []
    for w in text.lower().split():
        if w in numbers:
            w = str(max(0, numbers.index(w) - 1))
        if w not in ("a", "an", "the"):
            words.append(CONTRACTIONS.get(w, w))
    return " ".join(words)


def _spec_accuracy(prediction: str, humans: list[str]) -> float:
    guess = _spec_answer(prediction)
    if len(set(humans)) > 1:  # human answers: punctuation only, and only when they differ
        humans = [_spec_punctuation(h) for h in humans]
    subsets = list(itertools.combinations(range(len(humans)), len(humans) - 1))
    return sum(min(1.0, sum(humans[j] == guess for j in s) / 3) for s in subsets) / len(subsets)


def test_vqa_matches_an_independent_reading_on_random_answers():
    pieces = ["yes", "no", "Two", "2", "the", "a", "dog", "dogs", "it's", "dont", "1,000", "1000", "3.5",
              "end.", "black/white", "(left)", "t-shirt!", "won\u2019t", "wont", "a.m.", ";", ":", "none", "0",
              "Red", "red,", " ", "\t", "?", "'s", "cant", "can't", "x.5", "@home", "10", "ten"]  # fmt: skip
    rng = np.random.default_rng(0)

    def draw() -> str:
        return (
            " ".join(rng.choice(pieces, size=int(rng.integers(1, 4))))
            if rng.random() < 0.8
            else str(rng.choice(pieces))
        )

    refs, preds, expected = {}, {}, {}
    for qid in range(400):
        # human answers mostly normalised already, as VQAv2's are; some raw, to exercise that path too
        pool = [
            normalize_answer(a) if rng.random() < 0.7 else a
            for a in (draw() for _ in range(int(rng.integers(1, 4))))
        ]
        humans = [str(rng.choice(pool)) for _ in range(10)]
        # predictions often equal a human answer up to case / punctuation, so that matches happen
        pred = str(rng.choice(humans)) if rng.random() < 0.6 else draw()
        if rng.random() < 0.3:
            pred = pred.upper() + rng.choice([".", "", " ", "\n"])
        refs[qid] = VqaReference(tuple(humans), "other")
        preds[qid] = pred
        expected[qid] = _spec_accuracy(pred, humans)
    _, got = vqa_accuracy(preds, refs)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.2 < np.mean([v > 0 for v in expected.values()]) < 0.95  # both outcomes exercised


# ---- retrieval recall: a hand-computed score matrix ---------------------------------------------------

# 3 images, 6 texts; texts 0, 1, 5 describe image 0, texts 2, 3 image 1, text 4 image 2.
SCORES = np.array(
    [
        [0.90, 0.10, 0.80, 0.70, 0.20, 0.99],
        [0.95, 0.85, 0.15, 0.25, 0.75, 0.65],
        [0.50, 0.45, 0.40, 0.35, 0.05, 0.55],
    ]
)
TEXT_IMAGE = [0, 0, 1, 1, 2, 0]
IMAGE_TEXTS = [[0, 1, 5], [2, 3], [4]]


def test_recall_from_a_known_score_matrix():
    i2t, _ = rank_by_scores(SCORES)
    t2i, _ = rank_by_scores(SCORES.T)
    # image -> text: first right text at 0 (t5), 4 (t3), 5 (t4); text -> image: t5 at 0, t0 at 1, the rest at 2
    got = recall_scores(i2t, t2i, IMAGE_TEXTS, TEXT_IMAGE)
    want = {
        "txt_r1": 100 / 3, "txt_r5": 200 / 3, "txt_r10": 100.0, "txt_r_mean": 200 / 3,
        "img_r1": 100 / 6, "img_r5": 100.0, "img_r10": 100.0, "img_r_mean": (100 / 6 + 200) / 3,
    }  # fmt: skip
    want["r_mean"] = (want["txt_r_mean"] + want["img_r_mean"]) / 2
    assert got == pytest.approx(want)
    # cut lists: a ground truth past the end misses every recall it would have reached
    assert recall_scores(i2t[:, :5], t2i, IMAGE_TEXTS, TEXT_IMAGE)["txt_r10"] == pytest.approx(200 / 3)
    assert first_hit(np.array([3, 1]), [1, 2]) == 1 and first_hit(np.array([3, 1]), [0, 2]) > 10


def test_rerank_reorders_only_the_top_k():
    itc = np.array([[0.5, 0.4, 0.3, 0.2], [0.1, 0.6, 0.0, 0.9]], dtype=np.float32)  # 2 images, 4 texts
    i2t = np.argsort(-itc, axis=1)  # [[0, 1, 2, 3], [3, 1, 0, 2]]
    t2i = np.argsort(-itc.T, axis=1)  # texts 0, 2 prefer image 0; texts 1, 3 image 1
    keys = rerank_pairs(i2t, t2i, k=2)
    # with k = 2 every text's top 2 holds both images: all 8 pairs, keys image * 4 + text
    assert keys.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    logits = np.array([-1.0, 2.0, 5.0, 9.0, 0.0, 0.0, 0.0, 0.0], dtype=np.float32)
    r = final_rankings(itc, i2t, t2i, 2, keys, logits)
    # image 0: texts 0, 1 re-ordered by logit + ITC (2.4 > -0.5); texts 2, 3 keep ITC order below them,
    # however high their logits
    assert r.image_to_text[0].tolist() == [1, 0, 2, 3]
    assert r.image_to_text_scores[0] == pytest.approx([2.4, -0.5, 0.3, 0.2])
    assert r.image_to_text[1].tolist() == [3, 1, 0, 2]  # zero logits: ITC order
    # text 2: images 0 (5.0 + 0.3) and 1 (0.0 + 0.0); text 3: image 0 (9.0 + 0.2) beats image 1 (0.9)
    assert r.text_to_image.tolist() == [[1, 0], [0, 1], [0, 1], [0, 1]]
    assert r.text_to_image_scores[3] == pytest.approx([9.2, 0.9])


# ---- data -----------------------------------------------------------------------------------------


def test_caption_clean_up_and_karpathy_formats(tmp_path):
    assert clean_caption("A Dog (brown)!  runs.\n") == "a dog brown runs"
    assert clean_caption("w " * 60).count("w") == 50
    karpathy = {"images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "sentences": [{"raw": "one"}, {"raw": "two"}]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "train", "sentences": [{"raw": "three"}]},
    ]}  # fmt: skip
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    data = read_karpathy(tmp_path / "k.json", "test")
    assert data.images == ["val2014/a.jpg"] and data.texts == ["one", "two"] and data.image_texts == [[0, 1]]
    lavis = [
        {"image": "a.jpg", "caption": ["x", "y"]},
        {"image": "b.jpg", "caption": "z"},
        {"image": "a.jpg", "caption": "w"},
    ]
    (tmp_path / "l.json").write_text(json.dumps(lavis))
    data = read_karpathy(tmp_path / "l.json")
    assert data.images == ["a.jpg", "b.jpg"] and data.text_image == [0, 0, 0, 1]
    sub = data.subset([1])
    assert sub.images == ["b.jpg"] and sub.texts == ["z"] and sub.text_image == [0]


# ---- caption metrics: equal to pycocoevalcap's COCOEvalCap ---------------------------------------------

REFERENCES = {
    1: ["A man riding a horse on a beach.", "a person rides a brown horse", "Man on horseback near the sea"],
    2: ["Two cats sleeping on a red couch.", "two kittens asleep on a sofa", "cats lying on a couch"],
    3: [
        "A plate of food with broccoli.",
        "a dish with vegetables and rice",
        "Broccoli, rice and meat on a plate.",
    ],
    7: ["A stop sign at a street corner.", "a red stop sign", "street sign on a pole"],
}
PREDICTIONS = {
    1: "a man riding a horse on the beach",
    2: "Two cats on a couch!",
    3: "a plate of rice,\nmeat and broccoli",
}


def _coco_files(folder):
    images = [{"id": i, "file_name": f"img{i}.png"} for i in REFERENCES]
    anns = [{"id": n, "image_id": i, "caption": c} for n, (i, c) in
            enumerate((i, c) for i, caps in REFERENCES.items() for c in caps)]  # fmt: skip
    (folder / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    (folder / "preds.json").write_text(
        json.dumps([{"image_id": i, "caption": c} for i, c in PREDICTIONS.items()])
    )
    return folder / "captions.json", folder / "preds.json"


def test_caption_scores_equal_coco_eval_cap(tmp_path, monkeypatch):
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    captions, preds = _coco_files(tmp_path)

    class NoSpice:  # SPICE needs jars downloaded from the network; every other scorer is the library's own
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    # the library's METEOR scorer, one process shared with blip2's (it takes seconds to start)
    monkeypatch.setattr(coco_eval, "Meteor", caption_eval._meteor_scorer)
    coco = COCO(str(captions))
    results = coco.loadRes(str(preds))
    reference = coco_eval.COCOEvalCap(coco, results)
    reference.params["image_id"] = results.getImgIds()  # the predicted images, as LAVIS scores them
    reference.evaluate()

    got = caption_eval.score_captions(PREDICTIONS, REFERENCES, spice=False)
    expected = {k: float(v) for k, v in reference.eval.items() if k != "SPICE"}
    assert got.scores == expected
    assert set(got.scores) == set(caption_eval.METRICS) - {"SPICE"}
    assert 0 < got.scores["Bleu_4"] < got.scores["Bleu_1"] < 1 and got.scores["CIDEr"] > 0
    assert "SPICE" in got.unavailable
    # SPICE asked for: it runs when its jars are installed, else it is named unavailable with the reason
    with_spice = caption_eval.score_captions({1: PREDICTIONS[1]}, REFERENCES)
    missing = caption_eval.spice_missing()
    assert ("SPICE" in with_spice.unavailable) == (missing is not None)
    if missing:
        assert "stanford-corenlp" in with_spice.unavailable["SPICE"]


def test_caption_scoring_names_missing_dependencies(monkeypatch):
    monkeypatch.setattr(caption_eval.shutil, "which", lambda name: None)
    with pytest.raises(blip2.errors.DependencyError, match="Java"):
        caption_eval.score_captions(PREDICTIONS, REFERENCES)


# ---- the `blip2 eval` verbs, with the demo models ------------------------------------------------------


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    """Four held-out demo scenes as COCO captions, VQAv2 and Karpathy files (one image listed but absent)."""
    folder = tmp_path_factory.mktemp("scenes")
    scenes = generate(321, 4, "heldout")
    for n, s in enumerate(scenes):
        s.render().save(folder / f"COCO_val2014_{n + 1:012d}.png")
    names = {n + 1: f"COCO_val2014_{n + 1:012d}.png" for n in range(len(scenes))}
    names[9] = "absent.png"
    refs = {n + 1: [s.caption, s.caption.replace(" and ", ", ")] for n, s in enumerate(scenes)} | {
        9: ["nothing"]
    }
    images = [{"id": i, "file_name": f} for i, f in names.items()]
    anns = [{"image_id": i, "caption": c} for i, caps in refs.items() for c in caps]
    (folder / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    rng = np.random.default_rng(5)
    questions, answers = [], []
    for n, s in enumerate(scenes):
        for q, a in s.sample_questions(rng, 2):
            qid = len(questions)
            questions.append({"question_id": qid, "image_id": n + 1, "question": q})
            humans = [{"answer": normalize_answer(a), "answer_id": j + 1} for j in range(10)]
            answers.append({"question_id": qid, "image_id": n + 1, "answers": humans, "answer_type": "other", "question_type": q.split()[0]})  # fmt: skip
    questions.append({"question_id": 99, "image_id": 9, "question": "what is there?"})
    answers.append(
        {
            "question_id": 99,
            "image_id": 9,
            "answers": [{"answer": "x", "answer_id": 1}],
            "answer_type": "other",
        }
    )
    (folder / "questions.json").write_text(json.dumps({"questions": questions}))
    (folder / "answers.json").write_text(json.dumps({"annotations": answers}))
    karpathy = [
        {"image": names[n + 1], "caption": [s.caption, s.caption.upper() + "."]} for n, s in enumerate(scenes)
    ]
    (folder / "karpathy.json").write_text(
        json.dumps(karpathy + [{"image": "absent.png", "caption": "nothing"}])
    )
    return folder


def _report(folder, task):
    return json.loads((folder / f"{task}_report.json").read_text())


def test_eval_caption_runs_the_model_then_rescores(scenes_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["eval", "caption", "-m", "demo", "-i", str(scenes_dir), "-a", str(scenes_dir / "captions.json"),
            "-o", str(out), "--no-spice", "--batch-size", "3", "-q"]  # fmt: skip
    assert main(args) == 1  # one listed image is absent: scored without it, and said so
    err = capsys.readouterr().err
    assert "1 of 5 images not scored: 1 missing" in err and "absent.png" in err
    report = _report(out, "caption")
    assert report["data"]["missing_images"] == 1 and report["data"]["images_scored"] == 4
    assert (
        report["model"] == "demo" and report["options"]["batch_size"] == 3 and report["time"]["seconds"] > 0
    )
    predictions = json.loads((out / "caption_predictions.json").read_text())
    assert not (out / "caption_predictions.partial.jsonl").exists()
    pipe = blip2.load("demo")
    files = sorted(scenes_dir.glob("COCO_val2014_*.png"))
    assert [p["caption"] for p in predictions] == [c.strip() for c in pipe.caption(files)]
    # the saved predictions re-scored without the model give the same scores, and the library's
    assert main(["eval", "caption", "-p", str(out / "caption_predictions.json"), "-a",
                 str(scenes_dir / "captions.json"), "-o", str(tmp_path / "again"), "--no-spice"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "CIDEr" in table and "Bleu_4" in table
    assert _report(tmp_path / "again", "caption")["scores"] == report["scores"]
    refs = {e["image_id"]: [] for e in predictions}
    for ann in json.loads((scenes_dir / "captions.json").read_text())["annotations"]:
        refs.get(ann["image_id"], []).append(ann["caption"])
    expected = caption_eval.score_captions(
        {p["image_id"]: p["caption"] for p in predictions}, refs, spice=False
    )
    assert report["scores"] == expected.scores


def test_eval_vqa_runs_the_model_then_rescores(scenes_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["eval", "vqa", "-m", "demo", "-i", str(scenes_dir), "--questions", str(scenes_dir / "questions.json"),
            "-a", str(scenes_dir / "answers.json"), "-o", str(out), "--template", "Question: {} Answer:", "-q"]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "1 missing" in err and "1 annotated questions have no answer" in err
    report = _report(out, "vqa")
    predictions = json.loads((out / "vqa_predictions.json").read_text())
    assert report["data"]["questions_scored"] == len(predictions) == 8
    # the answers are the model's own to the same prompts (images found by the number ending their names)
    questions = {
        q["question_id"]: q for q in json.loads((scenes_dir / "questions.json").read_text())["questions"]
    }
    pipe = blip2.load("demo")
    for p in predictions[:3]:
        q = questions[p["question_id"]]
        image = scenes_dir / f"COCO_val2014_{q['image_id']:012d}.png"
        assert p["answer"] == pipe.ask(image, q["question"]).strip()
    refs = {}
    for a in json.loads((scenes_dir / "answers.json").read_text())["annotations"]:
        refs[a["question_id"]] = VqaReference(
            tuple(x["answer"] for x in a["answers"]), a["answer_type"], a.get("question_type", "")
        )
    expected, _ = vqa_accuracy({p["question_id"]: p["answer"] for p in predictions}, refs)
    assert report["scores"] == expected
    assert main(["eval", "vqa", "-p", str(out / "vqa_predictions.json"), "-a", str(scenes_dir / "answers.json"),
                 "-o", str(tmp_path / "again")]) == 0  # fmt: skip
    assert _report(tmp_path / "again", "vqa")["scores"] == report["scores"]


def test_rank_retrieval_scores_as_blip2_does(scenes_dir):
    """ITC for every pair, then the top k re-scored by ITM match logit + ITC (checked pair by pair through
    the public API), the rest below in ITC order."""
    data = read_karpathy(scenes_dir / "karpathy.json")
    data = data.subset(range(4))
    images = [scenes_dir / name for name in data.images]
    pipe = blip2.load("demo-itm")
    k = 3
    r = rank_retrieval(pipe, images, data.texts, k=k, batch_size=2, progress=False)
    itc = pipe.itc(images, data.texts).numpy()
    assert r.image_to_text.shape == (4, 8) and r.text_to_image.shape == (8, 4)
    for i in range(4):
        top = np.argsort(-itc[i])[:k]
        assert set(r.image_to_text[i, :k].tolist()) == set(top.tolist())
        assert r.image_to_text[i, k:].tolist() == np.argsort(-itc[i])[k:].tolist()
        text = int(r.image_to_text[i, 0])
        logits = itm_logits(pipe, vision_features(pipe, [images[i]]), [data.texts[text]])[0]
        assert r.image_to_text_scores[i, 0] == pytest.approx(itc[i, text] + float(logits[1]), abs=1e-4)
        # the logits are those behind the public match probability
        prob = float(pipe.itm(images[i], data.texts[text])[0])
        assert prob == pytest.approx(1 / (1 + math.exp(float(logits[0] - logits[1]))), abs=1e-5)
    scores = recall_scores(r.image_to_text, r.text_to_image, data.image_texts, data.text_image)
    assert (
        scores["txt_r10"] == scores["img_r10"] == 100.0
    )  # 8 texts and 4 images: everything is in the top 10
    assert scores["r_mean"] >= 75.0  # the demo model tells its scenes apart


def test_rank_retrieval_with_every_pair_reranked_is_the_full_itm_plus_itc_order(itm_ckpt):
    """k past the counts: every pair is re-scored, so the rankings are those of ITC + ITM match logit
    over the whole matrix, computed here pair by pair."""
    pipe = blip2.load(itm_ckpt)
    images = make_images(3, 32, seed=4)
    texts = ["a red square", "two dogs on grass", "a blue circle", "the cat sleeps", "green and round"]
    r = rank_retrieval(pipe, images, texts, k=100, batch_size=2, progress=False)
    itc = pipe.itc(images, texts).numpy()
    logits = np.array(
        [[float(itm_logits(pipe, vision_features(pipe, [im]), [t])[0, 1]) for t in texts] for im in images]
    )
    full = itc + logits
    order_i2t, scores_i2t = rank_by_scores(full)
    order_t2i, scores_t2i = rank_by_scores(full.T)
    assert r.image_to_text.tolist() == order_i2t.tolist() and r.text_to_image.tolist() == order_t2i.tolist()
    assert r.image_to_text_scores == pytest.approx(scores_i2t, abs=1e-4)
    assert r.text_to_image_scores == pytest.approx(scores_t2i, abs=1e-4)
    assert len({tuple(row) for row in order_i2t.tolist()}) > 1  # the images rank the texts differently


def test_eval_retrieval_cli_and_rescoring(scenes_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["eval", "retrieval", "-m", "demo", "-i", str(scenes_dir), "-a", str(scenes_dir / "karpathy.json"),
            "-o", str(out), "--k", "2", "-q"]  # fmt: skip
    assert main(args) == 1  # absent.png
    captured = capsys.readouterr()
    assert "1 missing" in captured.err and "txt_r1" in captured.out and "img_r_mean" in captured.out
    report = _report(out, "retrieval")
    assert report["data"]["images_scored"] == 4 and report["data"]["texts_scored"] == 8
    assert report["options"]["k"] == 2
    assert main(["eval", "retrieval", "-p", str(out / "retrieval_rankings.npz"), "-a",
                 str(scenes_dir / "karpathy.json"), "-o", str(tmp_path / "again")]) == 0  # fmt: skip
    assert _report(tmp_path / "again", "retrieval")["scores"] == report["scores"]


def test_bad_data_is_one_line(scenes_dir, tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [}')
    assert main(["eval", "caption", "-p", str(broken), "-a", str(broken), "-o", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("blip2: error:") and "not valid JSON" in err and "line 1" in err and "\n" not in err
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                   "annotations": [{"image_id": 2, "caption": "x"}]}))  # fmt: skip
    assert main(["eval", "caption", "-p", str(broken), "-a", str(unknown), "-o", str(tmp_path)]) == 1
    assert "names image_id 2" in capsys.readouterr().err
    assert main(["eval", "vqa", "-m", "demo", "-p", str(broken), "-a", str(scenes_dir / "answers.json")]) == 1
    assert "not both" in capsys.readouterr().err
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps([{"question_id": 12345, "answer": "yes"}]))
    assert (
        main(["eval", "vqa", "-p", str(preds), "-a", str(scenes_dir / "answers.json"), "-o", str(tmp_path)])
        == 1
    )
    assert "do not have" in capsys.readouterr().err


def test_demo_eval_reports_the_standard_scores():
    from blip2.demo.evaluate import evaluate

    record = evaluate("demo", seed=4242, count=4)
    scores = record["caption_scores"]
    assert set(scores) == set(caption_eval.METRICS) - {"SPICE"}
    # one reference per scene: BLEU-4 is 1 exactly when every caption is its scene's canonical one
    assert (scores["Bleu_4"] == pytest.approx(1.0)) == (record["caption_exact_match"] == 1.0)
    # one-word answers, normalised alike on both sides: the official accuracy is the exact match
    assert record["vqa_official"]["overall"] == pytest.approx(100 * record["vqa_accuracy"], abs=0.01)
