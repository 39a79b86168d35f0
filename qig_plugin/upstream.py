"""Every use qig-plugin makes of llm-compressor's and compressed-tensors' internals, in one place.

The plugin rests on private parts of llm-compressor 0.14 (the modifier factory's tables, AWQ's
grid search and caches, SmoothQuant's smoothing, the hooks' global switch, the experts' token
order). Nothing else in the package names them: the modifiers subclass the seam classes here and
override their public, documented methods. Importing this module checks the installed versions
and fails with one line naming the supported ones; ``tests/test_upstream.py`` fails by name when
an internal changes shape.
"""

from __future__ import annotations

import difflib
from importlib.metadata import PackageNotFoundError, version

from qig_plugin import __version__

# distribution -> the release series this plugin is written against
SUPPORTED_SERIES = {"llmcompressor": "0.14", "compressed-tensors": "0.19"}


def check_versions() -> None:
    """Raise ``ImportError`` unless the installed llm-compressor and compressed-tensors are the supported series."""
    for distribution, series in SUPPORTED_SERIES.items():
        try:
            found = version(distribution)
        except PackageNotFoundError:
            found = "not installed"
        if found != series and not found.startswith(f"{series}."):
            raise ImportError(
                f"qig-plugin {__version__} supports {distribution} {series}.x; found {found}. Install the "
                f"quantize environment's pins (`pip install 'qig-plugin[quantize]'`, which takes llmcompressor==0.14.0.1 "
                f"and compressed-tensors 0.19)"
            )


check_versions()

from llmcompressor.modifiers.factory import ModifierFactory  # noqa: E402

__all__ = [
    "SUPPORTED_SERIES",
    "check_versions",
    "close_modifier_name",
    "modifier_class",
    "register_modifier",
]


def register_modifier(modifier_class_: type) -> None:
    """Make recipes able to name ``modifier_class_`` by its class name.

    Also drops the "add `import qig_plugin`" error :mod:`qig_plugin_recipe_hint` may have placed in the
    factory's table of known-but-unavailable modifiers under that name.
    """
    ModifierFactory._errors.pop(modifier_class_.__name__, None)
    ModifierFactory.register(modifier_class_.__name__, modifier_class_)


def modifier_class(name: str) -> type | None:
    """The modifier class a recipe reaches under ``name`` (registered plugins first, then llm-compressor's own)."""
    if not ModifierFactory._loaded:
        ModifierFactory.refresh()
    return (
        ModifierFactory._registered_registry.get(name)
        or ModifierFactory._experimental_registry.get(name)
        or ModifierFactory._main_registry.get(name)
    )


def close_modifier_name(name: str) -> str | None:
    """The known modifier name closest to a misspelt ``name`` (e.g. ``QIGGPTQModifer`` -> ``QIGGPTQModifier``)."""
    if not ModifierFactory._loaded:
        ModifierFactory.refresh()
    known = [
        *ModifierFactory._registered_registry,
        *ModifierFactory._experimental_registry,
        *ModifierFactory._main_registry,
    ]
    matches = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return matches[0] if matches else None
