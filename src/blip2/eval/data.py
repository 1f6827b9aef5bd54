"""Reading evaluation data: COCO captions, VQAv2 questions and annotations, Karpathy-style retrieval
sets, prediction files; and finding the images they name. Every problem is one :class:`InputError`
line naming the file and the entry."""

from __future__ import annotations

import json
import re
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from .vqa import VqaReference

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# ---- JSON ---------------------------------------------------------------------------------------


def read_json(path: str | Path) -> Any:
    """A JSON file's content, or one error line: missing file, not UTF-8, not JSON (where)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def read_records(path: str | Path) -> list[Any]:
    """A JSON array, or JSON lines (one object per line; what an interrupted run leaves)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        records = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
        return records
    data = read_json(path)
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON array of records, found a {type(data).__name__}")
    return data


def _field(path: Path, where: str, record: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(record, dict):
        raise InputError(f"{path}: {where} is a {type(record).__name__}, not an object")
    if key not in record:
        raise InputError(f"{path}: {where} has no {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise InputError(f"{path}: {where}: {key!r} must be {names}, not {type(value).__name__}")
    return value


def _section(path: Path, data: Any, key: str) -> list[Any]:
    """``data[key]`` when ``data`` is an object holding that list, or ``data`` itself when a list."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and isinstance(data.get(key), list):
        return data[key]
    raise InputError(f"{path}: expected an object with a {key!r} list")


ID = (int, str)


# ---- captions (COCO format) ------------------------------------------------------------------------


@dataclass
class CaptionSet:
    """COCO captions: image id -> file name, and image id -> reference captions."""

    files: dict[Hashable, str]
    references: dict[Hashable, list[str]]


def read_coco_captions(path: str | Path) -> CaptionSet:
    """``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise InputError(f"{path}: expected COCO captions: an object with 'images' and 'annotations' lists")
    files: dict[Hashable, str] = {}
    for n, image in enumerate(_section(path, data, "images")):
        image_id = _field(path, f"images[{n}]", image, "id", ID)
        files[image_id] = _field(path, f"images[{n}]", image, "file_name", str)
    references: dict[Hashable, list[str]] = {i: [] for i in files}
    for n, ann in enumerate(data["annotations"]):
        image_id = _field(path, f"annotations[{n}]", ann, "image_id", ID)
        caption = _field(path, f"annotations[{n}]", ann, "caption", str)
        if image_id not in references:
            raise InputError(
                f"{path}: annotations[{n}] names image_id {image_id!r}, which 'images' does not list"
            )
        references[image_id].append(caption)
    bare = [i for i, refs in references.items() if not refs]
    if bare:
        raise InputError(
            f"{path}: {len(bare)} images have no caption in 'annotations' (first: id {bare[0]!r})"
        )
    if not references:
        raise InputError(f"{path}: no images")
    return CaptionSet(files, references)


def read_caption_predictions(path: str | Path) -> dict[Hashable, str]:
    """COCO results: ``[{"image_id", "caption"}]`` (or JSON lines), one caption per image."""
    return _read_predictions(Path(path), "image_id", "caption")


def _read_predictions(path: Path, key: str, value: str) -> dict[Hashable, str]:
    """``{record[key]: record[value]}`` over the records of a results file; a repeated key is an error."""
    out: dict[Hashable, str] = {}
    for n, rec in enumerate(read_records(path)):
        rec_id = _field(path, f"entry {n}", rec, key, ID)
        if rec_id in out:
            raise InputError(f"{path}: {key} {rec_id!r} appears more than once (entry {n})")
        out[rec_id] = _field(path, f"entry {n}", rec, value, str)
    return out


# ---- VQA (VQAv2 format) -----------------------------------------------------------------------------


@dataclass
class VqaSet:
    """VQAv2 questions (id -> image id, question text) with their annotations (id -> reference)."""

    questions: dict[Hashable, tuple[Hashable, str]]
    references: dict[Hashable, VqaReference] = field(default_factory=dict)


def read_vqa(questions_path: str | Path | None, annotations_path: str | Path) -> VqaSet:
    """VQAv2 files: ``{"questions": [{"question_id", "image_id", "question"}]}`` and
    ``{"annotations": [{"question_id", "answers": [{"answer"}], "answer_type", "question_type"}]}``.
    Without a questions file, only the annotations are read (enough to score predictions)."""
    ann_path = Path(annotations_path)
    references: dict[Hashable, VqaReference] = {}
    for n, ann in enumerate(_section(ann_path, read_json(ann_path), "annotations")):
        where = f"annotations[{n}]"
        qid = _field(ann_path, where, ann, "question_id", ID)
        answers = _field(ann_path, where, ann, "answers", list)
        texts = tuple(
            a if isinstance(a, str) else _field(ann_path, f"{where}.answers[{j}]", a, "answer", str)
            for j, a in enumerate(answers)
        )
        if not texts:
            raise InputError(f"{ann_path}: {where} (question {qid!r}) has no answers")
        references[qid] = VqaReference(
            texts, str(ann.get("answer_type", "other")), str(ann.get("question_type", ""))
        )
    questions: dict[Hashable, tuple[Hashable, str]] = {}
    if questions_path is not None:
        q_path = Path(questions_path)
        for n, q in enumerate(_section(q_path, read_json(q_path), "questions")):
            where = f"questions[{n}]"
            qid = _field(q_path, where, q, "question_id", ID)
            if qid not in references:
                raise InputError(f"{q_path}: {where} (question {qid!r}) has no entry in {ann_path}")
            questions[qid] = (
                _field(q_path, where, q, "image_id", ID),
                _field(q_path, where, q, "question", str),
            )
    return VqaSet(questions, references)


def read_vqa_predictions(path: str | Path) -> dict[Hashable, str]:
    """VQA results: ``[{"question_id", "answer"}]`` (or JSON lines)."""
    return _read_predictions(Path(path), "question_id", "answer")


# ---- retrieval (Karpathy style) ----------------------------------------------------------------------


@dataclass
class RetrievalSet:
    """Images (relative paths) and texts, each text belonging to one image."""

    images: list[str]
    texts: list[str]
    text_image: list[int]

    @property
    def image_texts(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.images]
        for t, i in enumerate(self.text_image):
            out[i].append(t)
        return out

    def subset(self, keep: Iterable[int]) -> RetrievalSet:
        """Only the images ``keep`` (indices) and their texts."""
        new_index = {old: new for new, old in enumerate(keep)}
        pairs = [
            (t, new_index[i]) for t, i in zip(self.texts, self.text_image, strict=True) if i in new_index
        ]
        return RetrievalSet([self.images[i] for i in new_index], [t for t, _ in pairs], [i for _, i in pairs])


def read_karpathy(path: str | Path, split: str | None = "test") -> RetrievalSet:
    """Either LAVIS's list ``[{"image": path, "caption": str | [str]}]`` (entries naming one image are
    merged) or Karpathy's ``{"images": [{"filepath"?, "filename", "sentences": [{"raw"}], "split"}]}``,
    where only the images of ``split`` are kept (entries without a split are always kept)."""
    path = Path(path)
    data = read_json(path)
    entries = data["images"] if isinstance(data, dict) and isinstance(data.get("images"), list) else data
    if not isinstance(entries, list):
        raise InputError(f"{path}: expected a list of images with their captions, or an object with 'images'")
    by_image: dict[str, list[str]] = {}
    for n, entry in enumerate(entries):
        where = f"entry {n}"
        if isinstance(entry, dict) and split is not None and "split" in entry and entry["split"] != split:
            continue
        if isinstance(entry, dict) and "filename" in entry:
            name = _field(path, where, entry, "filename", str)
            folder = entry.get("filepath")
            image = f"{folder}/{name}" if isinstance(folder, str) and folder else name
            sentences = _field(path, where, entry, "sentences", list)
            captions = [
                s if isinstance(s, str) else _field(path, f"{where}.sentences", s, "raw", str)
                for s in sentences
            ]
        else:
            image = _field(path, where, entry, "image", str)
            caption = _field(path, where, entry, "caption", (str, list))
            captions = [caption] if isinstance(caption, str) else caption
            if not all(isinstance(c, str) for c in captions):
                raise InputError(f"{path}: {where}: every caption must be a string")
        by_image.setdefault(image, []).extend(captions)
    images = [i for i, caps in by_image.items() if caps]
    if not images:
        raise InputError(f"{path}: no image with a caption" + (f" in split {split!r}" if split else ""))
    texts = [c for i in images for c in by_image[i]]
    owners = [n for n, i in enumerate(images) for _ in by_image[i]]
    return RetrievalSet(images, texts, owners)


def clean_caption(text: str, max_words: int = 50) -> str:
    """BLIP's caption clean-up before retrieval (LAVIS's caption processor): lower case, the marks
    ``.!"()*#:;~`` to spaces, runs of whitespace to one space, at most ``max_words`` words."""
    text = re.sub(r"[.!\"()*#:;~]", " ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


# ---- images -----------------------------------------------------------------------------------------


def image_paths(folder: str | Path, names: dict[Hashable, str]) -> tuple[dict[Hashable, Path], list[str]]:
    """``folder / name`` for each id whose file exists, and the missing files (as written)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder of images")
    found, missing = {}, []
    for key, name in names.items():
        path = folder / name
        if path.is_file():
            found[key] = path
        else:
            missing.append(str(path))
    return found, missing


_TRAILING_NUMBER = re.compile(r"(\d+)$")


def image_names_by_id(
    folder: str | Path, ids: Iterable[Hashable], template: str | None = None
) -> dict[Hashable, str]:
    """File names for image ids that come without them (VQAv2). With ``template`` (e.g.
    ``COCO_val2014_{:012d}.jpg``) it names each file; without, the folder is scanned and an image file
    matches an id by the number its name ends with (``COCO_val2014_000000000042.jpg``, ``42.png``) or
    by its whole stem. Ids that match nothing get their template or id as a name (missing, counted)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder of images")
    ids = list(ids)
    if template is not None:
        try:
            return {i: template.format(i) for i in ids}
        except (IndexError, KeyError, ValueError) as e:
            raise InputError(f"image name template {template!r} does not fit the image ids ({e})") from None
    by_key: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            by_key.setdefault(path.stem, path.name)
            number = _TRAILING_NUMBER.search(path.stem)
            if number:
                by_key.setdefault(str(int(number.group(1))), path.name)
    return {i: by_key.get(str(i), str(i)) for i in ids}


class ImageReader:
    """Reads the images of a run one by one, keeping failures instead of raising them (a bad image is
    counted and reported; the run goes on). The last image read is kept: questions about one image
    come together."""

    def __init__(self) -> None:
        self.failed: dict[str, str] = {}  # source -> why it could not be read
        self._last: tuple[str, Any] = ("", None)

    def __call__(self, source: Any) -> Any:
        """The image as a PIL image, or None when it cannot be read."""
        from ..errors import ImageError
        from ..images import load_image

        key = str(source)
        if key in self.failed:
            return None
        if self._last[0] != key:
            try:
                self._last = (key, load_image(source))
            except ImageError as e:
                self.failed[key] = str(e)
                return None
        return self._last[1]
