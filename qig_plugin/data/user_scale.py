"""Calibration, validation and held-out records at the scale users calibrate with (llm-compressor's examples use
512 samples of up to 2048 tokens): real text and real labelled images, installed offline, about
``TARGET_TOKENS`` = 256 tokens per record, so that 256 records give 64k tokens or more.

Sources: the corpora of :mod:`qig_plugin.data.corpora` (Brown corpus, fortunes, Python documentation sources),
split by document, and easy-VQA (:mod:`qig_plugin.data.easy_vqa`), split by image: ``"calibration"`` uses the
training images (TRAIN minus the validation images), ``"validation"`` the validation images, ``"heldout"`` the
TEST images (used nowhere else but held-out measures). No document and no image is in two splits.

Record kinds (every answer is real text or a real label, none is written by us):

* ``vqa`` (VLM only): an easy-VQA image and its own questions with their one-word answers as a multi-turn chat
  (:attr:`CalibrationRecord.follow_ups`), topped up to the target with fortune turns (a chat that changes subject);
* ``brown``: a passage of the Brown corpus and "continue the text", answered with the real continuation;
* ``pydocs``: the same with a Python documentation source, or a question naming a documentation section answered
  with the start of that section;
* ``fortunes``: a multi-turn chat of fortunes: Q/A jokes as question and answer, attributed quotations as
  "give me a quotation by <author>", the rest as "tell me a fortune about <file's topic>".

For the VLM (:func:`vlm_records`) every record carries an image of the split (text tasks carry one too, as the
shipped records do, because records with and without images cannot be mixed in one dataset); for text-only models
(:func:`text_records`) the same texts come without images. Token counts are measured with the real tokenizer,
chat template and image tokens included (:func:`record_tokens`); passages are cut at whitespace.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Iterable

from qig_plugin.data import corpora, easy_vqa
from qig_plugin.data.calibration import (
    CalibrationRecord,
    cut_at_whitespace,
    render_conversation,
)
from qig_plugin.data.corpora import Document

TARGET_TOKENS = 256
# Multi-turn records stop adding turns at the target; a turn that would pass it by more than this is not added.
TURN_SLACK_TOKENS = 48
VLM_MIX = {"vqa": 0.4, "brown": 0.25, "pydocs": 0.2, "fortunes": 0.15}
TEXT_MIX = {"brown": 0.4, "pydocs": 0.35, "fortunes": 0.25}
HELDOUT_PASSAGES = 16
HELDOUT_PASSAGE_TOKENS = 256
# Image tokens the Idefics3 processor puts in place of one "<image>": <fake_token_around_image><global-img>, the
# image_seq_len <image> tokens and a closing <fake_token_around_image>.
IMAGE_WRAPPER_TOKENS = 3

FORTUNE_TOPICS = {
    "fortunes": "anything", "cookie": "anything", "miscellaneous": "anything", "knghtbrd": "anything",
    "men-women": "men and women", "songs-poems": "songs and poems", "zippy": "Zippy the Pinhead",
    "linuxcookie": "Linux", "goedel": "Goedel", "tao": "the Tao of programming",
}
BROWN_PROMPTS = (
    "Here is a passage of {genre} writing.\n\n{passage}\n\nContinue the text.",
    "Continue this passage ({genre}):\n\n{passage}",
    "{passage}\n\nWhat comes next? Continue in the same style.",
)
PYDOCS_PROMPTS = (
    "Here is a passage from the Python documentation ({path}).\n\n{passage}\n\nContinue the text.",
    "Continue this reStructuredText source of the Python docs:\n\n{passage}",
)
SECTION_PROMPTS = (
    'What does the Python documentation say in the section "{title}" of {path}?',
    'Explain "{title}" as the Python documentation ({path}) does.',
)
VQA_SPLITS = {"calibration": "training", "validation": "validation", "heldout": "test"}


# ---------------------------------------------------------------- token counts


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def record_tokens(record: CalibrationRecord, processor) -> int:
    """The length of the row :func:`~qig_plugin.data.calibration.build_calibration_dataset` makes of ``record``
    (before ``max_length``): the chat template rendered and tokenized, each image as the processor's
    ``image_seq_len`` image tokens and their wrappers. No image is processed, so it is cheap."""
    tokenizer = _tokenizer(processor)
    has_template = getattr(processor, "chat_template", None) is not None
    text = render_conversation(record, processor)
    count = len(tokenizer(text, add_special_tokens=not has_template)["input_ids"])
    if record.image is not None:
        count += processor.image_seq_len + IMAGE_WRAPPER_TOKENS - 1
    return count


def _token_prefix(text: str, tokenizer, tokens: int) -> str:
    """The longest prefix of ``text`` of at most ``tokens`` tokens that ends before a whitespace."""
    if tokens <= 0:
        return ""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    if len(offsets) <= tokens:
        return text
    end = offsets[tokens][0]
    cut = cut_at_whitespace(text[:end + 1], end)
    return cut.rstrip()


# ---------------------------------------------------------------- pools of a split


@functools.cache
def _split_images(split: str) -> tuple[tuple[int, tuple[easy_vqa.Question, ...]], ...]:
    """``((image id, its questions), ...)`` of the easy-VQA images of a split, by image id."""
    if split not in corpora.SPLITS:
        raise ValueError(f"split must be one of {', '.join(corpora.SPLITS)}, got {split!r}")
    source = {"calibration": easy_vqa.training_questions, "validation": easy_vqa.validation_questions,
              "heldout": lambda: easy_vqa.questions("test")}[split]()
    by_image: dict[int, list[easy_vqa.Question]] = {}
    for question in source:
        by_image.setdefault(question.image_id, []).append(question)
    return tuple((image_id, tuple(questions)) for image_id, questions in sorted(by_image.items()))


def split_image_ids(split: str) -> list[tuple[str, int]]:
    """``(easy-VQA split, image id)`` of every image a split's records may carry."""
    return [("test" if split == "heldout" else "train", image_id) for image_id, _ in _split_images(split)]


@functools.cache
def _documents(name: str, split: str) -> tuple[Document, ...]:
    return tuple(corpora.corpus_documents(name, split))


@functools.cache
def _sections(split: str) -> tuple[tuple[Document, str, str], ...]:
    """``(document, section title, section text)`` of the Python documentation sources of a split: titles are
    lines underlined with ``=``, ``-``, ``~``, ``^``, ``*`` or ``"``; sections of at least 400 characters."""
    found = []
    heading = re.compile(r"^(?P<title>[^\s.][^\n]{2,80})\n(?P<bar>[=\-~^*\"])(?P=bar){2,}\n", re.MULTILINE)
    for document in _documents("pydocs", split):
        matches = list(heading.finditer(document.text))
        for match, following in zip(matches, [*matches[1:], None]):
            body = document.text[match.end(): following.start() if following else len(document.text)].strip()
            title = re.sub(r"[:`*]", "", match["title"]).strip()
            if len(body) >= 400 and title:
                found.append((document, title, body))
    return tuple(found)


# ---------------------------------------------------------------- record builders


class _Builder:
    """Makes records of one split with one seeded RNG; ``image_of`` gives each record its image (or None)."""

    def __init__(self, split: str, seed: int, processor, target: int, with_images: bool):
        self.split, self.processor, self.target, self.with_images = split, processor, target, with_images
        self.tokenizer = _tokenizer(processor)
        self.rng = random.Random(f"qig-user-scale:{split}:{seed}")
        self.images = list(_split_images(split)) if with_images else []
        self.rng.shuffle(self.images)
        self.next_image = 0
        fortunes = list(_documents("fortunes", split))
        self.rng.shuffle(fortunes)
        self.fortune_pool, self.next_fortune = fortunes, 0

    def _image_entry(self):
        entry = self.images[self.next_image % len(self.images)]
        self.next_image += 1
        return entry

    def _image(self):
        if not self.with_images:
            return None
        _image_id, questions = self._image_entry()
        return questions[0].image()

    def _count(self, record: CalibrationRecord) -> int:
        return record_tokens(record, self.processor)

    # ---- single-turn continuation records

    def _continuation(self, document: Document, template: str, image, **fields) -> CalibrationRecord:
        empty = CalibrationRecord(image, template.format(passage="", **fields), "")
        budget = self.target - self._count(empty)
        text = document.text
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoding["offset_mapping"]
        start_token = self.rng.randrange(max(1, len(offsets) - budget))
        start = offsets[start_token][0] if offsets else 0
        boundary = re.compile(r"(?<=[.!?:\n])\s+").search(text, start, start + 400) if start else None
        if boundary:
            start = boundary.end()
        rest = text[start:]
        passage_tokens = int(budget * self.rng.uniform(0.5, 0.75))
        passage = _token_prefix(rest, self.tokenizer, passage_tokens)
        prompt = template.format(passage=passage, **fields)
        record = CalibrationRecord(image, prompt, "")
        continuation = _token_prefix(rest[len(passage):].lstrip(), self.tokenizer, self.target - self._count(record))
        return CalibrationRecord(image, prompt, continuation)

    def _long_document(self, name: str) -> Document:
        """A document of the split with at least 6 characters per target token, drawn in proportion to length."""
        pool = [d for d in _documents(name, self.split) if len(d.text) >= 6 * self.target]
        return self.rng.choices(pool, weights=[len(d.text) for d in pool])[0]

    def brown(self) -> CalibrationRecord:
        document = self._long_document("brown")
        template = self.rng.choice(BROWN_PROMPTS)
        return self._continuation(document, template, self._image(), genre=document.source.replace("_", " "))

    def pydocs(self) -> CalibrationRecord:
        image = self._image()
        if self.rng.random() < 0.5:
            document = self._long_document("pydocs")
            path = document.id.removeprefix("pydocs/").removesuffix(".txt")
            return self._continuation(document, self.rng.choice(PYDOCS_PROMPTS), image, path=path)
        document, title, body = self.rng.choice(_sections(self.split))
        path = document.id.removeprefix("pydocs/").removesuffix(".txt")
        prompt = self.rng.choice(SECTION_PROMPTS).format(title=title, path=path)
        budget = self.target - self._count(CalibrationRecord(image, prompt, ""))
        return CalibrationRecord(image, prompt, _token_prefix(body, self.tokenizer, budget))

    # ---- multi-turn records

    def _fortune_turn(self) -> tuple[str, str]:
        document = self.fortune_pool[self.next_fortune % len(self.fortune_pool)]
        self.next_fortune += 1
        return fortune_turn(document)

    def _pack(self, record: CalibrationRecord, turns: Iterable[tuple[str, str]]) -> CalibrationRecord:
        """``record`` with turns appended while it is shorter than the target (a turn that would pass the target
        by more than ``TURN_SLACK_TOKENS`` is skipped; the fourth skip in a row ends the packing)."""
        count, skipped = self._count(record), 0
        for turn in turns:
            if count >= self.target or skipped > 3:
                break
            candidate = CalibrationRecord(record.image, record.prompt, record.answer, (*record.follow_ups, turn))
            candidate_count = self._count(candidate)
            if candidate_count > self.target + TURN_SLACK_TOKENS:
                skipped += 1
                continue
            record, count, skipped = candidate, candidate_count, 0
        return record

    def _fortune_turns(self):
        while True:
            yield self._fortune_turn()

    def fortunes(self) -> CalibrationRecord:
        prompt, answer = self._fortune_turn()
        while self._count(CalibrationRecord(None, prompt, answer)) > self.target:  # one overlong fortune
            prompt, answer = self._fortune_turn()
        return self._pack(CalibrationRecord(self._image(), prompt, answer), self._fortune_turns())

    def vqa(self) -> CalibrationRecord:
        _image_id, questions = self._image_entry()
        questions = list(questions)
        self.rng.shuffle(questions)
        first, *rest = questions
        record = CalibrationRecord(first.image(), first.question, first.answer)
        record = self._pack(record, ((q.question, q.answer) for q in rest))
        return self._pack(record, self._fortune_turns())


def fortune_turn(document: Document) -> tuple[str, str]:
    """A fortune as a chat turn ``(prompt, answer)``: a Q/A joke as its question and answer, an attributed
    quotation (last line ``-- Author, ...``) as "Give me a quotation by Author." and the whole text, anything else
    as "Tell me a fortune about <topic of its file>." and the text."""
    text = document.text
    question = re.search(r"^\s*Q:\s*(.+?)(?=^\s*A:|\Z)", text, re.MULTILINE | re.DOTALL)
    answer = re.search(r"^\s*A:\s*(.+?)(?=^\s*Q:|\Z)", text, re.MULTILINE | re.DOTALL)
    if question and answer:
        return " ".join(question[1].split()), " ".join(answer[1].split())
    author = re.search(r"\n\s*--\s*([^,\n(]+)[^\n]*\Z", text)
    if author and 2 < len(author[1].strip()) < 40:
        return f"Give me a quotation by {author[1].strip()}.", text
    topic = FORTUNE_TOPICS.get(document.source, document.source.replace("-", " "))
    return f"Tell me a fortune about {topic}.", text


def _kinds(mix: dict[str, float], count: int, rng: random.Random) -> list[str]:
    """``count`` record kinds in the proportions of ``mix`` (largest remainders), in a seeded order."""
    exact = {kind: share * count for kind, share in mix.items()}
    counts = {kind: int(value) for kind, value in exact.items()}
    for kind in sorted(exact, key=lambda k: counts[k] - exact[k])[: count - sum(counts.values())]:
        counts[kind] += 1
    kinds = [kind for kind, n in counts.items() for _ in range(n)]
    rng.shuffle(kinds)
    return kinds


def _records(split: str, count: int, seed: int, processor, target: int, mix: dict[str, float], with_images: bool):
    if split not in corpora.SPLITS:
        raise ValueError(f"split must be one of {', '.join(corpora.SPLITS)}, got {split!r}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    corpora.check_installed()
    builder = _Builder(split, seed, processor, target, with_images)
    return [getattr(builder, kind)() for kind in _kinds(mix, count, builder.rng)]


@functools.cache
def _default_processor():
    from qig_plugin.models.default_model import build_default_model, load_processor

    return load_processor(build_default_model())


@functools.cache
def _default_text_tokenizer():
    from transformers import AutoTokenizer

    from qig_plugin.models.default_model import build_text_model

    return AutoTokenizer.from_pretrained(build_text_model())


def vlm_records(split: str, count: int = 256, seed: int = 0, processor=None,
                target_tokens: int = TARGET_TOKENS) -> list[CalibrationRecord]:
    """``count`` records of a split for a vision-language model, every one with an easy-VQA image of the split.

    Kinds in the proportions of ``VLM_MIX`` (40% easy-VQA conversations, 25% Brown continuations, 20% Python
    documentation, 15% fortune chats; see the module docstring), each about ``target_tokens`` tokens as
    ``processor`` counts them (default: the default model's processor; :func:`record_tokens`). The same
    ``(split, count, seed)`` gives the same records; another seed another sample of the same split.

    Raises:
        ValueError: an unknown split or a negative count.
        corpora.CorpusNotInstalledError: a corpus is missing (the message names the command that installs it).
    """
    processor = processor if processor is not None else _default_processor()
    return _records(split, count, seed, processor, target_tokens, VLM_MIX, with_images=True)


def text_records(split: str, count: int = 256, seed: int = 0, tokenizer=None,
                 target_tokens: int = TARGET_TOKENS) -> list[CalibrationRecord]:
    """``count`` image-less records of a split for a text-only model: the text kinds of :func:`vlm_records` in the
    proportions of ``TEXT_MIX`` (40% Brown, 35% Python documentation, 25% fortune chats), each about
    ``target_tokens`` tokens as ``tokenizer`` counts them (default: SmolLM2-135M-Instruct's). Deterministic per
    ``(split, count, seed)``; raises as :func:`vlm_records`."""
    tokenizer = tokenizer if tokenizer is not None else _default_text_tokenizer()
    return _records(split, count, seed, tokenizer, target_tokens, TEXT_MIX, with_images=False)


def heldout_corpus_passages(tokenizer, count: int = HELDOUT_PASSAGES, tokens: int = HELDOUT_PASSAGE_TOKENS,
                            names: tuple[str, ...] = ("brown", "pydocs"), split: str = "heldout",
                            seed: int = 0) -> list[list[int]]:
    """``count`` real held-out passages of ``tokens`` ids each for perplexity, in the shape of
    :func:`qig_plugin.evaluation.heldout_text_passages`: the starts of documents of the corpora ``names`` in
    ``split`` (default ``"heldout"``, which no record of another split shares a document with) longer than
    ``4 * tokens`` characters, chosen with ``seed``, in document-id order."""
    candidates = sorted(
        (document for name in names for document in _documents(name, split) if len(document.text) > 4 * tokens),
        key=lambda document: document.id,
    )
    if count > len(candidates):
        raise ValueError(f"asked for {count} passages but {split} has {len(candidates)} documents long enough")
    chosen = sorted(random.Random(seed).sample(range(len(candidates)), count))
    return [
        list(tokenizer(candidates[index].text, add_special_tokens=False)["input_ids"][:tokens]) for index in chosen
    ]
