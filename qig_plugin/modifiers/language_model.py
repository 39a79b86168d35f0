"""Scope llm-compressor's default smoothing mappings to a model's language model.

The stock AWQ and SmoothQuant mappings are regexes such as ``re:.*q_proj$``; in a VLM they
also match the vision tower (SigLIP has q/k/v_proj too), and mapping resolution fails with
"needs to match a single smooth layer". Prefixing every pattern with the language model's
module name keeps the vision tower out, for any VLM whose ``get_decoder()`` returns it.
"""

import re

import torch

__all__ = ["decoder_layers", "language_model_name", "scope_to_language_model"]


def language_model_name(model: torch.nn.Module) -> str:
    """Module name of the text decoder (``model.text_model`` in Idefics3, ``model`` in Llama)."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    names = {module: name for name, module in model.named_modules()}
    if decoder is None or decoder not in names:
        raise ValueError(
            f"could not find the language model of {type(model).__name__} (no get_decoder()); "
            "pass mappings scoped to it explicitly, e.g. 're:.*language_model.*q_proj$'"
        )
    return names[decoder]


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The language model's decoder layers and their name in ``model`` (e.g. ``model.text_model.layers``)."""
    name = language_model_name(model)
    layers = getattr(model.get_submodule(name), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"the language model of {type(model).__name__} ({name or 'the model itself'}) has no `layers` list; "
            "pass sequential_targets explicitly"
        )
    return f"{name}.layers" if name else "layers", layers


def scope_to_language_model(pattern: str, prefix: str) -> str:
    """``re:.*q_proj$`` -> ``re:model\\.text_model\\..*q_proj$``; class names and plain names stay."""
    if not pattern.startswith("re:") or not prefix:
        return pattern
    return "re:" + re.escape(prefix) + r"\." + pattern.removeprefix("re:")
