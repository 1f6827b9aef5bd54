"""Standard evaluation of BLIP-2 models on your own data: COCO caption metrics, VQAv2 accuracy and
image–text retrieval recall.

One module per task; each has scoring functions on plain predictions and references (no model needed)
and a function that produces the predictions with a loaded :class:`blip2.api.Pipeline`:

- :mod:`.caption`: :func:`score_captions` (pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE),
  :func:`caption_images`;
- :mod:`.vqa`: :func:`vqa_accuracy` with the official answer normalisation, :func:`answer_questions`;
- :mod:`.retrieval`: :func:`recall_scores` (R@1/5/10 both ways), :func:`rank_retrieval` (ITC, then ITM
  re-ranking of the top k).

:mod:`.data` reads the usual file formats, :mod:`.report` writes reports, :mod:`.cli` is ``blip2 eval``.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

if TYPE_CHECKING:
    from .caption import CaptionScores, caption_images, score_captions
    from .retrieval import Rankings, rank_retrieval, recall_scores
    from .vqa import VqaReference, answer_questions, normalize_answer, vqa_accuracy

_EXPORTS = {
    "CaptionScores": ".caption",
    "Rankings": ".retrieval",
    "VqaReference": ".vqa",
    "answer_questions": ".vqa",
    "caption_images": ".caption",
    "normalize_answer": ".vqa",
    "rank_retrieval": ".retrieval",
    "recall_scores": ".retrieval",
    "score_captions": ".caption",
    "vqa_accuracy": ".vqa",
}
__all__ = [
    "CaptionScores",
    "Rankings",
    "VqaReference",
    "answer_questions",
    "caption_images",
    "normalize_answer",
    "rank_retrieval",
    "recall_scores",
    "score_captions",
    "vqa_accuracy",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
