"""``blip2 eval caption|vqa|retrieval``: thin shells over blip2.eval's scoring functions.

Each verb either runs a model over a data set (``--model``, ``--images``) or re-scores saved predictions
(``--predictions``), writes ``<task>_report.json`` and ``<task>_predictions.*`` into ``--output``, and
prints a table. Images that are missing or unreadable are counted, named in the report, summed up in
one line on stderr, and make the exit status 1; the rest is still scored.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InputError

DEFAULT_OUTPUT = "blip2-eval"


def _say(message: str) -> None:
    print(f"blip2: {message}", file=sys.stderr)


def _options(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


def _model_or_predictions(args: argparse.Namespace, default_model: str) -> str | None:
    """The model to run, or None when ``--predictions`` are scored instead."""
    if args.predictions is not None:
        if args.model is not None:
            raise InputError("give --model (to run it) or --predictions (to score them), not both")
        return None
    if args.images is None:
        raise InputError("running a model needs --images DIR (or score saved captions with --predictions)")
    return args.model or default_model


def _report_bad_images(missing: list[str], unreadable: Mapping[str, str], total: int) -> int:
    """One line on stderr for the images that could not be used; the exit status (1 when any)."""
    if not missing and not unreadable:
        return 0
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first: {missing[0]})")
    if unreadable:
        first, why = next(iter(unreadable.items()))
        parts.append(f"{len(unreadable)} unreadable (first: {why})")
    _say(f"{len(missing) + len(unreadable)} of {total} images not scored: " + "; ".join(parts))
    return 1


def _finish(run, scores: Mapping[str, Any], table: str, model, data, options, **extra) -> None:
    path = run.write_report(scores, model, data, options, **extra)
    print(table)
    _say(f"report: {path}")


def _load_model(args: argparse.Namespace, model: str):
    from ..cli import _load

    return _load(argparse.Namespace(**{**vars(args), "model": model}))


# ---- caption ----------------------------------------------------------------------------------------


def _caption(args: argparse.Namespace) -> int:
    from ..cli import DEFAULT_MODEL, _gen_kwargs
    from .caption import METRICS, caption_images, require_coco_eval, score_captions
    from .data import image_paths, read_caption_predictions, read_coco_captions
    from .report import Run, format_table

    model = _model_or_predictions(args, DEFAULT_MODEL)
    refs = read_coco_captions(args.annotations)
    require_coco_eval()  # before an hour of captioning, not after
    run = Run(args.output, "caption")
    missing: list[str] = []
    unreadable: dict[str, str] = {}
    if model is None:
        predictions = read_caption_predictions(args.predictions)
        unknown = [i for i in predictions if i not in refs.references]
        if unknown:
            raise InputError(f"{args.predictions}: image_id {unknown[0]!r} is not in {args.annotations}")
    else:
        found, missing = image_paths(args.images, refs.files)
        pipe = _load_model(args, model)
        run.start_predictions()
        predictions, unreadable = caption_images(
            pipe, list(found.items()), prompt=args.prompt, batch_size=args.batch_size, gen=_gen_kwargs(args),
            progress=not args.quiet,
            on_captions=lambda done: run.add_predictions({"image_id": i, "caption": c} for i, c in done),
        )  # fmt: skip
        run.finish_predictions([{"image_id": i, "caption": c} for i, c in predictions.items()])
    status = _report_bad_images(missing, unreadable, len(refs.files))
    if not predictions:
        raise InputError("no image could be captioned: nothing to score")
    unpredicted = len(refs.references) - len(predictions) - len(missing) - len(unreadable)
    result = score_captions(predictions, refs.references, spice=not args.no_spice)
    data = {
        "annotations": str(args.annotations), "images": args.images, "predictions": args.predictions,
        "images_total": len(refs.files), "images_scored": len(predictions), "missing_images": len(missing),
        "unreadable_images": len(unreadable), "images_without_prediction": unpredicted,
    }  # fmt: skip
    rows = [(m, result.scores[m]) for m in METRICS if m in result.scores]
    rows += [(m, "n/a") for m in result.unavailable] + [("images scored", len(predictions))]
    options = _options(args, "prompt", "batch_size", "max_new_tokens", "min_new_tokens", "num_beams",
                       "length_penalty", "repetition_penalty", "sample", "temperature", "top_k", "top_p",
                       "seed", "dtype", "device", "quantize", "exact", "no_spice")  # fmt: skip
    _finish(run, result.scores, format_table("caption (pycocoevalcap)", rows), model, data, options,
            unavailable=result.unavailable, missing=missing, unreadable=unreadable,
            predictions_file=str(run.predictions) if model else None)  # fmt: skip
    if model is None and unpredicted:
        _say(f"{unpredicted} annotated images have no prediction: scored over the {len(predictions)} that do")
    return status


# ---- vqa --------------------------------------------------------------------------------------------


def _vqa(args: argparse.Namespace) -> int:
    from ..cli import DEFAULT_MODEL, _gen_kwargs
    from .data import image_names_by_id, image_paths, read_vqa, read_vqa_predictions
    from .report import Run, format_table
    from .vqa import answer_questions, vqa_accuracy

    model = _model_or_predictions(args, DEFAULT_MODEL)
    if model is not None and args.questions is None:
        raise InputError("running a model needs --questions Q.json (VQAv2 questions)")
    vqa = read_vqa(args.questions if model else None, args.annotations)
    run = Run(args.output, "vqa")
    missing: list[str] = []
    unreadable: dict[str, str] = {}
    skipped = images_total = 0
    if model is None:
        predictions = read_vqa_predictions(args.predictions)
    else:
        image_ids = {image_id for image_id, _ in vqa.questions.values()}
        images_total = len(image_ids)
        names = image_names_by_id(args.images, image_ids, args.image_name)
        found, missing = image_paths(args.images, names)
        triples = [(qid, found[i], q) for qid, (i, q) in vqa.questions.items() if i in found]
        pipe = _load_model(args, model)
        run.start_predictions()
        predictions, unreadable = answer_questions(
            pipe, triples, template=args.template, batch_size=args.batch_size, gen=_gen_kwargs(args),
            progress=not args.quiet,
            on_answers=lambda done: run.add_predictions({"question_id": q, "answer": a} for q, a in done),
        )  # fmt: skip
        run.finish_predictions([{"question_id": q, "answer": a} for q, a in predictions.items()])
        skipped = len(vqa.questions) - len(predictions)
    status = _report_bad_images(missing, unreadable, images_total)
    if not predictions:
        raise InputError("no question could be answered: nothing to score")
    scores, _ = vqa_accuracy(predictions, vqa.references)
    unanswered = len(vqa.references) - len(predictions)
    data = {
        "annotations": str(args.annotations), "questions": args.questions, "images": args.images,
        "predictions": args.predictions, "questions_total": len(vqa.references),
        "questions_scored": len(predictions), "questions_unanswered": unanswered,
        "questions_without_image": skipped, "missing_images": len(missing), "unreadable_images": len(unreadable),
    }  # fmt: skip
    rows = [("overall", scores["overall"])] + [(f"  {t}", v) for t, v in scores["perAnswerType"].items()]
    rows.append(("questions scored", len(predictions)))
    options = _options(args, "template", "image_name", "batch_size", "max_new_tokens", "min_new_tokens",
                       "num_beams", "length_penalty", "repetition_penalty", "sample", "temperature", "top_k",
                       "top_p", "seed", "dtype", "device", "quantize", "exact")  # fmt: skip
    _finish(run, scores, format_table("VQA accuracy (%)", rows), model, data, options,
            missing=missing, unreadable=unreadable,
            predictions_file=str(run.predictions) if model else None)  # fmt: skip
    if unanswered:
        _say(
            f"{unanswered} annotated questions have no answer: accuracy is over the {len(predictions)} answered"
        )
    return status


# ---- retrieval --------------------------------------------------------------------------------------


def _retrieval(args: argparse.Namespace) -> int:
    import numpy as np

    from ..models.checkpoint import retrieval_checkpoint
    from ..retrieval_cli import RETRIEVAL_MODEL
    from .data import ImageReader, clean_caption, image_paths, read_karpathy
    from .report import Run, format_table
    from .retrieval import DEFAULT_K, rank_retrieval, recall_scores

    model = _model_or_predictions(args, RETRIEVAL_MODEL)
    data_set = read_karpathy(args.annotations, args.split)
    if not args.raw_text:
        data_set.texts = [clean_caption(t) for t in data_set.texts]
    run = Run(args.output, "retrieval")
    missing: list[str] = []
    unreadable: dict[str, str] = {}
    total = len(data_set.images)
    rankings_file = run.folder / "retrieval_rankings.npz"
    if model is None:
        rankings, used = _read_rankings(Path(args.predictions), data_set)
        data_set = data_set.subset(used)
    else:
        found, missing = image_paths(args.images, dict(enumerate(data_set.images)))
        from tqdm import tqdm

        read = ImageReader()  # decode every image first: a bad one must not stop the run hours in
        checked = tqdm(found, desc="reading", unit="image", file=sys.stderr, disable=args.quiet)
        keep = [i for i in checked if read(found[i]) is not None]
        unreadable = read.failed
        data_set = data_set.subset(keep)
        paths = [found[i] for i in keep]
        pipe = _load_model(args, str(retrieval_checkpoint(model)))
        rankings = rank_retrieval(pipe, paths, data_set.texts, k=args.k, batch_size=args.batch_size,
                                  progress=not args.quiet)  # fmt: skip
        np.savez_compressed(rankings_file, images=np.array(data_set.images), texts=len(data_set.texts),
                            k=args.k, **rankings._asdict())  # fmt: skip
    status = _report_bad_images(missing, unreadable, total)
    scores = recall_scores(rankings.image_to_text, rankings.text_to_image, data_set.image_texts,
                           data_set.text_image)  # fmt: skip
    data = {
        "annotations": str(args.annotations), "images": args.images, "split": args.split,
        "predictions": args.predictions, "images_total": total, "images_scored": len(data_set.images),
        "texts_scored": len(data_set.texts), "missing_images": len(missing), "unreadable_images": len(unreadable),
    }  # fmt: skip
    rows = [(name, value) for name, value in scores.items()]
    rows += [("images", len(data_set.images)), ("texts", len(data_set.texts))]
    options = _options(args, "k", "batch_size", "raw_text", "dtype", "device", "quantize", "exact")
    options["k"] = args.k if model else _saved_k(Path(args.predictions), DEFAULT_K)
    _finish(run, scores, format_table("retrieval recall (%)", rows), model, data, options,
            missing=missing, unreadable=unreadable,
            predictions_file=str(rankings_file) if model else None)  # fmt: skip
    return status


def _read_rankings(path: Path, data_set) -> tuple[Any, list[int]]:
    """Rankings saved by a model run, and which images of ``data_set`` (in order) they cover."""
    import numpy as np

    from .retrieval import Rankings

    try:
        saved = np.load(path)
        rankings = Rankings(*(saved[name] for name in Rankings._fields))
        names = [str(n) for n in saved["images"]]
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{path}: not rankings saved by `blip2 eval retrieval` ({e})") from None
    index = {name: i for i, name in enumerate(data_set.images)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise InputError(f"{path}: ranks image {unknown[0]!r}, which the annotations do not have")
    used = [index[n] for n in names]
    texts = sum(len(data_set.image_texts[i]) for i in used)
    if len(rankings.text_to_image) != texts or len(rankings.image_to_text) != len(used):
        raise InputError(f"{path}: ranks {len(rankings.text_to_image)} texts; the annotations give {texts}")
    return rankings, used


def _saved_k(path: Path, default: int) -> int:
    import numpy as np

    with np.load(path) as saved:
        return int(saved["k"]) if "k" in saved else default


# ---- parser -----------------------------------------------------------------------------------------


def register(subparsers) -> None:
    from ..cli import generation_options, model_options
    from .retrieval import DEFAULT_K
    from .vqa import VQA_TEMPLATE

    def common_parser() -> argparse.ArgumentParser:
        p = model_options()
        p.set_defaults(model=None)
        p.add_argument("--annotations", "-a", required=True, metavar="FILE", help="the reference annotations")
        p.add_argument("--images", "-i", default=None, metavar="DIR", help="folder of the images")
        p.add_argument("--output", "-o", default=DEFAULT_OUTPUT, metavar="DIR",
                       help=f"where the report and predictions go (default ./{DEFAULT_OUTPUT})")  # fmt: skip
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
        return p

    gen = generation_options()
    top = subparsers.add_parser("eval", help="standard caption, VQA and retrieval scores on your data")
    tasks = top.add_subparsers(dest="eval_task", metavar="TASK", required=True)

    p = tasks.add_parser("caption", parents=[common_parser(), gen],
                         help="BLEU, METEOR, ROUGE-L, CIDEr (SPICE) on COCO-format captions")  # fmt: skip
    p.add_argument("--predictions", "-p", default=None, metavar="FILE",
                   help="score these captions ([{image_id, caption}]) instead of running a model")  # fmt: skip
    p.add_argument("--prompt", default=None, help='text each caption continues (BLIP-2 COCO: "a photo of")')
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--no-spice", action="store_true", help="skip SPICE (slow; needs Stanford CoreNLP jars)")
    p.set_defaults(func=_caption)

    p = tasks.add_parser(
        "vqa", parents=[common_parser(), gen], help="VQAv2 accuracy (official normalisation)"
    )
    p.add_argument("--questions", default=None, metavar="FILE", help="VQAv2 questions file")
    p.add_argument("--predictions", "-p", default=None, metavar="FILE",
                   help="score these answers ([{question_id, answer}]) instead of running a model")  # fmt: skip
    p.add_argument(
        "--template", default=VQA_TEMPLATE, help=f"prompt, {{}} = the question (default {VQA_TEMPLATE!r})"
    )
    p.add_argument("--image-name", default=None, metavar="TEMPLATE",
                   help="file name of an image id, e.g. COCO_val2014_{:012d}.jpg (default: the image file "
                   "whose name ends with the id)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16, help="questions per decode (default 16)")
    p.set_defaults(func=_vqa)

    p = tasks.add_parser("retrieval", parents=[common_parser()],
                         help="image-text recall@1/5/10: ITC over all pairs, ITM re-ranking of the top k")  # fmt: skip
    p.add_argument("--predictions", "-p", default=None, metavar="FILE",
                   help="re-score rankings saved by an earlier run (retrieval_rankings.npz)")  # fmt: skip
    p.add_argument(
        "--k",
        type=int,
        default=DEFAULT_K,
        help=f"candidates re-ranked by ITM per query (default {DEFAULT_K})",
    )
    p.add_argument(
        "--split", default="test", help="Karpathy split to use when entries carry one (default test)"
    )
    p.add_argument("--raw-text", action="store_true",
                   help="captions as written (default: BLIP's clean-up: lower case, no .!\"()*#:;~, 50 words)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32, help="images / pairs per forward pass (default 32)")
    p.set_defaults(func=_retrieval)
