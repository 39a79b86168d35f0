"""easy-VQA (PyPI ``easy-vqa`` 1.0, MIT): real labelled images that install offline.

4,000 train and 1,000 test 64x64 RGB images, each of one coloured shape, with 38,575 train and 9,673 test
questions ("what color is the shape?", "is there not a circle in the image?") whose answers are one of 13 words:
a shape (circle, rectangle, triangle), a colour (8) or yes/no. The default model's vision tower is trained on the
TRAIN split (minus :data:`VALIDATION_IMAGES` images held out by image for choices while training); the TEST split
is only ever used to measure accuracy.

Questions are asked as easy-VQA words them, in the model's chat template: a user turn with the image then the
question, and an assistant turn with the answer word. A model's answer is scored by its first word
(:func:`first_word`), lower-cased, without punctuation.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "yellow", "teal", "brown")
ANSWERS = (*SHAPES, *COLORS, "yes", "no")
QUESTION_TYPES = ("shape", "color", "yes/no")
VALIDATION_IMAGES = 400  # train images held out (by image) for choices while training
VALIDATION_SEED = 0

Split = Literal["train", "test"]


@dataclass(frozen=True)
class Question:
    """One easy-VQA question about one image of a split."""

    split: str
    image_id: int
    question: str
    answer: str

    @property
    def type(self) -> str:
        """``"shape"``, ``"color"`` or ``"yes/no"``: the kind of answer the question asks for."""
        return question_type(self.answer)

    @property
    def image_path(self) -> Path:
        return image_paths(self.split)[self.image_id]

    def image(self) -> Image.Image:
        """The 64x64 RGB image."""
        with Image.open(self.image_path) as image:
            return image.convert("RGB")


def question_type(answer: str) -> str:
    if answer in SHAPES:
        return "shape"
    if answer in COLORS:
        return "color"
    if answer in ("yes", "no"):
        return "yes/no"
    raise ValueError(f"{answer!r} is not an easy-VQA answer ({', '.join(ANSWERS)})")


def _package():
    try:
        import easy_vqa
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "easy-VQA's images and questions come from the `easy-vqa` package: pip install easy-vqa==1.0 "
            "(part of qig-plugin[quantize])"
        ) from error
    return easy_vqa


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


@functools.cache
def image_paths(split: Split) -> dict[int, Path]:
    """``{image id: PNG path}`` of a split (4,000 train, 1,000 test images)."""
    _check_split(split)
    package = _package()
    paths = package.get_train_image_paths() if split == "train" else package.get_test_image_paths()
    return {image_id: Path(path) for image_id, path in sorted(paths.items())}


@functools.cache
def questions(split: Split) -> tuple[Question, ...]:
    """Every question of a split, in the package's order (38,575 train, 9,673 test)."""
    _check_split(split)
    package = _package()
    texts, answers, image_ids = package.get_train_questions() if split == "train" else package.get_test_questions()
    return tuple(Question(split, int(i), text, answer) for text, answer, i in zip(texts, answers, image_ids))


@functools.cache
def validation_image_ids() -> frozenset[int]:
    """The :data:`VALIDATION_IMAGES` train images kept out of training (a seeded choice among all train images)."""
    ids = sorted(image_paths("train"))
    return frozenset(random.Random(VALIDATION_SEED).sample(ids, VALIDATION_IMAGES))


def training_questions() -> list[Question]:
    """The train questions whose image is not a validation image."""
    held = validation_image_ids()
    return [q for q in questions("train") if q.image_id not in held]


def validation_questions() -> list[Question]:
    """The train questions about the validation images (about 3,900)."""
    held = validation_image_ids()
    return [q for q in questions("train") if q.image_id in held]


def sample_questions(split: Split, count: int, seed: int = 0) -> list[Question]:
    """``count`` questions of a split drawn without replacement with a seeded RNG (all of them if fewer)."""
    pool = list(questions(split))
    return random.Random(seed).sample(pool, min(count, len(pool)))


def image_labels(split: Split) -> dict[int, dict[str, str]]:
    """What the questions say about each image: ``{image id: {"shape": ..., "color": ...}}``.

    Read off the answers: a shape or colour answer names it, the question may name the other ("what is the blue
    shape?" -> rectangle), a yes/no answer to a question naming one attribute, with or without "not"/"no", says
    whether the image has it, and two excluded shapes (or seven excluded colours) leave one. Images about which the
    questions say too little lack that key (about 5% of train images lack the shape or the colour).
    """
    facts: dict[int, dict[str, set[str]]] = {}
    for q in questions(split):
        known = facts.setdefault(q.image_id, {"shape": set(), "color": set(), "not_shape": set(), "not_color": set()})
        words = re.findall(r"[a-z]+", q.question.lower())
        named = [w for w in words if w in SHAPES or w in COLORS]
        if q.answer in SHAPES or q.answer in COLORS:
            known["shape" if q.answer in SHAPES else "color"].add(q.answer)
            for word in named:
                known["shape" if word in SHAPES else "color"].add(word)
            continue
        present = (q.answer == "yes") != is_negated(q.question)
        for word in named:
            kind = "shape" if word in SHAPES else "color"
            known[kind if present else f"not_{kind}"].add(word)
    labels: dict[int, dict[str, str]] = {}
    for image_id, known in facts.items():
        label = {}
        for kind, values in (("shape", SHAPES), ("color", COLORS)):
            candidates = known[kind] or set(values) - known[f"not_{kind}"]
            if len(candidates) == 1:
                (label[kind],) = candidates
        labels[image_id] = label
    return labels


def is_negated(question: str) -> bool:
    """Whether a yes/no question asks about absence ("is there not a circle?", "is no red shape present?")."""
    words = re.findall(r"[a-z]+", question.lower())
    return "not" in words or "no" in words


def yes_no_group(q: Question) -> tuple[str, bool, str]:
    """A yes/no question's ``(attribute kind, negated, answer)``, e.g. ``("color", False, "yes")``.

    The answers are far from balanced within a group: "is there a red shape?" is "no" for 7 colours out of 8, and
    "is there not a red shape?" is "yes" as often, so answering by the question's form alone scores about 80% of
    the yes/no questions. Only the groups' balanced accuracy shows whether the image was looked at.
    """
    if q.type != "yes/no":
        raise ValueError(f"{q.question!r} is not a yes/no question")
    words = re.findall(r"[a-z]+", q.question.lower())
    kind = "shape" if any(word in SHAPES for word in words) else "color"
    return kind, is_negated(q.question), q.answer


def conversation(question: str, answer: str | None = None) -> list[dict]:
    """A question asked plainly, as chat messages: a user turn with the image then the question as easy-VQA words
    it, and, given an answer, the assistant turn with it (the form training and every accuracy measure use)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def first_word(text: str) -> str:
    """The first word of a model's answer, lower-cased, without punctuation ("" if there is none)."""
    match = re.search(r"[a-z]+", text.lower())
    return match.group(0) if match else ""


def accuracy_by_type(questions_asked: list[Question], answers: list[str]) -> dict[str, float]:
    """Exact-match accuracy of the answers' first words: ``{"all": ..., "shape": ..., "color": ..., "yes/no": ...}``.

    A type that has no question in ``questions_asked`` is left out.
    """
    if len(questions_asked) != len(answers):
        raise ValueError(f"{len(questions_asked)} questions but {len(answers)} answers")
    scores: dict[str, list[bool]] = {"all": []}
    for q, answer in zip(questions_asked, answers):
        right = first_word(answer) == q.answer
        scores["all"].append(right)
        scores.setdefault(q.type, []).append(right)
    order = ("all", *QUESTION_TYPES)
    return {kind: sum(scores[kind]) / len(scores[kind]) for kind in order if scores.get(kind)}


def balanced_yes_no_accuracy(questions_asked: list[Question], answers: list[str]) -> float | None:
    """The mean, over the yes/no groups of :func:`yes_no_group` that occur, of the accuracy within each group.

    Answering by the question's form alone scores 50% here (None if there is no yes/no question).
    """
    groups: dict[tuple[str, bool, str], list[bool]] = {}
    for q, answer in zip(questions_asked, answers):
        if q.type == "yes/no":
            groups.setdefault(yes_no_group(q), []).append(first_word(answer) == q.answer)
    if not groups:
        return None
    return sum(sum(right) / len(right) for right in groups.values()) / len(groups)
