"""VQAv2 accuracy with the official evaluation's answer normalisation, and answering questions with a model.

The rules, as the official VQA evaluation applies them (written here from its description; every quirk
that changes a score is kept, so that the numbers are the official script's):

- a predicted answer has tabs and newlines turned into spaces and is stripped, then goes through
  :func:`strip_punctuation` and :func:`normalize_words`;
- the human answers of a question go through :func:`strip_punctuation` only, and only when they are
  not all the same string (VQAv2's annotations are already normalised, so this rarely matters);
- against each of the ``n`` human answers left out in turn (the 10 choose 9 subsets), the prediction
  scores ``min(#matching answers among the other n-1 / 3, 1)``; the question's accuracy is the mean.

Overall, per-answer-type and per-question-type accuracies are means over questions, reported as the
official script does: percentages rounded to two decimals.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:
    from ..api import Pipeline

# BLIP-2's prompt for VQAv2 (the LAVIS evaluation); Pipeline.ask's default is "Question: {} Answer:".
VQA_TEMPLATE = "Question: {} Short answer:"

# Marks that are removed, or turned into a space when they stand inside a word (see strip_punctuation).
# Periods are handled apart, and '!' and '-' are not touched at all, as in the official evaluation.
PUNCTUATION = tuple(";:/'[]\"()=+\\_><@`,?")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official script passes re.UNICODE (= 32) where Pattern.sub takes its count: it removes at most the
# first 32 such periods. Kept, so that a (rare) long answer full of periods scores as it does there.
_PERIOD_LIMIT = int(re.UNICODE)

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})


def _contractions() -> dict[str, str]:
    """Apostrophe-less (or half-written) contractions -> the official table's spelling.

    The official table writes most apostrophes as U+2019 (’) and a few as ASCII ('): both are kept as
    there. Its entries with an ASCII apostrophe or a capital in the key are left out: punctuation
    removal deletes every ASCII apostrophe and words are lower-cased first, so those keys never match.
    Written as "key=value" words; "_" stands for ’ to keep the table legible.
    """
    table = """
        aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldnt_ve=couldn_t_ve
        didnt=didn_t doesnt=doesn_t dont=don_t hadnt=hadn_t hadnt_ve=hadn_t_ve hasnt=hasn_t
        havent=haven_t hed=he_d hed_ve=he_d_ve he_dve=he_d_ve hes=he_s howd=how_d howll=how_ll
        hows=how_s isnt=isn_t itd=it_d itd_ve=it_d_ve it_dve=it_d_ve itll=it_ll let_s=let_s
        maam=ma_am mightnt=mightn_t mightnt_ve=mightn_t_ve mightn_tve=mightn_t_ve mightve=might_ve
        mustnt=mustn_t mustve=must_ve neednt=needn_t notve=not_ve oclock=o_clock oughtnt=oughtn_t
        ow_s_at=_ow_s_at _ows_at=_ow_s_at _ow_sat=_ow_s_at shant=shan_t shed_ve=she_d_ve
        she_dve=she_d_ve she_s=she_s shouldve=should_ve shouldnt=shouldn_t shouldnt_ve=shouldn_t_ve
        shouldn_tve=shouldn_t_ve somebody_d=somebodyd somebodyd_ve=somebody_d_ve
        somebody_dve=somebody_d_ve somebodyll=somebody_ll somebodys=somebody_s someoned=someone_d
        someoned_ve=someone_d_ve someone_dve=someone_d_ve someonell=someone_ll someones=someone_s
        somethingd=something_d somethingd_ve=something_d_ve something_dve=something_d_ve
        somethingll=something_ll thats=that_s thered=there_d thered_ve=there_d_ve
        there_dve=there_d_ve therere=there_re theres=there_s theyd=they_d theyd_ve=they_d_ve
        they_dve=they_d_ve theyll=they_ll theyre=they_re theyve=they_ve twas=_twas wasnt=wasn_t
        wed_ve=we_d_ve we_dve=we_d_ve weve=we've werent=weren_t whatll=what_ll whatre=what_re
        whats=what_s whatve=what_ve whens=when_s whered=where_d wheres=where's whereve=where_ve
        whod=who_d whod_ve=who_d_ve who_dve=who_d_ve wholl=who_ll whos=who_s whove=who've
        whyll=why_ll whyre=why_re whys=why_s wont=won_t wouldve=would_ve wouldnt=wouldn_t
        wouldnt_ve=wouldn_t_ve wouldn_tve=wouldn_t_ve yall=y_all yall_ll=y_all_ll y_allll=y_all_ll
        yall_d_ve=y_all_d_ve y_alld_ve=y_all_d_ve y_all_dve=y_all_d_ve youd=you_d youd_ve=you_d_ve
        you_dve=you_d_ve youll=you_ll youre=you_re youve=you_ve
    """
    pairs = (item.replace("_", "\u2019").split("=") for item in table.split())
    return {key: value for key, value in pairs}


CONTRACTIONS = _contractions()


# ---- normalisation ----------------------------------------------------------------------------------


def strip_punctuation(text: str) -> str:
    """Remove the marks of :data:`PUNCTUATION` and the periods not followed by a digit.

    A mark is deleted when it touches a space somewhere in the text (``"yes ,"``) or when the text
    holds a digit-comma-digit group (``"1,000"``); otherwise it becomes a space (``"black/white"`` ->
    ``"black white"``). Each mark's test looks at the original text, not at the text being edited.
    """
    joined = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if joined or touches_space else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_LIMIT)


def normalize_words(text: str) -> str:
    """Lower-case, split on whitespace, number words to digits, drop articles, spell contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """A predicted answer as the official evaluation compares it."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return normalize_words(strip_punctuation(text))


# ---- accuracy ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VqaReference:
    """One annotated question: its human answers (10 in VQAv2) and its types."""

    answers: tuple[str, ...]
    answer_type: str = "other"
    question_type: str = ""


def question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one predicted answer against the human answers of one question."""
    if not answers:
        raise InputError("a question without human answers cannot be scored")
    guess = normalize_answer(prediction)
    humans = list(answers)
    if len(set(humans)) > 1:
        humans = [strip_punctuation(a) for a in humans]
    matches = [h == guess for h in humans]
    total = sum(matches)
    # leave each human answer out in turn; the others that match earn a third each, capped at 1
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(humans)


def vqa_accuracy(
    predictions: Mapping[Any, str], references: Mapping[Any, VqaReference]
) -> tuple[dict[str, Any], dict[Any, float]]:
    """Official VQA accuracy of ``predictions`` (question id -> answer) over the questions they answer.

    Returns the scores (``overall``, ``perAnswerType``, ``perQuestionType``: percentages rounded to two
    decimals, as the official script reports them; ``questions``: how many were scored) and each
    question's accuracy in [0, 1]. A prediction for a question without a reference is an error.
    """
    unknown = [qid for qid in predictions if qid not in references]
    if unknown:
        raise InputError(
            f"{len(unknown)} predictions name questions the annotations do not have (first: {unknown[0]!r})"
        )
    if not predictions:
        raise InputError("no predictions to score")
    per_question: dict[Any, float] = {}
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    for qid, answer in predictions.items():
        if not isinstance(answer, str):
            raise InputError(f"the answer to question {qid!r} is a {type(answer).__name__}, not a string")
        ref = references[qid]
        acc = question_accuracy(answer, ref.answers)
        per_question[qid] = acc
        by_answer_type.setdefault(ref.answer_type, []).append(acc)
        by_question_type.setdefault(ref.question_type, []).append(acc)
    scores = {
        "overall": _percent(per_question.values()),
        "perAnswerType": {t: _percent(v) for t, v in sorted(by_answer_type.items())},
        "perQuestionType": {t: _percent(v) for t, v in sorted(by_question_type.items())},
        "questions": len(per_question),
    }
    return scores, per_question


def _percent(values: Iterable[float]) -> float:
    values = list(values)
    return round(100 * float(sum(values)) / len(values), 2)


# ---- answering with a model ------------------------------------------------------------------------


def answer_questions(
    pipe: Pipeline,
    questions: Sequence[tuple[Any, Any, str]],
    template: str = VQA_TEMPLATE,
    batch_size: int = 16,
    gen: Mapping[str, Any] | None = None,
    progress: bool = True,
    on_answers: Callable[[list[tuple[Any, str]]], None] | None = None,
) -> tuple[dict[Any, str], dict[str, str]]:
    """Answer ``(question_id, image, question)`` triples (``image``: anything ``blip2.load_image`` reads)
    with ``template`` (``{}`` is the question), ``batch_size`` at a time. Questions about one image are
    kept together so that its prefix is computed once. ``on_answers`` sees each batch as it is done.
    Returns the answers and the images that could not be read (source -> why)."""
    import sys

    from tqdm import tqdm

    from .data import ImageReader

    if "{}" not in template:
        raise InputError(f"the prompt template {template!r} has no {{}} where the question goes")
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, not {batch_size}")
    ordered = sorted(questions, key=lambda q: str(q[1]))  # group by image
    read = ImageReader()
    answers: dict[Any, str] = {}
    with tqdm(total=len(ordered), unit="question", desc="vqa", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(ordered), batch_size):
            chunk = [(qid, read(image), q) for qid, image, q in ordered[start : start + batch_size]]
            chunk = [item for item in chunk if item[1] is not None]
            if chunk:
                prompts = [template.format(q) for _, _, q in chunk]
                texts = pipe.generate([image for _, image, _ in chunk], prompts, **dict(gen or {}))
                done = [(qid, text.strip()) for (qid, _, _), text in zip(chunk, texts, strict=True)]
                answers.update(done)
                if on_answers is not None:
                    on_answers(done)
            bar.update(min(batch_size, len(ordered) - start))
    return answers, read.failed
