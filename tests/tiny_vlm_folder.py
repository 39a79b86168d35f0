"""A saved tiny Idefics3 folder that ``qig`` accepts as MODEL (weights, tokenizer, image processor)."""

from pathlib import Path

from tests.tiny_models import tiny_idefics3


def build_tiny_vlm_folder(root: Path) -> Path:
    """Save the tiny Idefics3 of ``tests.tiny_models`` (hidden 128, 2 layers, 4 image tokens) under ``root``."""
    tiny = tiny_idefics3(root)
    folder = root / "tiny-idefics3"
    tiny.processor.image_processor.save_pretrained(folder)  # preprocessor_config.json, as the default model has
    return folder
