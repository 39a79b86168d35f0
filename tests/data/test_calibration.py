"""Calibration records, dataset building, the batch-1 collator, and the tiny test models."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np
import pydoc_data.topics
import pytest
import torch
from PIL import Image

from qig_plugin.data import CalibrationRecord, batch_one_collator, build_calibration_dataset, shipped_records
from qig_plugin.models.default_model import DEFAULT_SYSTEM_PROMPT
from tests.tiny_models import TINY_IDEFICS3_IMAGE_SEQ_LEN, TINY_VOCAB_SIZE, tiny_idefics3, tiny_llava, tiny_qwen2_5_vl

TEMPLATE_PREFIX = f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"


@pytest.fixture(scope="module")
def splits() -> dict[str, list[CalibrationRecord]]:
    return {split: shipped_records(split) for split in ("calibration", "heldout")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_idefics3(tmp_path_factory.mktemp("tiny_idefics3"))


def _image_hash(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def _passage(prompt: str) -> str | None:
    match = re.search(r"Python documentation\.\n\n(.*?)(\n\nContinue the text\.)?$", prompt, re.DOTALL)
    return match.group(1) if match else None


def test_shipped_splits_are_large_enough_and_all_have_rgb_images(splits):
    assert len(splits["calibration"]) >= 32
    assert len(splits["heldout"]) >= 16
    for record in splits["calibration"] + splits["heldout"]:
        assert record.image.mode == "RGB"
        assert record.prompt.strip() and record.answer.strip()


def test_no_photo_or_passage_is_in_both_splits(splits):
    photos = {split: {_image_hash(record.image) for record in records} for split, records in splits.items()}
    passages = {split: {_passage(record.prompt) for record in records} - {None} for split, records in splits.items()}
    assert len(photos["calibration"]) >= 10 and len(photos["heldout"]) >= 4
    assert len(passages["calibration"]) >= 4 and len(passages["heldout"]) >= 2
    assert not photos["calibration"] & photos["heldout"]
    assert not passages["calibration"] & passages["heldout"]


def test_passages_and_continuations_are_real_documentation_text(splits):
    documentation = re.sub(r"\s+", " ", " ".join(pydoc_data.topics.topics.values()))
    continuations = 0
    for record in splits["calibration"] + splits["heldout"]:
        passage = _passage(record.prompt)
        if passage is None:
            continue
        assert re.sub(r"\s+", " ", passage) in documentation
        if record.prompt.endswith("Continue the text."):
            assert re.sub(r"\s+", " ", passage + " " + record.answer) in documentation
            continuations += 1
    assert continuations >= 4


def test_shipped_records_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        shipped_records("train")


def test_dataset_columns_and_shapes(tiny):
    assert set(tiny.dataset.column_names) == {
        "input_ids",
        "attention_mask",
        "pixel_values",
        "pixel_attention_mask",
        "loss_mask",
    }
    for row in tiny.dataset:
        assert len(row["input_ids"]) == len(row["attention_mask"]) == len(row["loss_mask"])
        assert np.asarray(row["pixel_values"]).shape == (1, 3, 32, 32)
        assert np.asarray(row["pixel_attention_mask"]).shape == (1, 32, 32)


def test_each_image_gives_image_seq_len_image_tokens(tiny):
    tokenizer = tiny.processor.tokenizer
    image_id, fake_id, global_id = tokenizer.convert_tokens_to_ids(
        ["<image>", "<fake_token_around_image>", "<global-img>"]
    )
    assert image_id == tiny.model.config.image_token_id
    for row in tiny.dataset:
        input_ids = row["input_ids"]
        assert input_ids.count(image_id) == TINY_IDEFICS3_IMAGE_SEQ_LEN
        assert input_ids.count(fake_id) == 2 and input_ids.count(global_id) == 1


def test_rows_are_the_chat_template_with_the_answer_as_assistant_turn(tiny):
    records = shipped_records("calibration")[:2]
    dataset = build_calibration_dataset(records, tiny.processor)
    for record, row in zip(records, dataset):
        text = tiny.processor.tokenizer.decode(row["input_ids"])
        assert text.startswith(f"{TEMPLATE_PREFIX}<fake_token_around_image><global-img><image>")
        assert text.endswith(f"{record.prompt}<|im_end|>\n<|im_start|>assistant\n{record.answer}<|im_end|>\n")


def test_loss_mask_is_one_for_every_real_token_by_default(tiny):
    for row in tiny.dataset:
        assert row["loss_mask"] == [1.0] * len(row["input_ids"])


def test_mask_system_prompt_zeroes_exactly_the_template_tokens_before_the_user_content(tiny):
    records = shipped_records("calibration")[:3]
    masked = build_calibration_dataset(records, tiny.processor, mask_system_prompt=True)
    for row in masked:
        loss_mask = np.asarray(row["loss_mask"])
        masked_count = int((loss_mask == 0).sum())
        assert masked_count > 0 and (loss_mask[:masked_count] == 0).all() and (loss_mask[masked_count:] == 1).all()
        assert tiny.processor.tokenizer.decode(row["input_ids"][:masked_count]) == TEMPLATE_PREFIX
        assert row["input_ids"][masked_count] == tiny.processor.tokenizer.convert_tokens_to_ids(
            "<fake_token_around_image>"
        )


def test_truncation_cuts_the_answer_but_never_image_tokens(tiny):
    record = shipped_records("calibration")[2]
    full_length = len(build_calibration_dataset([record], tiny.processor)[0]["input_ids"])
    prefix_length = len(tiny.processor.tokenizer(TEMPLATE_PREFIX, add_special_tokens=False)["input_ids"])
    image_end = prefix_length + 2 + TINY_IDEFICS3_IMAGE_SEQ_LEN + 1  # template prefix, fake, global, images, fake
    truncated = build_calibration_dataset([record], tiny.processor, max_length=image_end + 5)[0]
    assert full_length > image_end + 5
    assert len(truncated["input_ids"]) == len(truncated["loss_mask"]) == image_end + 5
    with pytest.raises(ValueError, match=r"record 0 .*max_length=8 would cut its image tokens"):
        build_calibration_dataset([record], tiny.processor, max_length=8)


def test_empty_records_raise(tiny):
    with pytest.raises(ValueError, match="no records"):
        build_calibration_dataset([], tiny.processor)


def test_undecodable_image_raises_naming_the_record(tiny):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    broken = Image.open(io.BytesIO(buffer.getvalue()[:60]))  # lazily opened, pixel data cut off
    records = [shipped_records("calibration")[0], CalibrationRecord(broken, "Describe the picture.", "Red.")]
    with pytest.raises(ValueError, match=r"record 1 \(prompt 'Describe the picture.'\).*cannot be decoded"):
        build_calibration_dataset(records, tiny.processor)


def test_invalid_records_raise_naming_the_record(tiny):
    image = Image.new("RGB", (8, 8))
    with pytest.raises(TypeError, match="record 0 .*expected a CalibrationRecord"):
        build_calibration_dataset([{"image": image, "prompt": "p", "answer": "a"}], tiny.processor)
    with pytest.raises(TypeError, match="record 0 .*image is a ndarray"):
        build_calibration_dataset([CalibrationRecord(np.zeros((8, 8, 3)), "p", "a")], tiny.processor)
    with pytest.raises(ValueError, match="record 1 .*empty or non-string prompt"):
        build_calibration_dataset(
            [CalibrationRecord(image, "p", "a"), CalibrationRecord(image, " ", "a")], tiny.processor
        )
    with pytest.raises(ValueError, match="cannot be mixed"):
        build_calibration_dataset(
            [CalibrationRecord(image, "p", "a"), CalibrationRecord(None, "p", "a")], tiny.processor
        )


def test_text_only_records_give_text_columns(tiny):
    dataset = build_calibration_dataset([CalibrationRecord(None, "Say hi.", "Hi.")], tiny.processor)
    assert set(dataset.column_names) == {"input_ids", "attention_mask", "loss_mask"}


def test_a_plain_tokenizer_renders_text_records_like_the_processor(tiny):
    records = [CalibrationRecord(None, "Say hi.", "Hi.")]
    from_processor = build_calibration_dataset(records, tiny.processor, mask_system_prompt=True)
    from_tokenizer = build_calibration_dataset(records, tiny.processor.tokenizer, mask_system_prompt=True)
    assert from_tokenizer.column_names == from_processor.column_names
    assert from_tokenizer[0] == from_processor[0]


def test_collator_keeps_the_batch_dimension(tiny):
    batch = batch_one_collator([tiny.dataset[0]])
    seq = len(tiny.dataset[0]["input_ids"])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["loss_mask"].shape == (1, seq)
    assert batch["pixel_values"].shape == (1, 1, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_attention_mask"].shape == (1, 1, 32, 32) and batch["pixel_attention_mask"].dtype == torch.bool
    assert batch["loss_mask"].dtype == torch.float32 and batch["input_ids"].dtype == torch.long
    with pytest.raises(ValueError, match="batch size 1"):
        batch_one_collator([tiny.dataset[0], tiny.dataset[1]])


@pytest.mark.parametrize("builder", [tiny_idefics3, tiny_qwen2_5_vl, tiny_llava])
def test_tiny_models_forward_and_quantize_with_stock_gptq(builder, tmp_path):
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    model, processor, dataset, sequential_target, ignore = builder(tmp_path)
    assert Path(model.config.name_or_path).parent == tmp_path  # oneshot needs a saved folder
    batch = batch_one_collator([dataset[0]])
    with torch.no_grad():
        logits = model(**{name: value for name, value in batch.items() if name != "loss_mask"}).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], TINY_VOCAB_SIZE)
    assert torch.isfinite(logits).all()
    oneshot(
        model=model,
        processor=processor,
        dataset=dataset,
        recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=ignore),
        sequential_targets=[sequential_target],
        data_collator=batch_one_collator,
        num_calibration_samples=len(dataset),
    )
    quantized = [name for name, module in model.named_modules() if hasattr(module, "weight_scale")]
    text_layer_linear = re.compile(r"(language|text)_model\.layers\.\d+\.(self_attn|mlp)\.")
    assert len(quantized) == 2 * 7 and all(text_layer_linear.search(name) for name in quantized)
