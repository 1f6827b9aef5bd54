"""Procedural scenes: a few coloured shapes at fixed places, with a canonical caption and questions.

A scene is 1–3 objects, each a (colour, shape, size) at one of five places, no two at the same place.
Its caption lists the objects in a fixed place order, so the caption of a scene is unique and exact
match is learnable: "a small red circle on the left and a large blue square at the bottom".

Everything is a function of a seed (``numpy.random.Generator``): the same seed gives the same scenes,
pixels included. Train and held-out scenes are disjoint *by construction*: a scene belongs to the
held-out split when a hash of its caption (which names every object and place) falls in the held-out
bucket, and each split's generator rejects the other's scenes. Evaluation therefore only ever sees
object combinations that training never drew, whatever the seeds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64

COLOURS = {
    "red": (220, 45, 45),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 11, "large": 19}  # extent in pixels
# place -> (centre x, centre y) as fractions of the side, in caption order
PLACES = {
    "left": (0.19, 0.5),
    "top": (0.5, 0.19),
    "centre": (0.5, 0.5),
    "bottom": (0.5, 0.81),
    "right": (0.81, 0.5),
}
PLACE_PHRASES = {
    "left": "on the left",
    "top": "at the top",
    "centre": "in the centre",
    "bottom": "at the bottom",
    "right": "on the right",
}
NUMBERS = ("zero", "one", "two", "three")
BACKGROUND = (236, 236, 230)
HELD_OUT_BUCKETS = 8  # 1 in 8 object combinations is held out
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    place: str

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {PLACE_PHRASES[self.place]}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # in caption (place) order
    jitter: tuple[tuple[int, int], ...]  # per object: pixel offset of its centre
    tint: tuple[tuple[int, int, int], ...]  # per object: small colour offset

    @property
    def caption(self) -> str:
        phrases = [o.phrase for o in self.objects]
        if len(phrases) == 1:
            return phrases[0]
        return ", ".join(phrases[:-1]) + " and " + phrases[-1]

    @property
    def code(self) -> str:
        """The scene in a fixed layout of 20 words: each place's name, then the size, colour and shape of
        what stands there ("none none none" where nothing does), in place order. The language model reads
        it in pre-training where the image prefix will be: a fixed layout (word ``4k + j`` is always item
        ``j`` of place ``k``) is one a prefix of 20 queries can stand in for position by position, and with
        the place names in it "where is …?" is answered by looking back from the object, as "what colour
        is …?" is."""
        by_place = {o.place: o for o in self.objects}
        words = []
        for place in PLACES:
            o = by_place.get(place)
            words += [place, *([o.size, o.colour, o.shape] if o else ["none"] * 3)]
        return " ".join(words)

    @property
    def split(self) -> str:
        return split_of(self.caption)

    def questions(self) -> list[tuple[str, str]]:
        """Every (question, one-word answer) this scene answers unambiguously, in a fixed order."""
        objs = self.objects
        qa: list[tuple[str, str]] = [("how many shapes are there?", NUMBERS[len(objs)])]
        for shape in SHAPES:
            same = [o for o in objs if o.shape == shape]
            qa.append((f"how many {shape}s are there?", NUMBERS[len(same)]))
            if len(same) == 1:
                qa.append((f"what colour is the {shape}?", same[0].colour))
        by_place = {o.place: o for o in objs}
        for place, phrase in PLACE_PHRASES.items():
            o = by_place.get(place)
            qa.append((f"is there a shape {phrase}?", "yes" if o else "no"))
            if o is not None:
                qa.append((f"what shape is {phrase}?", o.shape))
                qa.append((f"what colour is the shape {phrase}?", o.colour))
        for o in objs:
            if sum(p.colour == o.colour and p.shape == o.shape for p in objs) == 1:
                qa.append((f"where is the {o.colour} {o.shape}?", o.place))
                qa.append((f"what size is the {o.colour} {o.shape}?", o.size))
        present = {(o.colour, o.shape) for o in objs}
        for colour in COLOURS:
            for shape in SHAPES:
                qa.append((f"is there a {colour} {shape}?", "yes" if (colour, shape) in present else "no"))
        return qa

    def sample_questions(self, rng: np.random.Generator, k: int) -> list[tuple[str, str]]:
        """``k`` distinct questions, yes/no questions about colour-shape pairs balanced against the rest."""
        qa = self.questions()
        pairs = [x for x in qa if x[0].startswith("is there a ") and " shape " not in x[0]]
        yes = [x for x in pairs if x[1] == "yes"]
        no = [x for x in pairs if x[1] == "no"]
        other = [x for x in qa if x not in pairs]
        # keep the yes/no pair questions to a balanced few: one yes and one no
        pool = other + [yes[int(rng.integers(len(yes)))], no[int(rng.integers(len(no)))]]
        picks = rng.choice(len(pool), size=min(k, len(pool)), replace=False)
        return [pool[int(i)] for i in picks]

    def render(self, size: int = IMAGE_SIZE) -> Image.Image:
        image = Image.new("RGB", (size, size), BACKGROUND)
        fills = [
            tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(COLOURS[o.colour], tint, strict=True))
            for o, tint in zip(self.objects, self.tint, strict=True)
        ]
        self._draw(ImageDraw.Draw(image), size, fills)
        return image

    def label_map(self, size: int = IMAGE_SIZE) -> np.ndarray:
        """(size, size) uint8: 0 for background, else 1 + the covering object's (place, colour, shape, size)
        class: what a patch of it should know, where it stands included."""
        image = Image.new("L", (size, size), 0)
        fills = []
        for o in self.objects:
            c, s, z = list(COLOURS).index(o.colour), SHAPES.index(o.shape), list(SIZES).index(o.size)
            fills.append(
                1
                + (list(PLACES).index(o.place) * len(COLOURS) * len(SHAPES) + c * len(SHAPES) + s)
                * len(SIZES)
                + z
            )
        self._draw(ImageDraw.Draw(image), size, fills)
        return np.asarray(image)

    def _draw(self, draw: ImageDraw.ImageDraw, size: int, fills: list) -> None:
        scale = size / IMAGE_SIZE
        for o, (dx, dy), fill in zip(self.objects, self.jitter, fills, strict=True):
            fx, fy = PLACES[o.place]
            cx, cy = fx * size + dx * scale, fy * size + dy * scale
            r = SIZES[o.size] * scale / 2
            if o.shape == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            elif o.shape == "square":
                draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
            else:
                draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)

    def slot_labels(self) -> list[int]:
        """Per place (in PLACES order): 0 when empty, else 1 + (colour, shape, size) class."""
        by_place = {o.place: o for o in self.objects}
        labels = []
        for place in PLACES:
            o = by_place.get(place)
            if o is None:
                labels.append(0)
                continue
            c, s, z = list(COLOURS).index(o.colour), SHAPES.index(o.shape), list(SIZES).index(o.size)
            labels.append(1 + (c * len(SHAPES) + s) * len(SIZES) + z)
        return labels


SLOT_CLASSES = 1 + len(COLOURS) * len(SHAPES) * len(SIZES)
PATCH_CLASSES = 1 + len(PLACES) * len(COLOURS) * len(SHAPES) * len(SIZES)


def split_of(caption: str) -> str:
    """Which split a scene (named by its caption) belongs to: fixed, whatever seed drew it."""
    digest = hashlib.blake2b(caption.encode(), digest_size=8).digest()
    return "heldout" if int.from_bytes(digest, "little") % HELD_OUT_BUCKETS == 0 else "train"


def random_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(1, 4))
    places = sorted(rng.choice(len(PLACES), size=n, replace=False).tolist())
    names = list(PLACES)
    colours, sizes = list(COLOURS), list(SIZES)
    objects = tuple(
        Obj(
            colours[int(rng.integers(len(colours)))],
            SHAPES[int(rng.integers(len(SHAPES)))],
            sizes[int(rng.integers(len(sizes)))],
            names[p],
        )
        for p in places
    )
    jitter = tuple((int(rng.integers(-2, 3)), int(rng.integers(-2, 3))) for _ in objects)
    tint = tuple(tuple(int(v) for v in rng.integers(-15, 16, size=3)) for _ in objects)
    return Scene(objects, jitter, tint)


def generate(seed: int, count: int, split: str = "train") -> list[Scene]:
    """``count`` scenes of ``split`` ("train" or "heldout"), a pure function of ``(seed, split)``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    # the split is mixed into the stream so that the two splits of one seed are unrelated draws
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    scenes: list[Scene] = []
    while len(scenes) < count:
        scene = random_scene(rng)
        if scene.split == split:
            scenes.append(scene)
    return scenes


def corpus() -> list[str]:
    """Every word and phrase form the scene text uses (for tokenizer training)."""
    lines = []
    for colour in COLOURS:
        for shape in SHAPES:
            for size in SIZES:
                for place in PLACE_PHRASES:
                    obj = Obj(colour, shape, size, place)
                    scene = Scene((obj,), ((0, 0),), ((0, 0, 0),))
                    lines.append(scene.caption)
                    lines.append(scene.code)
                    lines += [f"Question: {q} Answer: {a}." for q, a in scene.questions()]
    lines.append(
        "a small red circle on the left, a large blue square in the centre and a small green triangle"
    )
    lines += [f"Question: how many shapes are there? Answer: {n}" for n in NUMBERS]
    return lines
