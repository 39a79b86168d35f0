"""Shared fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model folder, built once (about a minute) into ``DEFAULT_MODEL_DIR`` if it is not there yet."""
    from qig_plugin.models import build_default_model

    return build_default_model()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A saved 2-layer text-only Llama (hidden 128) with a word-level tokenizer."""
    from tests.modifiers.tiny_llama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
