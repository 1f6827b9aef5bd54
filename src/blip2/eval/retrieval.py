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
import torch

from ..errors import InputError

if TYPE_CHECKING:
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
    i2t = torch.topk(itc, min(keep, n_texts), dim=1).indices.numpy()
    t2i = torch.topk(itc.T, min(keep, n_images), dim=1).indices.numpy()
    return i2t, t2i


def rerank_pairs(i2t: np.ndarray, t2i: np.ndarray, k: int) -> dict[int, np.ndarray]:
    """For each image, the texts it must be ITM-scored with (sorted, each once): its own top ``k``
    texts, and the texts that have it among their top ``k`` images."""
    wanted: dict[int, list[np.ndarray]] = {i: [row[:k]] for i, row in enumerate(i2t)}
    for t, row in enumerate(t2i):
        for i in row[:k]:
            wanted[int(i)].append(np.array([t]))
    return {i: np.unique(np.concatenate(parts)) for i, parts in wanted.items()}


def itm_match_logits(
    pipe: Pipeline,
    images: Sequence[Any],
    texts: Sequence[str],
    pairs: dict[int, np.ndarray],
    batch_size: int = 32,
    progress: bool = True,
) -> dict[int, np.ndarray]:
    """For each image, the ITM "match" logit with each of its ``pairs`` texts (same order). The image
    encoder runs once per image; its features are paired with the texts ``batch_size`` at a time."""
    from ..retrieval import itm_logits, vision_features

    out: dict[int, np.ndarray] = {}
    order = [i for i in sorted(pairs) if len(pairs[i])]
    with _bar(sum(len(p) for p in pairs.values()), "ITM", "pair", progress) as bar:
        for start in range(0, len(order), batch_size):
            ids = order[start : start + batch_size]
            vision = vision_features(pipe, [images[i] for i in ids])  # (B, N, D)
            for row, i in enumerate(ids):
                logits = []
                for lo in range(0, len(pairs[i]), batch_size):
                    chunk = pairs[i][lo : lo + batch_size]
                    feats = vision[row : row + 1].expand(len(chunk), -1, -1)
                    logits.append(itm_logits(pipe, feats, [texts[t] for t in chunk])[:, 1].numpy())
                    bar.update(len(chunk))
                out[i] = np.concatenate(logits)
    return out


def final_rankings(
    itc: np.ndarray,
    i2t: np.ndarray,
    t2i: np.ndarray,
    k: int,
    pairs: dict[int, np.ndarray],
    logits: dict[int, np.ndarray],
) -> Rankings:
    """Each query's first ``k`` ITC candidates re-ordered by ITM logit + ITC, then the rest of its
    candidates in ITC order."""

    def logit(i: int, texts: np.ndarray) -> np.ndarray:
        return logits[i][np.searchsorted(pairs[i], texts)]

    def reorder(cands: np.ndarray, itc_row: np.ndarray, match: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        head = cands[:k]
        final = itc_row[head] + match
        order = np.argsort(-final, kind="stable")
        ranked = np.concatenate([head[order], cands[k:]])
        return ranked, np.concatenate([final[order], itc_row[cands[k:]]])

    rows_i2t = [reorder(c, itc[i], logit(i, c[:k])) for i, c in enumerate(i2t)]
    rows_t2i = [
        reorder(c, itc[:, t], np.array([logit(int(i), np.array([t]))[0] for i in c[:k]], np.float32))
        for t, c in enumerate(t2i)
    ]
    return Rankings(
        np.stack([r[0] for r in rows_i2t]), np.stack([r[1] for r in rows_i2t]).astype(np.float32),
        np.stack([r[0] for r in rows_t2i]), np.stack([r[1] for r in rows_t2i]).astype(np.float32),
    )  # fmt: skip


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
    pairs = rerank_pairs(i2t, t2i, k)
    logits = itm_match_logits(pipe, images, texts, pairs, batch_size, progress)
    return final_rankings(itc.numpy(), i2t, t2i, k, pairs, logits)
