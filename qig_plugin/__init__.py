"""QIG (Quantization-aware Integrated Gradients) for llm-compressor.

``import qig_plugin`` registers its modifiers in llm-compressor's modifier factory, so recipes can
name them: at once when llm-compressor is already imported, else as soon as it is (the import
itself stays light: ``qig --help`` loads neither torch nor llm-compressor). In an environment
without llm-compressor (the vLLM serve environment) nothing is registered.
"""

__version__ = "0.1.0"

from qig_plugin.registry import register_when_llmcompressor_loads  # noqa: E402

register_when_llmcompressor_loads()
