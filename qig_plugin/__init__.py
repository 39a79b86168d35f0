"""QIG (Quantization-aware Integrated Gradients) for llm-compressor.

Importing ``qig_plugin`` registers its modifiers in llm-compressor's ``ModifierFactory``, so
recipes can name them. In an environment without llm-compressor (the vLLM serve
environment) the package imports without registering anything.
"""

import importlib.util

__version__ = "0.1.0"

if importlib.util.find_spec("llmcompressor") is not None:
    from qig_plugin.registry import register_modifiers

    register_modifiers()
