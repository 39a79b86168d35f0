"""Every QIG modifier end to end on a tiny model of every covered family (the README's model coverage matrix).

Each case builds the family's tiny random model from its transformers config (``tests/tiny_models.py``), runs
``quantize_to_checkpoint`` (llm-compressor's ``oneshot``, sequential pipeline over the text decoder layers) with
one recipe, and checks that QIG token weights were computed and used, and that exactly the text decoder's linears
were quantized.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import qig_plugin  # noqa: F401  (registers the modifiers)
from qig_plugin.modifiers import MBQModifier, QIGAWQModifier, QIGGPTQModifier, QIGSmoothQuantModifier
from qig_plugin.modifiers.language_model import decoder_layers
from qig_plugin.quantize import decoder_layer_class, quantize_to_checkpoint
from tests import tiny_models

FAMILIES = {
    "llama": lambda path: tiny_models.tiny_text_llm(path, "llama"),
    "qwen2": lambda path: tiny_models.tiny_text_llm(path, "qwen2"),
    "qwen3": lambda path: tiny_models.tiny_text_llm(path, "qwen3"),
    "qwen3_moe": lambda path: tiny_models.tiny_text_llm(path, "qwen3_moe"),
    "qwen2_vl": tiny_models.tiny_qwen2_vl,
    "qwen2_5_vl": tiny_models.tiny_qwen2_5_vl,
    "qwen3_vl": tiny_models.tiny_qwen3_vl,
    "qwen3_vl_moe": lambda path: tiny_models.tiny_qwen3_vl(path, moe=True),
    "llava": tiny_models.tiny_llava,
    "llava_onevision": tiny_models.tiny_llava_onevision,
    "smolvlm": tiny_models.tiny_idefics3,
    "gemma3": tiny_models.tiny_gemma3,
    "internvl3": tiny_models.tiny_internvl,
    "mistral3": tiny_models.tiny_mistral3,
}
TEXT_ONLY = {"llama", "qwen2", "qwen3", "qwen3_moe"}
MOE = {"qwen3_moe", "qwen3_vl_moe"}

W4_SYM_G64 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
W3_ASYM_G64 = {"num_bits": 3, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64}


def _weight_scheme(ignore: list[str], weights: dict) -> dict:
    return {"ignore": ignore, "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}


# modifier -> its stage's modifiers (name -> fields) for a family's ignore list; cheap settings (2 nodes)
STAGES = {
    QIGGPTQModifier: lambda ignore: {"QIGGPTQModifier": {"qig_steps": 2, **_weight_scheme(ignore, W4_SYM_G64)}},
    QIGAWQModifier: lambda ignore: {
        "QIGAWQModifier": {"qig_steps": 2},
        "QuantizationModifier": _weight_scheme(ignore, W3_ASYM_G64),
    },
    QIGSmoothQuantModifier: lambda ignore: {
        "QIGSmoothQuantModifier": {"qig_steps": 2, "smoothing_strength": 0.8},
        "GPTQModifier": {"ignore": ignore, "scheme": "W8A8"},
    },
    MBQModifier: lambda ignore: {
        "MBQModifier": {"loss_mode": "mae"},
        "QuantizationModifier": _weight_scheme(ignore, W3_ASYM_G64),
    },
}


def _recipe(modifier: type, ignore: list[str]) -> str:
    """The recipe as YAML (JSON is YAML), in the nested ``*_stage`` / ``*_modifiers`` form."""
    return json.dumps({"quant_stage": {"quant_modifiers": STAGES[modifier](ignore)}})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny model folder per family, built once for every modifier that needs it."""
    cache = {}

    def build(family):
        if family not in cache:
            cache[family] = FAMILIES[family](tmp_path_factory.mktemp(family))
        return cache[family]

    return build


def _fresh(tiny):
    """The family's model reloaded from its folder: a run rewrites the weights it calibrates."""
    return tiny._replace(model=type(tiny.model).from_pretrained(tiny.model.config.name_or_path, dtype=torch.float32))


# the matrix's "not supported" cells: (family, modifier) -> the start of the error the user gets
UNSUPPORTED = {
    **{(family, MBQModifier): "MBQModifier needs a VLM whose config names its image token" for family in TEXT_ONLY - MOE},
    ("qwen3_moe", MBQModifier): "MBQModifier needs a VLM whose config names its image token",
    ("qwen3_vl_moe", MBQModifier): "MBQModifier measures gradients at each decoder layer's mlp.down_proj",
}
CASES = [(family, modifier) for family in FAMILIES for modifier in STAGES if (family, modifier) not in UNSUPPORTED]


@pytest.mark.parametrize(("family", "modifier"), CASES, ids=[f"{f}-{m.__name__}" for f, m in CASES])
def test_every_qig_modifier_quantizes_the_text_decoder_of_every_family(family, modifier, built, tmp_path, monkeypatch):
    tiny = _fresh(built(family))
    assert decoder_layer_class(tiny.model) == tiny.sequential_target

    recorded = []
    weight_seam = "mapping_token_weights" if modifier is MBQModifier else "qig_weights"
    real_seam = getattr(modifier, weight_seam)

    def record(self, *args):
        weights = real_seam(self, *args)
        recorded.extend(weights if isinstance(weights, list) else [weights])
        return weights

    monkeypatch.setattr(modifier, weight_seam, record)
    output = tmp_path / "checkpoint"
    quantize_to_checkpoint(tiny.model, tiny.processor, _recipe(modifier, tiny.ignore), tiny.dataset, output)

    assert recorded, "no token weights were computed"
    assert all(torch.isfinite(w).all() and (w >= 0).all() for w in recorded)
    assert any(w.std() > 0.05 for w in recorded), "every token weight is equal: QIG did not weight tokens"

    layers_name, _ = decoder_layers(tiny.model)
    quantized = {
        name for name, module in tiny.model.named_modules() if getattr(module, "quantization_scheme", None) is not None
    }
    assert quantized and all(name.startswith(layers_name + ".") for name in quantized), sorted(quantized)[:5]
    scales = [name for name in load_file(output / "model.safetensors") if name.endswith("weight_scale")]
    assert len(scales) >= len(quantized) or any("experts" in name for name in quantized)
    config = json.loads((output / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"


@pytest.mark.parametrize(
    ("family", "modifier"), list(UNSUPPORTED), ids=[f"{f}-{m.__name__}" for f, m in UNSUPPORTED]
)
def test_unsupported_cells_fail_with_the_reason_and_the_alternative(family, modifier, built, tmp_path):
    tiny = _fresh(built(family))
    with pytest.raises(ValueError, match=UNSUPPORTED[(family, modifier)]) as error:
        quantize_to_checkpoint(tiny.model, tiny.processor, _recipe(modifier, tiny.ignore), tiny.dataset, tmp_path / "out")
    assert "use QIGAWQModifier" in str(error.value).replace("Use ", "use ")
    assert not (tmp_path / "out").exists()
