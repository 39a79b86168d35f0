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


# ---------------------------------------------------------------------------------------------------------------
# Coverage families: every builder below returns synthetic rows (text + image placeholder tokens + text) whose
# image-token count is measured from the model's own ``get_image_features``, so no processor (and no torchvision)
# is needed. Ignore lists and sequential targets follow llm-compressor's examples for each family.
# ---------------------------------------------------------------------------------------------------------------

COVERAGE_SAMPLES = 2
TEXT_ONLY_IGNORE = ["lm_head"]
MOE_IGNORE = ["lm_head", "re:.*mlp.gate$"]  # the router is not a quantization target in llm-compressor's examples
QWEN_VL_IGNORE = ["re:.*lm_head", "re:.*visual.*"]
VISION_TOWER_IGNORE = ["re:.*lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]
TINY_MOE_TEXT = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1)


def _special_tokens_ids(tokenizer: PreTrainedTokenizerFast, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(token) for token in tokens]


def _count_image_features(model: PreTrainedModel, pixel_inputs: dict[str, torch.Tensor]) -> int:
    """How many placeholder tokens one image fills: rows of ``get_image_features`` over the text hidden size."""
    with torch.no_grad():
        features = model.get_image_features(**pixel_inputs)
    features = getattr(features, "pooler_output", features)
    tensors = [features] if isinstance(features, torch.Tensor) else list(features)
    hidden = model.config.get_text_config().hidden_size
    return sum(t.numel() for t in tensors) // hidden


def _coverage_rows(
    tokenizer: PreTrainedTokenizerFast,
    image_ids: list[int],
    pixel_inputs: dict[str, torch.Tensor],
    samples: int = COVERAGE_SAMPLES,
) -> Dataset:
    """``samples`` rows ``sentence + image_ids + sentence``, each with its own random pixels.

    :param pixel_inputs: one image's model inputs as ``get_image_features`` takes them (batch dimension
        included); rows store them without it (``batch_one_collator`` adds it back), except Qwen-VL-style
        inputs with ``image_grid_thw``, which are flattened over the batch and stored as they are. Qwen-VL rows
        also get ``mm_token_type_ids`` (1 on image tokens), which their M-RoPE needs.
    """
    generator = torch.Generator().manual_seed(0)
    flattened_over_batch = "image_grid_thw" in pixel_inputs

    def image_columns(_index: int) -> dict:
        columns = {}
        for name, value in pixel_inputs.items():
            value = value if flattened_over_batch else value[0]
            columns[name] = (torch.randn(value.shape, generator=generator) if value.is_floating_point() else value).numpy()
        return columns

    rows = _synthetic_rows(tokenizer, image_ids, image_columns)[:samples]
    if flattened_over_batch:
        image_token = image_ids[1]  # <|vision_start|>, then the image pads
        for row in rows:
            row["mm_token_type_ids"] = [int(token == image_token) for token in row["input_ids"]]
    return Dataset.from_list(rows)


def _text_config(tokenizer: PreTrainedTokenizerFast, model_type: str | None = None, **overrides) -> dict:
    ids = dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    return {**({"model_type": model_type} if model_type else {}), **ids, **TINY_TEXT, **overrides}


def tiny_text_llm(tmp_path: Path, family: str) -> TinyModel:
    """A text-only LLM (``llama``, ``qwen2``, ``qwen3`` or ``qwen3_moe``), hidden 128, 2 layers, GQA 4/2.

    ``qwen3_moe``: 4 experts, top-2, expert width 64, every layer sparse. Rows are two sentences, no image.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    tokenizer = train_tiny_tokenizer([], bos="<s>", eos="</s>", pad="<pad>")
    overrides = TINY_MOE_TEXT if family == "qwen3_moe" else {}
    config = AutoConfig.for_model(family, **_text_config(tokenizer, **overrides))
    model = _save_and_reload(AutoModelForCausalLM.from_config(config), tokenizer, tmp_path / f"tiny-{family}")
    rows = _synthetic_rows(tokenizer, [], lambda index: {})[:COVERAGE_SAMPLES]
    layer_class = type(model.model.layers[0]).__name__
    return TinyModel(model, tokenizer, Dataset.from_list(rows), layer_class, MOE_IGNORE if overrides else TEXT_ONLY_IGNORE)


def tiny_qwen2_vl(tmp_path: Path) -> TinyModel:
    """Qwen2-VL (text hidden 128, 2 layers, mrope [8, 12, 12]; vision depth 2, patch 14, merge 2): 4 image tokens."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    special = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = train_tiny_tokenizer(special, bos="<|im_start|>", eos="<|im_end|>", pad="<|endoftext|>")
    start, end, image, video = _special_tokens_ids(tokenizer, *special)
    config = Qwen2VLConfig(
        text_config=_text_config(
            tokenizer,
            num_attention_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
        ),
        vision_config=dict(
            depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
    )
    model = _save_and_reload(Qwen2VLForConditionalGeneration(config), tokenizer, tmp_path / "tiny-qwen2_vl")
    pixels = {"pixel_values": torch.zeros(16, 3 * 2 * 14 * 14), "image_grid_thw": torch.tensor([[1, 4, 4]])}
    count = _count_image_features(model, pixels)
    dataset = _coverage_rows(tokenizer, [start, *[image] * count, end], pixels)
    return TinyModel(model, tokenizer, dataset, "Qwen2VLDecoderLayer", QWEN2_5_VL_IGNORE)


def tiny_qwen3_vl(tmp_path: Path, moe: bool = False) -> TinyModel:
    """Qwen3-VL (or its MoE variant): text hidden 128, 2 layers, interleaved mrope [4, 6, 6]; vision depth 2,
    patch 16, merge 2, DeepStack features from vision layer 0 injected after text layer 0. 4 image tokens.
    MoE: 4 experts, top-2, expert width 64.
    """
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
    )

    torch.manual_seed(0)
    special = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = train_tiny_tokenizer(special, bos="<|im_start|>", eos="<|im_end|>", pad="<|endoftext|>")
    start, end, image, video = _special_tokens_ids(tokenizer, *special)
    config_class, model_class = (
        (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe else (Qwen3VLConfig, Qwen3VLForConditionalGeneration)
    )
    text = _text_config(
        tokenizer,
        head_dim=32,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6], "mrope_interleaved": True},
        **(TINY_MOE_TEXT if moe else {}),
    )
    config = config_class(
        text_config=text,
        vision_config=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16, spatial_merge_size=2,
            temporal_patch_size=2, out_hidden_size=128, num_position_embeddings=64, deepstack_visual_indexes=[0],
        ),
        image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
    )
    name = "tiny-qwen3_vl_moe" if moe else "tiny-qwen3_vl"
    model = _save_and_reload(model_class(config), tokenizer, tmp_path / name)
    pixels = {"pixel_values": torch.zeros(16, 3 * 2 * 16 * 16), "image_grid_thw": torch.tensor([[1, 4, 4]])}
    count = _count_image_features(model, pixels)
    dataset = _coverage_rows(tokenizer, [start, *[image] * count, end], pixels)
    layer_class = "Qwen3VLMoeTextDecoderLayer" if moe else "Qwen3VLTextDecoderLayer"
    return TinyModel(model, tokenizer, dataset, layer_class, QWEN_VL_IGNORE + (["re:.*mlp.gate$"] if moe else []))


def tiny_llava_onevision(tmp_path: Path) -> TinyModel:
    """LLaVA-OneVision: SigLIP vision (28 px, patch 14) + Qwen2 text (hidden 128, 2 layers).

    One 28x28 image in the single-tile grid ``[[28, 28]]``: base features plus the tiled features and
    their ``image_newline`` tokens, counted from ``get_image_features``.
    """
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(0)
    tokenizer = train_tiny_tokenizer(["<image>", "<video>"], bos="<|im_start|>", eos="<|im_end|>", pad="<|endoftext|>")
    image, video = _special_tokens_ids(tokenizer, "<image>", "<video>")
    config = LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=28, patch_size=14,
        ),
        text_config=_text_config(tokenizer, "qwen2"),
        image_token_index=image,
        video_token_index=video,
        image_grid_pinpoints=[[28, 28]],
        vision_aspect_ratio="anyres_max_1",
    )
    model = _save_and_reload(LlavaOnevisionForConditionalGeneration(config), tokenizer, tmp_path / "tiny-llava_ov")
    # [images, tiles (base + 1 grid tile), 3, 28, 28]
    pixels = {"pixel_values": torch.zeros(1, 2, 3, 28, 28), "image_sizes": torch.tensor([[28, 28]])}
    count = _count_image_features(model, pixels)
    dataset = _coverage_rows(tokenizer, [image] * count, pixels)
    return TinyModel(model, tokenizer, dataset, "Qwen2DecoderLayer", VISION_TOWER_IGNORE)


def tiny_gemma3(tmp_path: Path) -> TinyModel:
    """Gemma 3: SigLIP vision (28 px, patch 14, 4 image tokens) + Gemma 3 text (hidden 128, 2 layers: one
    sliding-window and one global attention layer, q/k norms, pre/post feed-forward norms).
    """
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    special = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    tokenizer = train_tiny_tokenizer(special, bos="<bos>", eos="<eos>", pad="<pad>")
    start, end, image = _special_tokens_ids(tokenizer, *special)
    config = Gemma3Config(
        text_config=_text_config(
            tokenizer, head_dim=32, sliding_window=16, layer_types=["sliding_attention", "full_attention"]
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
            patch_size=14,
        ),
        mm_tokens_per_image=4,
        boi_token_index=start,
        eoi_token_index=end,
        image_token_index=image,
    )
    model = _save_and_reload(Gemma3ForConditionalGeneration(config), tokenizer, tmp_path / "tiny-gemma3")
    pixels = {"pixel_values": torch.zeros(1, 3, 28, 28)}
    count = _count_image_features(model, pixels)
    dataset = _coverage_rows(tokenizer, [start, *[image] * count, end], pixels)
    ignore = ["lm_head", r"re:model\.vision_tower.*", r"re:model\.multi_modal_projector.*"]
    return TinyModel(model, tokenizer, dataset, "Gemma3DecoderLayer", ignore)


def tiny_internvl(tmp_path: Path) -> TinyModel:
    """InternVL3 (``-hf`` layout): InternViT (28 px, patch 14, pixel shuffle 0.5: 1 token) + Qwen2 text."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(0)
    special = ["<img>", "</img>", "<IMG_CONTEXT>"]
    tokenizer = train_tiny_tokenizer(special, bos="<|im_start|>", eos="<|im_end|>", pad="<|endoftext|>")
    start, end, image = _special_tokens_ids(tokenizer, *special)
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=[56, 56],
            patch_size=[14, 14],
        ),
        text_config=_text_config(tokenizer, "qwen2"),
        image_token_id=image,
        image_seq_length=4,
        downsample_ratio=0.5,
    )
    model = _save_and_reload(InternVLForConditionalGeneration(config), tokenizer, tmp_path / "tiny-internvl")
    pixels = {"pixel_values": torch.zeros(1, 3, 56, 56)}
    count = _count_image_features(model, pixels)
    dataset = _coverage_rows(tokenizer, [start, *[image] * count, end], pixels)
    return TinyModel(model, tokenizer, dataset, "Qwen2DecoderLayer", VISION_TOWER_IGNORE)


def tiny_mistral3(tmp_path: Path) -> TinyModel:
    """Mistral3: Pixtral vision (56 px, patch 14, spatial merge 2: 4 image tokens) + Mistral text."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    special = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    tokenizer = train_tiny_tokenizer(special, bos="<s>", eos="</s>", pad="<pad>")
    image, _, end = _special_tokens_ids(tokenizer, *special)
    config = Mistral3Config(
        vision_config=dict(
            model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=56, patch_size=14, head_dim=16,
        ),
        text_config=_text_config(tokenizer, "mistral", head_dim=32),
        image_token_index=image,
        spatial_merge_size=2,
    )
    model = _save_and_reload(Mistral3ForConditionalGeneration(config), tokenizer, tmp_path / "tiny-mistral3")
    pixels = {"pixel_values": torch.zeros(1, 3, 56, 56), "image_sizes": torch.tensor([[56, 56]])}
    count = _count_image_features(model, pixels)
    dataset = _coverage_rows(tokenizer, [*[image] * count, end], pixels)
    return TinyModel(model, tokenizer, dataset, "MistralDecoderLayer", VISION_TOWER_IGNORE)
