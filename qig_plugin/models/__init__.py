"""Models used by the project: the offline-built default model."""

from qig_plugin.models.default_model import (
    DEFAULT_MODEL_DIR,
    IMAGE_SEQ_LEN,
    build_default_model,
    load_model,
    load_processor,
)

__all__ = ["DEFAULT_MODEL_DIR", "IMAGE_SEQ_LEN", "build_default_model", "load_model", "load_processor"]
