"""QIGGPTQModifier end to end on tiny VLMs of three families (Idefics3, Qwen2.5-VL, LLaVA)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from qig_plugin.modifiers import QIGGPTQModifier
from qig_plugin.quantize import decoder_layer_class, quantize_to_checkpoint
from tests.tiny_models import tiny_idefics3, tiny_llava, tiny_qwen2_5_vl

BUILDERS = {"idefics3": tiny_idefics3, "qwen2_5_vl": tiny_qwen2_5_vl, "llava": tiny_llava}
RECIPE = """
quant_stage:
  quant_modifiers:
    QIGGPTQModifier:
      ignore: {ignore}
      scheme: W4A16
      qig_steps: 4
"""


@pytest.mark.parametrize("family", list(BUILDERS))
def test_qig_gptq_quantizes_the_text_model_of_each_family(family, tmp_path, monkeypatch):
    tiny = BUILDERS[family](tmp_path / "model")
    assert decoder_layer_class(tiny.model) == tiny.sequential_target

    recorded = []
    real_token_weights = QIGGPTQModifier.qig_weights

    def record(self, scores, keep):
        weights = real_token_weights(self, scores, keep)
        recorded.append(weights)
        return weights

    monkeypatch.setattr(QIGGPTQModifier, "qig_weights", record)
    output = tmp_path / "checkpoint"
    quantize_to_checkpoint(
        tiny.model, tiny.processor, RECIPE.format(ignore=json.dumps(tiny.ignore)), tiny.dataset, output
    )

    layers = tiny.model.config.get_text_config().num_hidden_layers
    assert len(recorded) == len(tiny.dataset) * layers * 4  # attention, o_proj, mlp, down_proj
    assert all(torch.allclose(w.mean(-1), torch.ones(w.shape[0])) for w in recorded)
    assert any(w.std() > 0.05 for w in recorded)  # QIG weights are not uniform

    check_text_model_checkpoint(output, layers)
    assert (output / "tokenizer_config.json").exists()


def check_text_model_checkpoint(output, layers: int) -> None:
    """The checkpoint packs the 7 linears of each text decoder layer and nothing of the vision side."""
    tensors = load_file(output / "model.safetensors")
    packed = [name for name in tensors if name.endswith("weight_packed")]
    assert len(packed) == layers * 7
    assert not any(part in name for name in packed for part in ("vision", "visual", "projector", "connector"))
    config = json.loads((output / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
