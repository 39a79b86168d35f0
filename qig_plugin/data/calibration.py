"""Calibration data: the shipped real photographs and texts, and their conversion to an oneshot dataset.

Photos come from scikit-image, scikit-learn and matplotlib (all installable offline); texts are our own captions
and answers (``qig_plugin.data.records``) and real passages of the Python documentation (``pydoc_data.topics``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from datasets import Dataset
from PIL import Image

from qig_plugin.data.records import HELDOUT_PHOTOS, HELDOUT_TOPICS, PASSAGE_TASKS, PHOTO_PROMPTS, TEXT_ONLY_TOPICS

PASSAGE_CHARS = 900
CONTINUATION_CHARS = 400
IMAGE_PLACEHOLDER_TOKENS = ("<image>", "<fake_token_around_image>", "<global-img>")


@dataclass
class CalibrationRecord:
    """One conversation: an optional image, the user's prompt and the assistant's answer, then optional further
    ``(prompt, answer)`` turns (``follow_ups``) about the same image."""

    image: Image.Image | None
    prompt: str
    answer: str
    follow_ups: tuple[tuple[str, str], ...] = ()


def load_photo(name: str) -> Image.Image:
    """Load a shipped photograph by name (a key of ``PHOTO_PROMPTS``) as an RGB image."""
    if name == "china" or name == "flower":
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(f"{name}.jpg")).convert("RGB")
    if name == "grace_hopper":
        from matplotlib.cbook import get_sample_data

        with Image.open(get_sample_data("grace_hopper.jpg")) as image:
            return image.convert("RGB")
    import skimage.data

    pixels = getattr(skimage.data, name)()
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    return Image.fromarray(pixels).convert("RGB")


def _topic_text(topic: str) -> str:
    import pydoc_data.topics

    return re.sub(r"\n{3,}", "\n\n", pydoc_data.topics.topics[topic]).strip()


def cut_at_whitespace(text: str, max_chars: int) -> str:
    """The longest prefix of ``text`` of at most ``max_chars`` characters that ends before a whitespace."""
    if len(text) <= max_chars:
        return text
    return text[: text.rindex(" ", 0, max_chars + 1)].rstrip()


def _passage_record(topic: str, task: str, image: Image.Image | None, summary: str | None) -> CalibrationRecord:
    text = _topic_text(topic)
    if task == "summarize":
        passage = cut_at_whitespace(text, PASSAGE_CHARS)
        return CalibrationRecord(image, f"Summarize this passage from the Python documentation.\n\n{passage}", summary)
    passage = cut_at_whitespace(text, min(PASSAGE_CHARS, 2 * len(text) // 3))  # leave text to continue
    continuation = cut_at_whitespace(text[len(passage) :].lstrip(), CONTINUATION_CHARS)
    return CalibrationRecord(
        image, f"Here is a passage from the Python documentation.\n\n{passage}\n\nContinue the text.", continuation
    )


def shipped_records(split: Literal["calibration", "heldout"]) -> list[CalibrationRecord]:
    """The project's real calibration set, in a fixed order.

    ``"calibration"`` has 52 records (14 photos x 3 prompts, 10 documentation passages), ``"heldout"`` 19
    (5 photos x 3 prompts, 4 passages). No photo and no passage appears in both splits; every record has an image
    (passages are paired with a photo of the same split).
    """
    if split not in ("calibration", "heldout"):
        raise ValueError(f"split must be 'calibration' or 'heldout', got {split!r}")
    heldout = split == "heldout"
    photos = {name: load_photo(name) for name in PHOTO_PROMPTS if (name in HELDOUT_PHOTOS) == heldout}
    records = [
        CalibrationRecord(photos[name], prompt, answer)
        for name in photos
        for prompt, answer in PHOTO_PROMPTS[name]
    ]
    records += [
        _passage_record(topic, task, photos[photo], summary)
        for topic, task, photo, summary in PASSAGE_TASKS
        if (topic in HELDOUT_TOPICS) == heldout
    ]
    return records


def shipped_text_records(split: Literal["calibration", "heldout"]) -> list[CalibrationRecord]:
    """The project's real calibration texts for text-only LLMs, in a fixed order; no record has an image.

    The split's documentation passages of :func:`shipped_records` without their photos, then continuations of
    the passages of ``TEXT_ONLY_TOPICS``: ``"calibration"`` has 24 records, ``"heldout"`` 8, no topic in both.
    """
    if split not in ("calibration", "heldout"):
        raise ValueError(f"split must be 'calibration' or 'heldout', got {split!r}")
    heldout = split == "heldout"
    records = [
        _passage_record(topic, task, None, summary)
        for topic, task, _photo, summary in PASSAGE_TASKS
        if (topic in HELDOUT_TOPICS) == heldout
    ]
    records += [
        _passage_record(topic, "continue", None, None)
        for topic in TEXT_ONLY_TOPICS
        if (topic in HELDOUT_TOPICS) == heldout
    ]
    return records


def _describe(index: int, record: object) -> str:
    prompt = getattr(record, "prompt", None)
    return f"record {index} (prompt {prompt[:40]!r})" if isinstance(prompt, str) else f"record {index} ({record!r:.80})"


def _checked_image(index: int, record: object) -> Image.Image | None:
    """Validate a record's fields and return its decoded RGB image (or None)."""
    if not isinstance(record, CalibrationRecord):
        raise TypeError(f"{_describe(index, record)} is a {type(record).__name__}, expected a CalibrationRecord")
    if not isinstance(record.prompt, str) or not record.prompt.strip():
        raise ValueError(f"{_describe(index, record)} has an empty or non-string prompt")
    if not isinstance(record.answer, str):
        raise ValueError(f"{_describe(index, record)} has a non-string answer: {record.answer!r:.80}")
    for turn in record.follow_ups:
        if not (isinstance(turn, tuple) and len(turn) == 2 and all(isinstance(part, str) for part in turn)):
            raise ValueError(f"{_describe(index, record)} has a follow-up that is not a (prompt, answer) pair of "
                             f"strings: {turn!r:.80}")
        if not turn[0].strip():
            raise ValueError(f"{_describe(index, record)} has a follow-up with an empty prompt")
    if record.image is None:
        return None
    if not isinstance(record.image, Image.Image):
        raise TypeError(
            f"{_describe(index, record)}: image is a {type(record.image).__name__}, expected a PIL image or None"
        )
    try:
        return record.image.convert("RGB")
    except (OSError, ValueError) as error:
        raise ValueError(f"{_describe(index, record)}: the image cannot be decoded ({error})") from error


def render_conversation(record: CalibrationRecord, processor) -> str:
    """The record's conversation as text: ``[user: image + prompt, assistant: answer]`` and its follow-up turns in
    the processor's chat template, or the parts joined by blank lines when it has none (a base model)."""
    if getattr(processor, "chat_template", None) is None:
        return "\n\n".join([record.prompt, record.answer, *(part for turn in record.follow_ups for part in turn)])
    user_content = [{"type": "text", "text": record.prompt}]
    if record.image is not None:
        user_content.insert(0, {"type": "image"})
    messages = [
        {"role": "user", "content": user_content},
        {"role": "assistant", "content": [{"type": "text", "text": record.answer}]},
    ]
    for prompt, answer in record.follow_ups:
        messages.append({"role": "user", "content": [{"type": "text", "text": prompt}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(messages, tokenize=False)


def build_calibration_dataset(
    records: list[CalibrationRecord],
    processor,
    max_length: int = 512,
    mask_system_prompt: bool = False,
) -> Dataset:
    """Turn records into an oneshot calibration dataset, one unpadded conversation per row.

    Each record becomes ``[user: image + prompt, assistant: answer]``, then one user and one assistant turn per
    follow-up, rendered with the processor's chat template
    (which supplies the leading ``<|im_start|>``, so no other special tokens are added) and tokenized by the
    processor, which expands each image into its image tokens. ``processor`` may be a plain tokenizer when no
    record has an image (text-only models). A tokenizer without a chat template (a base model) gets the prompt
    and the answer (and the follow-ups' prompts and answers) joined by blank lines, with the tokenizer's own special tokens (e.g. its BOS).

    Columns of row i (``seq_i <= max_length``):
        input_ids, attention_mask: ``[seq_i]`` int.
        pixel_values: ``[num_images=1, 3, H, W]`` float32; pixel_attention_mask: ``[1, H, W]`` bool.
        loss_mask: ``[seq_i]`` float, 1.0 for real tokens and 0.0 for padding (rows are unpadded, so 0.0 appears
        only where the tokenizer marks padding). With ``mask_system_prompt=True`` it is also 0.0 for the
        chat-template tokens before the user's content, that is everything the template renders before the
        record's image (or prompt, for an image-less record): with the default model's ChatML template, the system
        turn and ``<|im_start|>user\n``.
    Image columns are present only if the records have images; records with and without images cannot be mixed,
    because every row must have the same columns.

    Raises:
        ValueError: no records; an invalid record or an undecodable image (naming the record); mixed image and
        image-less records; images with a processor that has no chat template; ``max_length`` would cut into
        image tokens.
    """
    if not records:
        raise ValueError("build_calibration_dataset got no records; pass at least one CalibrationRecord")
    images = [_checked_image(index, record) for index, record in enumerate(records)]
    if len({image is None for image in images}) > 1:
        raise ValueError(
            "Records with and without images cannot be mixed: every dataset row must have the same columns "
            "(the sequential pipeline traces the model with the first batch)"
        )
    tokenizer = getattr(processor, "tokenizer", processor)  # a processor, or a plain tokenizer for text models
    has_template = getattr(processor, "chat_template", None) is not None
    if not has_template and any(image is not None for image in images):
        raise ValueError("records with images need a processor with a chat template, which places the image")
    placeholder_ids = {tokenizer.convert_tokens_to_ids(token) for token in IMAGE_PLACEHOLDER_TOKENS}
    rows = []
    for index, (record, image) in enumerate(zip(records, images)):
        text = render_conversation(record, processor)
        image_inputs = {"images": [[image]]} if image is not None else {}  # a plain tokenizer takes no images
        encoding = processor(text=[text], add_special_tokens=not has_template, return_tensors="np", **image_inputs)
        input_ids = encoding["input_ids"][0]
        placeholder_positions = np.flatnonzero(np.isin(input_ids, list(placeholder_ids)))
        if len(input_ids) > max_length:
            if len(placeholder_positions) and placeholder_positions[-1] >= max_length:
                raise ValueError(
                    f"{_describe(index, record)}: max_length={max_length} would cut its image tokens "
                    f"(the last one is at position {placeholder_positions[-1]}); raise max_length"
                )
            input_ids = input_ids[:max_length]
        attention_mask = encoding["attention_mask"][0][: len(input_ids)]
        loss_mask = attention_mask.astype(np.float32)
        if mask_system_prompt:
            content_start = text.index("<image>" if image is not None else record.prompt)
            prefix_ids = tokenizer(text[:content_start], add_special_tokens=not has_template)["input_ids"]
            if list(input_ids[: len(prefix_ids)]) != list(prefix_ids):
                raise RuntimeError(f"{_describe(index, record)}: the template prefix does not tokenize separately")
            loss_mask[: len(prefix_ids)] = 0.0
        row = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
        if image is not None:
            row["pixel_values"] = encoding["pixel_values"][0].astype(np.float32)
            row["pixel_attention_mask"] = encoding["pixel_attention_mask"][0].astype(bool)
        rows.append(row)
    return Dataset.from_list(rows)


COLLATED_DTYPES = {
    "input_ids": torch.long,
    "attention_mask": torch.long,
    "loss_mask": torch.float32,
    "pixel_values": torch.float32,
    "pixel_attention_mask": torch.bool,
}


def batch_one_collator(batch: list[dict]) -> dict[str, torch.Tensor]:
    """Collate a single dataset row for oneshot with batch size 1, adding the batch dimension.

    ``input_ids``/``attention_mask``/``loss_mask`` ``[seq] -> [1, seq]``; Idefics3 ``pixel_values``
    ``[1, 3, H, W] -> [1, 1, 3, H, W]`` and ``pixel_attention_mask`` ``[1, H, W] -> [1, 1, H, W]``; LLaVA
    ``pixel_values`` ``[3, H, W] -> [1, 3, H, W]``. Qwen2-VL-style rows (with ``image_grid_thw``) store
    ``pixel_values`` ``[num_patches, C*T*P*P]`` and ``image_grid_thw`` ``[num_images, 3]`` already flattened over
    the batch; these two are passed on unchanged.
    """
    if len(batch) != 1:
        raise ValueError(f"batch_one_collator expects batch size 1, got {len(batch)} rows")
    (row,) = batch
    flattened_over_batch = {"pixel_values", "image_grid_thw"} if "image_grid_thw" in row else set()
    collated = {}
    for name, value in row.items():
        tensor = torch.as_tensor(np.asarray(value), dtype=COLLATED_DTYPES.get(name))
        collated[name] = tensor if name in flattened_over_batch else tensor.unsqueeze(0)
    return collated
