"""Shared fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model folder, built once (about a minute) into ``DEFAULT_MODEL_DIR`` if it is not there yet."""
    from qig_plugin.models import build_default_model

    return build_default_model()
