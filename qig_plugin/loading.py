"""Loading what calibrates a model, for any model ``qig`` and the examples take (light: no llm-compressor import)."""

from __future__ import annotations

from pathlib import Path


def auto_processor(model: str | Path, config: dict | None = None, *, trust_remote_code: bool = False):
    """What calibrates ``model`` (a local folder or a hub id): ``AutoProcessor``'s processor for a vision-language
    model, the tokenizer for a text-only LLM. An Idefics3 model (SmolVLM) gets ``qig_plugin.models.load_processor``'s,
    which needs no torchvision (``AutoProcessor`` does there). ``config``: the model's config.json, if read already.
    """
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    from qig_plugin.models import load_processor
    from qig_plugin.validation import HUB_FILE_PATTERNS, is_vision_language

    if config is None:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code).to_dict()
    if not is_vision_language(config):
        return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    if config.get("model_type") == "idefics3":
        if not Path(model).is_dir():  # a hub id: its folder in the Hugging Face cache
            from huggingface_hub import snapshot_download

            model = snapshot_download(str(model), allow_patterns=list(HUB_FILE_PATTERNS))
        return load_processor(Path(model))
    return AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
