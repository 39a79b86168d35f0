"""Registration of the QIG modifiers in llm-compressor's ``ModifierFactory``.

llm-compressor has no entry-point discovery: a recipe can name a plugin modifier only
after the plugin is imported. ``register_modifiers`` runs on ``import qig_plugin`` and
clears the "add `import qig_plugin`" errors that :mod:`qig_plugin_recipe_hint` placed.
"""

from llmcompressor.modifiers.factory import ModifierFactory

from qig_plugin.modifiers import MBQModifier, QIGAWQModifier, QIGGPTQModifier, QIGSmoothQuantModifier

PLUGIN_MODIFIERS = (QIGGPTQModifier, QIGAWQModifier, QIGSmoothQuantModifier, MBQModifier)


def register_modifiers() -> None:
    """Register every QIG modifier under its class name (the name ``recipe.yaml`` records)."""
    for modifier_class in PLUGIN_MODIFIERS:
        ModifierFactory._errors.pop(modifier_class.__name__, None)
        ModifierFactory.register(modifier_class.__name__, modifier_class)
