import torch

import qig_plugin  # noqa: F401  (registers the modifiers)
from qig_plugin.modifiers import MBQModifier
from qig_plugin.quantize import quantize_to_checkpoint
from tests.tiny_models import tiny_idefics3

RECIPE = """
quant_stage:
  quant_modifiers:
    MBQModifier: {loss_mode: mae}
    QuantizationModifier:
      ignore: ["re:.*lm_head", "re:model.vision_model.*", "re:model.connector.*"]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 3, type: int, symmetric: false, strategy: group, group_size: 64}
"""


def test_mbq_ratios_are_finite_floored_and_weight_the_vision_tokens(tmp_path, monkeypatch):
    tiny = tiny_idefics3(tmp_path / "model")
    ratios, weights = [], []
    real_ratios, real_weights = MBQModifier._gradient_ratios, MBQModifier.mapping_token_weights

    def record_ratios(self, state, layers, image_token):
        ratios.append(real_ratios(self, state, layers, image_token))
        return ratios[-1]

    def record_weights(self, mapping, keeps):
        weights.append((self._mapping_ratio(mapping), real_weights(self, mapping, keeps), dict(self._vision_masks)))
        return weights[-1][1]

    monkeypatch.setattr(MBQModifier, "_gradient_ratios", record_ratios)
    monkeypatch.setattr(MBQModifier, "mapping_token_weights", record_weights)
    quantize_to_checkpoint(tiny.model, tiny.processor, RECIPE, tiny.dataset, tmp_path / "checkpoint")

    layers = tiny.model.config.get_text_config().num_hidden_layers
    ((attention, mlp),) = ratios
    for per_layer in (attention, mlp):
        assert per_layer.shape == (layers,) and torch.isfinite(per_layer).all() and (per_layer > 0).all()
        assert (per_layer >= per_layer.median()).all()  # floored at the median
    assert len(weights) == layers * 3  # q/k/v, gate/up, down (v -> o skipped for GQA)
    for ratio, per_batch, vision_masks in weights:
        assert ratio in attention.tolist() + mlp.tolist()
        assert len(per_batch) == len(tiny.dataset)
        for index, w in enumerate(per_batch):
            vision = vision_masks[index]
            assert vision.any() and (~vision).any()
            assert torch.allclose(w[vision], torch.tensor(ratio)) and (w[~vision] == 1).all()
    assert (tmp_path / "checkpoint" / "model.safetensors").exists()
