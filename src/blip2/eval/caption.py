"""COCO caption metrics through ``pycocoevalcap`` (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE), and
captioning a set of images with a model.

The scores are ``pycocoevalcap``'s own: its PTB tokenizer (Java) on predictions and references, then
its scorers, over the images that have a prediction, exactly as ``COCOEvalCap.evaluate`` computes them
with ``params["image_id"]`` set to the predicted images. SPICE runs only when the Stanford CoreNLP jars
it needs are installed (pycocoevalcap downloads them on first use, which an offline machine cannot);
otherwise it is reported as unavailable, with the reason.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import DependencyError, InputError

if TYPE_CHECKING:
    from ..api import Pipeline

BLEU = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
METRICS = (*BLEU, "METEOR", "ROUGE_L", "CIDEr", "SPICE")
INSTALL_HINT = "pip install 'blip2[eval]' and a Java runtime (e.g. apt-get install default-jre-headless)"


class CaptionScores(NamedTuple):
    """Corpus scores by pycocoevalcap's names, and the metrics that could not run with the reason."""

    scores: dict[str, float]
    unavailable: dict[str, str]


def require_coco_eval() -> None:
    """Raise :class:`DependencyError` unless pycocoevalcap and a ``java`` program are installed."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise DependencyError(f"caption metrics need pycocoevalcap: {INSTALL_HINT}") from None
    if shutil.which("java") is None:
        raise DependencyError(
            f"caption metrics run Java (pycocoevalcap's tokenizer and METEOR), and no `java` is on the PATH: {INSTALL_HINT}"
        )


def spice_missing() -> str | None:
    """Why SPICE cannot run here (None when it can): the Stanford CoreNLP jars are not installed."""
    from pycocoevalcap.spice import spice

    lib = Path(spice.__file__).parent / "lib"
    jars = [lib / "stanford-corenlp-3.6.0.jar", lib / "stanford-corenlp-3.6.0-models.jar"]
    absent = [j.name for j in jars if not j.is_file()]
    if absent:
        return (
            f"SPICE needs {' and '.join(absent)} in {lib}, which pycocoevalcap downloads from Stanford NLP "
            "on first use (not done here: it needs the network; run pycocoevalcap.spice.get_stanford_models "
            "once on a connected machine)"
        )
    return None


# One METEOR process per Python process: it takes seconds to start (it loads a paraphrase table).
_meteor_lock = threading.Lock()
_meteor: Any = None


def _meteor_scorer():
    global _meteor
    from pycocoevalcap.meteor.meteor import Meteor

    with _meteor_lock:
        if _meteor is None or _meteor.meteor_p.poll() is not None:
            _meteor = Meteor()
        return _meteor


def score_captions(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    spice: bool = True,
) -> CaptionScores:
    """pycocoevalcap's corpus scores of ``predictions`` (image id -> caption) against ``references``
    (image id -> its reference captions), over the predicted images.

    ``spice=False`` skips SPICE (slow: a Java parser, 8 GB heap); it is also skipped, and named in
    ``unavailable``, when its jars are missing or it fails.
    """
    require_coco_eval()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not predictions:
        raise InputError("no predicted captions to score")
    gts, res = {}, {}
    for image_id, caption in predictions.items():
        refs = references.get(image_id)
        if refs is None:
            raise InputError(
                f"a caption is predicted for image {image_id!r}, which has no reference captions"
            )
        if not isinstance(caption, str):
            raise InputError(f"the caption predicted for image {image_id!r} is a {type(caption).__name__}")
        if not refs:
            raise InputError(f"image {image_id!r} has no reference captions")
        gts[image_id] = [{"caption": r} for r in refs]
        res[image_id] = [{"caption": caption}]
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)

    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update(zip(BLEU, (float(b) for b in bleu), strict=True))
    scores["METEOR"] = float(_meteor_scorer().compute_score(gts, res)[0])
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    unavailable: dict[str, str] = {}
    reason = "not asked for" if not spice else spice_missing()
    if reason is None:
        try:
            from pycocoevalcap.spice.spice import Spice

            scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
        except Exception as e:  # a Java failure (memory, a jar) must not lose the other scores
            reason = f"SPICE failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if reason is not None:
        unavailable["SPICE"] = reason
    return CaptionScores(scores, unavailable)


def caption_images(
    pipe: Pipeline,
    images: Sequence[tuple[Any, Any]],
    prompt: str | None = None,
    batch_size: int = 8,
    gen: Mapping[str, Any] | None = None,
    progress: bool = True,
    on_captions: Callable[[list[tuple[Any, str]]], None] | None = None,
) -> tuple[dict[Any, str], dict[str, str]]:
    """Caption ``(image_id, image)`` pairs (``image``: anything ``blip2.load_image`` reads), ``batch_size``
    at a time; ``prompt`` is continued (the caption is the continuation). ``on_captions`` sees each batch.
    Returns the captions and the images that could not be read (source -> why)."""
    import sys

    from tqdm import tqdm

    from .data import ImageReader

    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, not {batch_size}")
    read = ImageReader()
    captions: dict[Any, str] = {}
    with tqdm(total=len(images), unit="image", desc="caption", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            chunk = [(image_id, read(image)) for image_id, image in images[start : start + batch_size]]
            chunk = [(image_id, image) for image_id, image in chunk if image is not None]
            if chunk:
                texts = pipe.caption([image for _, image in chunk], prompt=prompt, **dict(gen or {}))
                done = [(image_id, text.strip()) for (image_id, _), text in zip(chunk, texts, strict=True)]
                captions.update(done)
                if on_captions is not None:
                    on_captions(done)
            bar.update(min(batch_size, len(images) - start))
    return captions, read.failed
