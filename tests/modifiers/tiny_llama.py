"""A tiny text-only Llama with a word-level tokenizer, for fast modifier tests."""

from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 256
SEQ = 24


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="w1")


def random_token_dataset(samples: int = 6, seq: int = SEQ, seed: int = 1) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (samples, seq), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def build_tiny_llama(path: Path) -> Path:
    """Save a 2-layer GQA Llama, hidden 128 (divisible by groups 64 and 128), and its tokenizer."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def load_tiny_llama(path: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)


def calibrate_tiny_llama(model_dir: Path, recipe, samples: int, **oneshot_kwargs) -> LlamaForCausalLM:
    """Load the tiny Llama from ``model_dir`` and run the real sequential ``oneshot`` on ``samples`` random rows."""
    from llmcompressor import oneshot

    model = load_tiny_llama(model_dir)
    oneshot(
        model=model,
        processor=tiny_tokenizer(),
        dataset=random_token_dataset(samples=samples),
        recipe=recipe,
        num_calibration_samples=samples,
        max_seq_length=SEQ,
        pipeline="sequential",
        **oneshot_kwargs,
    )
    return model
