"""Startup hook of qig-plugin (run from ``qig_plugin_recipe_hint.pth``): recipes that name a QIG modifier
before ``import qig_plugin`` fail with a message that says so.

llm-compressor finds plugin modifiers only after the plugin registers them. Once
``llmcompressor.modifiers.factory`` is imported, each QIG modifier name is put into the
factory's own table of known-but-unavailable modifiers, whose error ``ModifierFactory.create``
raises; ``import qig_plugin`` registers the real classes and clears those entries. Nothing
heavier than this module is imported at interpreter start.
"""

import importlib.abc
import importlib.machinery
import sys

FACTORY_MODULE = "llmcompressor.modifiers.factory"
QIG_MODIFIER_NAMES = ("QIGGPTQModifier", "QIGAWQModifier", "QIGSmoothQuantModifier", "MBQModifier")


def missing_plugin_error(name: str) -> ValueError:
    return ValueError(
        f"{name} is a qig-plugin modifier and is not registered: add `import qig_plugin` "
        "before creating the recipe or calling oneshot"
    )


def add_missing_plugin_errors(factory_class) -> None:
    for name in QIG_MODIFIER_NAMES:
        if name not in factory_class._registered_registry:
            factory_class._errors[name] = missing_plugin_error(name)


class RunAfterImport(importlib.abc.MetaPathFinder):
    """A one-shot import hook: runs ``callback(module)`` right after the module ``fullname`` has executed.

    Installed with ``sys.meta_path.insert(0, RunAfterImport(name, callback))``; it removes itself when
    the module is first imported. Also used by ``qig_plugin.registry``.
    """

    def __init__(self, fullname: str, callback):
        self.fullname = fullname
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.fullname:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_callback(module):
            exec_module(module)
            self.callback(module)

        spec.loader.exec_module = exec_then_callback
        return spec


if FACTORY_MODULE in sys.modules:
    add_missing_plugin_errors(sys.modules[FACTORY_MODULE].ModifierFactory)
else:
    sys.meta_path.insert(
        0, RunAfterImport(FACTORY_MODULE, lambda module: add_missing_plugin_errors(module.ModifierFactory))
    )
