"""A saved tiny text-only Llama folder that ``qig`` accepts as MODEL (weights, tokenizer with a chat template)."""

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qig_plugin.models.default_model import CHAT_TEMPLATE
from tests.tiny_models import TINY_TEXT, train_tiny_tokenizer


def build_tiny_text_folder(root: Path, *, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Save a 2-layer Llama (hidden 128, GQA 4/2) and its ChatML BPE tokenizer under ``root / "tiny-llama"``.

    ``chat_template=None`` saves a base model's tokenizer, without a chat template.
    """
    torch.manual_seed(0)
    tokenizer = train_tiny_tokenizer(["<|im_start|>", "<|im_end|>"], bos="<|im_start|>", eos="<|im_end|>", pad="<pad>")
    tokenizer.chat_template = chat_template
    config = LlamaConfig(
        **TINY_TEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    folder = root / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
