import json

import pytest
import torch
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
from llmcompressor.pipelines.cache import IntermediatesCache
from safetensors.torch import load_file

import qig_plugin  # noqa: F401  (registers the modifiers)
from qig_plugin.modifiers import QIGAWQModifier
from qig_plugin.modifiers.language_model import language_model_name, scope_to_language_model
from qig_plugin.quantize import quantize_to_checkpoint
from tests.modifiers.tiny_llama import calibrate_tiny_llama
from tests.tiny_models import IDEFICS3_IGNORE, tiny_idefics3

SAMPLES = 4
W4A16 = {"targets": ["Linear"], "scheme": "W4A16", "ignore": ["lm_head"]}


def quantize(model_dir, awq, output_dir):
    model = calibrate_tiny_llama(
        model_dir,
        [awq, QuantizationModifier(**W4A16)],
        samples=SAMPLES,
        shuffle_calibration_samples=False,  # the same batch order in every run
    )
    model.save_pretrained(output_dir, save_compressed=True)
    return load_file(output_dir / "model.safetensors")


@pytest.fixture(autouse=True)
def stock_awq_runs_on_cpu(monkeypatch):
    """Stock AWQ 0.14.0.1 pins its cache unconditionally, which fails on CPU-only torch."""
    if not torch.accelerator.is_available():
        monkeypatch.setattr(IntermediatesCache, "pin_memory", lambda self, batch_index, input_names=None: None)


@pytest.fixture
def chosen_scales(monkeypatch):
    """Every scale AWQ's grid search returns, in call order (stock and QIG both go through it)."""
    scales = []
    real = AWQModifier._compute_best_scale

    def record(self, mapping, fp16_outputs, orig_layer_weights):
        best = real(self, mapping, fp16_outputs, orig_layer_weights)
        scales.append((mapping.smooth_name, best))
        return best

    monkeypatch.setattr(AWQModifier, "_compute_best_scale", record)
    return scales


def test_equal_weights_choose_the_stock_awq_scales(tiny_llama_dir, tmp_path, monkeypatch, chosen_scales):
    stock = quantize(tiny_llama_dir, AWQModifier(), tmp_path / "stock")
    stock_scales = list(chosen_scales)
    chosen_scales.clear()

    calls = []
    real_token_weights = QIGAWQModifier.qig_weights

    def weights_of_one(self, scores, keep):
        calls.append(real_token_weights(self, scores, keep))  # the full QIG path still runs
        return torch.ones_like(scores)

    monkeypatch.setattr(QIGAWQModifier, "qig_weights", weights_of_one)
    ones = quantize(tiny_llama_dir, QIGAWQModifier(loss_mode="mse", qig_steps=2), tmp_path / "ones")

    # 2 layers x (q/k/v, gate/up, down); v -> o is skipped by AWQ for GQA shapes
    assert len(calls) == SAMPLES * 2 * 3 and len(stock_scales) == 2 * 3
    assert [name for name, _ in chosen_scales] == [name for name, _ in stock_scales]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(chosen_scales, stock_scales))
    assert stock.keys() == ones.keys()
    assert all(torch.equal(stock[name], ones[name]) for name in stock)


def test_qig_weights_change_the_chosen_scales(tiny_llama_dir, tmp_path, chosen_scales):
    quantize(tiny_llama_dir, AWQModifier(), tmp_path / "stock")
    stock_scales = list(chosen_scales)
    chosen_scales.clear()
    quantize(tiny_llama_dir, QIGAWQModifier(loss_mode="mse", qig_steps=2), tmp_path / "qig")
    changed = [name for (name, a), (_, b) in zip(chosen_scales, stock_scales) if not torch.equal(a, b)]
    assert len(chosen_scales) == len(stock_scales) == 6
    assert len(changed) >= 2, f"QIG weights changed only {changed}"


def test_default_mappings_are_scoped_to_the_language_model(tmp_path):
    tiny = tiny_idefics3(tmp_path / "model")
    assert language_model_name(tiny.model) == "model.text_model"
    assert scope_to_language_model("re:.*q_proj$", "model.text_model") == r"re:model\.text_model\..*q_proj$"
    recipe = f"""
quant_stage:
  quant_modifiers:
    QIGAWQModifier: {{qig_steps: 2}}
    QuantizationModifier:
      ignore: {json.dumps(IDEFICS3_IGNORE)}
      config_groups:
        group_0:
          targets: [Linear]
          weights: {{num_bits: 4, type: int, symmetric: false, strategy: group, group_size: 64}}
"""
    output = tmp_path / "checkpoint"
    quantize_to_checkpoint(tiny.model, tiny.processor, recipe, tiny.dataset, output)
    tensors = load_file(output / "model.safetensors")
    packed = [name for name in tensors if name.endswith("weight_packed")]
    layers = tiny.model.config.get_text_config().num_hidden_layers
    assert len(packed) == layers * 7 and all("text_model" in name for name in packed)


def test_awq_without_language_model_says_pass_mappings():
    class NoDecoder(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="pass mappings scoped to it"):
        language_model_name(NoDecoder())
