"""Registration of the QIG modifiers in llm-compressor's modifier factory.

llm-compressor has no entry-point discovery: a recipe can name a plugin modifier only after the
plugin registered it. ``import qig_plugin`` calls :func:`register_when_llmcompressor_loads`:
where llm-compressor is already imported the modifiers are registered at once; otherwise right
after llm-compressor's own import completes. So ``import qig_plugin`` (and ``qig --help``) stays
light, and every recipe parsed afterwards finds the QIG modifiers.

When llm-compressor's import completes inside the import of a ``qig_plugin`` module (whose names
may not exist yet), the registration waits for ``qig_plugin.modifiers``, which registers at the end
of its own import; every ``qig_plugin`` module that imports llm-compressor imports it.
"""

from __future__ import annotations

import importlib.util
import sys

LLMCOMPRESSOR = "llmcompressor"


def register_modifiers() -> None:
    """Register every QIG modifier under its class name (the name ``recipe.yaml`` records)."""
    from qig_plugin.modifiers import (
        MBQModifier,
        QIGAutoRoundModifier,
        QIGAWQModifier,
        QIGGPTQModifier,
        QIGSmoothQuantModifier,
    )
    from qig_plugin.upstream import register_modifier

    for modifier_class in (QIGGPTQModifier, QIGAWQModifier, QIGSmoothQuantModifier, MBQModifier, QIGAutoRoundModifier):
        register_modifier(modifier_class)


def _importing_plugin_modules() -> bool:
    """Whether a ``qig_plugin`` submodule is being imported right now (some of its names may not exist yet)."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if name.startswith("qig_plugin.")
    )


def _register_unless_importing_plugin_modules(_llmcompressor) -> None:
    if not _importing_plugin_modules():
        register_modifiers()


def register_when_llmcompressor_loads() -> None:
    """Register now if llm-compressor is imported, later when it is; nothing where it is not installed."""
    if LLMCOMPRESSOR in sys.modules:
        register_modifiers()
    elif importlib.util.find_spec(LLMCOMPRESSOR) is not None:
        from qig_plugin_recipe_hint import RunAfterImport  # installed beside the package (see pyproject.toml)

        sys.meta_path.insert(0, RunAfterImport(LLMCOMPRESSOR, _register_unless_importing_plugin_modules))
