"""Image–text retrieval recall (R@1/5/10 both ways) and BLIP-2's two-stage ranking with a model.

BLIP-2's protocol (as LAVIS evaluates it): every image against every text by ITC (max over queries of
the cosine similarity); for each query (an image, or a text) the best ``k`` candidates by ITC are
scored again by ITM, and their final score is the ITM head's "match" logit (mean over queries) plus
their ITC similarity. The re-scored candidates rank ahead of the rest; the rest keep their ITC order
(LAVIS gives them all -100, which ranks them the same way whenever ``k`` >= 10, the deepest recall).

Rankings are lists of candidate indices, best first, possibly cut short: a ground truth missing from
a list counts as a miss at every depth.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    import torch

    from ..api import Pipeline

RECALL_AT = (1, 5, 10)
DEFAULT_K = 128  # candidates re-ranked by ITM per query, BLIP-2's k_test


class Rankings(NamedTuple):
    """Best-first candidates per query: ``image_to_text`` (I, L) text indices, ``text_to_image`` (T, L')
    image indices, and their final scores alongside."""

    image_to_text: np.ndarray
    image_to_text_scores: np.ndarray
    text_to_image: np.ndarray
    text_to_image_scores: np.ndarray


# ---- recall -------------------------------------------------------------------------------------


NOT_LISTED = sys.maxsize  # the rank of a ground truth a (cut) list does not hold: beyond every recall


def first_hit(ranked: np.ndarray, targets: Sequence[int] | int) -> int:
    """Position of the best-ranked target in ``ranked`` (0 = first); :data:`NOT_LISTED` when none is."""
    wanted = np.isin(ranked, np.atleast_1d(np.asarray(targets)))
    hits = np.flatnonzero(wanted)
    return int(hits[0]) if hits.size else NOT_LISTED


def recall_scores(
    image_to_text: np.ndarray,
    text_to_image: np.ndarray,
    image_texts: Sequence[Sequence[int]],
    text_image: Sequence[int],
) -> dict[str, float]:
    """Recall@1/5/10 in percent from rankings: image→text (``txt_r*``: an image's query succeeds when
    any of its texts is within the top K) and text→image (``img_r*``), each direction's mean and the
    mean of both (``r_mean``), as LAVIS reports them."""
    if len(image_to_text) != len(image_texts) or len(text_to_image) != len(text_image):
        raise InputError("rankings and ground truth disagree on the number of images or texts")
    if not len(image_to_text) or not len(text_to_image):
        raise InputError("no images or no texts to rank")
    i2t = np.array([first_hit(r, t) for r, t in zip(image_to_text, image_texts, strict=True)])
    t2i = np.array([first_hit(r, i) for r, i in zip(text_to_image, text_image, strict=True)])
    out: dict[str, float] = {}
    for name, ranks in (("txt", i2t), ("img", t2i)):
        values = [100.0 * float(np.mean(ranks < k)) for k in RECALL_AT]
        out.update({f"{name}_r{k}": v for k, v in zip(RECALL_AT, values, strict=True)})
        out[f"{name}_r_mean"] = float(np.mean(values))
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def rank_by_scores(scores: np.ndarray, keep: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's columns best first (ties by index), cut to ``keep``: (indices, their scores)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
    return order, np.take_along_axis(scores, order, axis=1)


# ---- ranking with a model ---------------------------------------------------------------------------


def _bar(total: int, desc: str, unit: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not progress)


def itc_scores(pipe: Pipeline, images: Sequence[Any], texts: Sequence[str], batch_size: int = 32,
               progress: bool = True) -> torch.Tensor:  # fmt: skip
    """(I, T) ITC similarity of every image with every text, embedding images in batches."""
    import torch

    from ..retrieval import similarity

    text_embeds = pipe.embed_texts(list(texts))
    rows = []
    with _bar(len(images), "ITC", "image", progress) as bar:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            rows.append(similarity(pipe.embed_images(list(chunk), batch_size), text_embeds))
            bar.update(len(chunk))
    return torch.cat(rows)


def candidates(itc: torch.Tensor, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """ITC's best ``keep`` texts per image (I, L) and images per text (T, L'), best first."""
    n_images, n_texts = itc.shape
    i2t = itc.topk(min(keep, n_texts), dim=1).indices.numpy()
    t2i = itc.T.topk(min(keep, n_images), dim=1).indices.numpy()
    return i2t, t2i


def rerank_pairs(i2t: np.ndarray, t2i: np.ndarray, k: int) -> np.ndarray:
    """The (image, text) pairs ITM must score, each once, as sorted keys ``image * T + text``: every
    image with its top ``k`` texts, every text with its top ``k`` images."""
    n_images, n_texts = len(i2t), len(t2i)
    head_i2t, head_t2i = i2t[:, :k], t2i[:, :k]
    image = np.concatenate([np.repeat(np.arange(n_images), head_i2t.shape[1]), head_t2i.ravel()])
    text = np.concatenate([head_i2t.ravel(), np.repeat(np.arange(n_texts), head_t2i.shape[1])])
    return np.unique(image.astype(np.int64) * n_texts + text)


def itm_match_logits(
    pipe: Pipeline,
    images: Sequence[Any],
    texts: Sequence[str],
    keys: np.ndarray,
    batch_size: int = 32,
    progress: bool = True,
) -> np.ndarray:
    """The ITM "match" logit of each pair of :func:`rerank_pairs`' ``keys`` (same order). The image
    encoder runs once per image; its features are paired with its texts ``batch_size`` at a time."""
    from ..retrieval import itm_logits, vision_features

    image_of, text_of = np.divmod(keys, len(texts))
    bounds = np.searchsorted(image_of, np.arange(len(images) + 1))  # image i's pairs: bounds[i]:bounds[i+1]
    wanted = [i for i in range(len(images)) if bounds[i + 1] > bounds[i]]
    out = np.zeros(len(keys), dtype=np.float32)
    with _bar(len(keys), "ITM", "pair", progress) as bar:
        for start in range(0, len(wanted), batch_size):
            ids = wanted[start : start + batch_size]
            vision = vision_features(pipe, [images[i] for i in ids])  # (B, N, D)
            for row, i in enumerate(ids):
                for lo in range(bounds[i], bounds[i + 1], batch_size):
                    hi = min(lo + batch_size, bounds[i + 1])
                    feats = vision[row : row + 1].expand(hi - lo, -1, -1)
                    out[lo:hi] = itm_logits(pipe, feats, [texts[t] for t in text_of[lo:hi]])[:, 1].numpy()
                    bar.update(hi - lo)
    return out


def final_rankings(
    itc: np.ndarray, i2t: np.ndarray, t2i: np.ndarray, k: int, keys: np.ndarray, logits: np.ndarray
) -> Rankings:
    """Each query's first ``k`` ITC candidates re-ordered by ITM logit + ITC, then the rest of its
    candidates in ITC order."""
    n_images, n_texts = itc.shape

    def reorder(
        cands: np.ndarray, itc_rows: np.ndarray, pair_keys: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        head = cands[:, :k]
        final = np.take_along_axis(itc_rows, head, axis=1) + logits[np.searchsorted(keys, pair_keys)]
        order = np.argsort(-final, axis=1, kind="stable")
        ranked = np.concatenate([np.take_along_axis(head, order, axis=1), cands[:, k:]], axis=1)
        rest = np.take_along_axis(itc_rows, cands[:, k:], axis=1)
        return ranked, np.concatenate([np.take_along_axis(final, order, axis=1), rest], axis=1).astype(
            np.float32
        )

    rows = np.arange(n_images)[:, None] * n_texts + i2t[:, :k]
    cols = t2i[:, :k].astype(np.int64) * n_texts + np.arange(n_texts)[:, None]
    return Rankings(*reorder(i2t, itc, rows), *reorder(t2i, itc.T, cols))


def rank_retrieval(
    pipe: Pipeline,
    images: Sequence[Any],
    texts: Sequence[str],
    k: int = DEFAULT_K,
    batch_size: int = 32,
    progress: bool = True,
) -> Rankings:
    """BLIP-2's ranking of ``texts`` for each image and of ``images`` for each text: ITC over all pairs,
    ITM re-ranking of each query's top ``k`` (capped by the count). Lists keep max(k, 10) candidates."""
    if k < 1:
        raise InputError(f"k (candidates re-ranked by ITM) must be at least 1, not {k}")
    if not images or not texts:
        raise InputError("retrieval needs at least one image and one text")
    itc = itc_scores(pipe, images, texts, batch_size, progress)
    i2t, t2i = candidates(itc, max(k, max(RECALL_AT)))
    keys = rerank_pairs(i2t, t2i, k)
    logits = itm_match_logits(pipe, images, texts, keys, batch_size, progress)
    return final_rankings(itc.numpy(), i2t, t2i, k, keys, logits)
