"""Tiny random vision-language models for fast tests, built offline from transformers configs.

Every builder saves the model and its tokenizer/processor to a folder under ``tmp_path`` (llm-compressor's
``oneshot`` needs ``config.name_or_path`` to be a saved directory), reloads the model from there and returns
``TinyModel(model, processor, dataset, sequential_target, ignore)``. Text models have hidden size 128 and
2 decoder layers, so group-64 and group-128 schemes divide every quantized ``Linear``. Datasets are meant for
``qig_plugin.data.batch_one_collator``:

    oneshot(model=tiny.model, processor=tiny.processor, dataset=tiny.dataset,
            recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=tiny.ignore),
            sequential_targets=[tiny.sequential_target], data_collator=batch_one_collator,
            num_calibration_samples=len(tiny.dataset))
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

from qig_plugin.data import build_calibration_dataset, shipped_records
from qig_plugin.models.default_model import (
    CHAT_TEMPLATE,
    END_OF_UTTERANCE_TOKEN,
    IDEFICS3_SPECIAL_TOKENS,
    build_processor,
)

TINY_VOCAB_SIZE = 512
TINY_TEXT = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    vocab_size=TINY_VOCAB_SIZE,
)
TINY_IDEFICS3_IMAGE_SIZE = 32
TINY_IDEFICS3_IMAGE_SEQ_LEN = 4  # (32 / 8)^2 patches / scale_factor 2^2
SYNTHETIC_IMAGE_TOKENS = 4
SYNTHETIC_SAMPLES = 8
IDEFICS3_SAMPLES = 6

IDEFICS3_IGNORE = ["re:.*lm_head", "re:model.vision_model.*", "re:model.connector.*"]
QWEN2_5_VL_IGNORE = ["lm_head", "re:visual.*", "re:model.visual.*"]
LLAVA_IGNORE = ["re:.*lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]


class TinyModel(NamedTuple):
    model: PreTrainedModel
    processor: object
    dataset: Dataset
    sequential_target: str
    ignore: list[str]


@functools.cache
def _training_sentences() -> list[str]:
    return [text for record in shipped_records("calibration")[:24] for text in (record.prompt, record.answer)]


def train_tiny_tokenizer(special_tokens: list[str], bos: str, eos: str, pad: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab ``TINY_VOCAB_SIZE``) trained on the shipped captions; encodes any text."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=["<unk>", *dict.fromkeys([bos, eos, pad, *special_tokens])],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_sentences(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token="<unk>",
        additional_special_tokens=special_tokens,
    )


def _save_and_reload(model: PreTrainedModel, processor, folder: Path) -> PreTrainedModel:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return type(model).from_pretrained(folder, dtype=torch.float32)


def tiny_idefics3(tmp_path: Path) -> TinyModel:
    """Idefics3 with a Llama text model (hidden 128, 2 layers, 4 heads, 2 KV heads) and a 32 px vision tower.

    The dataset holds ``IDEFICS3_SAMPLES`` shipped photo records built with ``build_calibration_dataset``; each
    image gives ``TINY_IDEFICS3_IMAGE_SEQ_LEN`` ``<image>`` tokens.
    """
    torch.manual_seed(0)
    tokenizer = train_tiny_tokenizer(
        IDEFICS3_SPECIAL_TOKENS, bos="<|im_start|>", eos=END_OF_UTTERANCE_TOKEN, pad="<|im_end|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    processor = build_processor(
        tokenizer, image_size=TINY_IDEFICS3_IMAGE_SIZE, image_seq_len=TINY_IDEFICS3_IMAGE_SEQ_LEN
    )
    config = Idefics3Config(
        text_config=dict(
            model_type="llama",
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **TINY_TEXT,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=TINY_IDEFICS3_IMAGE_SIZE,
            patch_size=8,
        ),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = _save_and_reload(Idefics3ForConditionalGeneration(config), processor, tmp_path / "tiny-idefics3")
    photo_records = shipped_records("calibration")[:IDEFICS3_SAMPLES]  # photo records come before passages
    dataset = build_calibration_dataset(photo_records, processor, max_length=256)
    return TinyModel(model, processor, dataset, "LlamaDecoderLayer", IDEFICS3_IGNORE)


def _synthetic_rows(tokenizer: PreTrainedTokenizerFast, image_ids: list[int], image_columns) -> list[dict]:
    """``SYNTHETIC_SAMPLES`` rows: ``text + image_ids + text`` token ids, all-ones masks, and ``image_columns(i)``."""
    sentences = _training_sentences()
    rows = []
    for index in range(SYNTHETIC_SAMPLES):
        before = tokenizer(sentences[2 * index], add_special_tokens=False)["input_ids"]
        after = tokenizer(sentences[2 * index + 1], add_special_tokens=False)["input_ids"]
        input_ids = before + image_ids + after
        rows.append(
            {
                "input_ids": input_ids,
                "attention_mask": [1] * len(input_ids),
                "loss_mask": [1.0] * len(input_ids),
                **image_columns(index),
            }
        )
    return rows


def tiny_qwen2_5_vl(tmp_path: Path) -> TinyModel:
    """Qwen2.5-VL (text hidden 128, 2 layers, mrope [8, 12, 12]; vision depth 2, patch 14, merge 2).

    Synthetic rows: ``<|vision_start|>`` + 4 ``<|image_pad|>`` + ``<|vision_end|>`` between two sentences,
    ``pixel_values`` ``[16, 1176]`` (a 1x4x4 grid of 2x14x14 RGB patches), ``image_grid_thw`` ``[[1, 4, 4]]``.
    """
    torch.manual_seed(0)
    special_tokens = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = train_tiny_tokenizer(special_tokens, bos="<|im_start|>", eos="<|im_end|>", pad="<|endoftext|>")
    token_id = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **{**TINY_TEXT, "num_attention_heads": 2},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
            out_hidden_size=128,
        ),
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    model = _save_and_reload(Qwen2_5_VLForConditionalGeneration(config), tokenizer, tmp_path / "tiny-qwen2_5_vl")
    image_pads = [token_id("<|image_pad|>")] * SYNTHETIC_IMAGE_TOKENS
    image_ids = [token_id("<|vision_start|>"), *image_pads, token_id("<|vision_end|>")]
    generator = torch.Generator().manual_seed(0)
    rows = _synthetic_rows(
        tokenizer,
        image_ids,
        lambda index: {
            "pixel_values": torch.randn(16, 3 * 2 * 14 * 14, generator=generator).numpy(),
            "image_grid_thw": [[1, 4, 4]],
        },
    )
    return TinyModel(model, tokenizer, Dataset.from_list(rows), "Qwen2_5_VLDecoderLayer", QWEN2_5_VL_IGNORE)


def tiny_llava(tmp_path: Path) -> TinyModel:
    """LLaVA: CLIP vision (28 px, patch 14: 4 image tokens) + Llama text (hidden 128, 2 layers, GQA 4/2).

    Synthetic rows: 4 ``<image>`` tokens between two sentences, ``pixel_values`` ``[3, 28, 28]``.
    """
    torch.manual_seed(0)
    tokenizer = train_tiny_tokenizer(["<image>"], bos="<s>", eos="</s>", pad="<pad>")
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            projection_dim=32,
        ),
        text_config=dict(
            model_type="llama",
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **TINY_TEXT,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = _save_and_reload(LlavaForConditionalGeneration(config), tokenizer, tmp_path / "tiny-llava")
    generator = torch.Generator().manual_seed(0)
    rows = _synthetic_rows(
        tokenizer,
        [tokenizer.convert_tokens_to_ids("<image>")] * SYNTHETIC_IMAGE_TOKENS,
        lambda index: {"pixel_values": torch.randn(3, 28, 28, generator=generator).numpy()},
    )
    return TinyModel(model, tokenizer, Dataset.from_list(rows), "LlamaDecoderLayer", LLAVA_IGNORE)
