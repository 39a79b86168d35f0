"""Models used by the project: the offline-built default model and its text-only language model."""

from qig_plugin.models.default_model import (
    DEFAULT_MODEL_DIR,
    IMAGE_SEQ_LEN,
    TEXT_MODEL_DIR,
    build_default_model,
    build_text_model,
    load_model,
    load_processor,
)

__all__ = [
    "DEFAULT_MODEL_DIR",
    "IMAGE_SEQ_LEN",
    "TEXT_MODEL_DIR",
    "build_default_model",
    "build_text_model",
    "load_model",
    "load_processor",
]
