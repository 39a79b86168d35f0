"""QIGAutoRoundModifier: AutoRound's block loss weighted per token by QIG, through the real ``oneshot``."""

from types import SimpleNamespace

import pytest
import torch
from llmcompressor.modifiers.autoround import AutoRoundModifier
from safetensors.torch import load_file

import qig_plugin  # noqa: F401  (registers the modifiers)
from qig_plugin.modifiers import QIGAutoRoundModifier
from qig_plugin.data import batch_one_collator
from qig_plugin.quantize import calibrate, quantize_to_checkpoint
from qig_plugin.upstream import weighted_block_loss
from tests.modifiers.test_architectures import check_text_model_checkpoint
from tests.modifiers.tiny_llama import calibrate_tiny_llama
from tests.tiny_models import tiny_idefics3, tiny_qwen2_5_vl

SAMPLES = 4
# a few tuning steps keep the tests fast; torch.compile is off as in the shipped recipes
AUTOROUND = {"targets": ["Linear"], "scheme": "W4A16", "ignore": ["lm_head"], "iters": 16,
             "enable_torch_compile": False}


def quantize(model_dir, modifier, output_dir):
    model = calibrate_tiny_llama(model_dir, modifier, samples=SAMPLES, shuffle_calibration_samples=False)
    model.save_pretrained(output_dir, save_compressed=True)
    return load_file(output_dir / "model.safetensors")


@pytest.fixture
def recorded_weights(monkeypatch):
    """Every ``[batch, seq]`` weight list QIGAutoRoundModifier hands AutoRound, per decoder layer in order."""
    recorded = []
    real = QIGAutoRoundModifier.tuning_token_weights

    def record(self, decoding_layer):
        weights = real(self, decoding_layer)
        recorded.append(weights)
        return weights

    monkeypatch.setattr(QIGAutoRoundModifier, "tuning_token_weights", record)
    return recorded


def test_weights_of_one_give_stock_autorounds_checkpoint(tiny_llama_dir, tmp_path, monkeypatch, recorded_weights):
    stock = quantize(tiny_llama_dir, AutoRoundModifier(**AUTOROUND), tmp_path / "stock")

    def weights_of_one(self, scores, keep):
        return torch.ones_like(scores)

    monkeypatch.setattr(QIGAutoRoundModifier, "qig_weights", weights_of_one)
    ones = quantize(tiny_llama_dir, QIGAutoRoundModifier(**AUTOROUND), tmp_path / "ones")

    assert len(recorded_weights) == 2  # decoder layers, each tuned with weights
    assert all(len(layer) == SAMPLES and all(torch.equal(w, torch.ones_like(w)) for w in layer)
               for layer in recorded_weights)
    assert stock.keys() == ones.keys()
    assert all(torch.equal(stock[name], ones[name]) for name in stock)


def test_qig_weights_change_the_checkpoint(tiny_llama_dir, tmp_path, recorded_weights):
    stock = quantize(tiny_llama_dir, AutoRoundModifier(**AUTOROUND), tmp_path / "stock")
    qig = quantize(tiny_llama_dir, QIGAutoRoundModifier(**AUTOROUND), tmp_path / "qig")

    for layer in recorded_weights:  # one [1, seq] tensor per sample: mean 1, not uniform
        assert len(layer) == SAMPLES
        assert all(torch.allclose(w.mean(-1), torch.ones(1)) for w in layer)
        assert any(w.std() > 0.05 for w in layer)
    packed = [name for name in stock if name.endswith("weight_packed")]
    changed = [name for name in packed if not torch.equal(stock[name], qig[name])]
    assert len(packed) == 14 and len(changed) >= 7


def test_the_block_loss_weights_each_tokens_squared_error():
    from auto_round.algorithms.quantization.sign_round.quantizer import (
        SignRoundQuantizer,
    )

    reference = torch.zeros(3, 5, 4)
    output = torch.ones(3, 5, 4)
    weights = torch.tensor([[4.0, 0, 0, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    quantizer = SimpleNamespace(model_context=SimpleNamespace(amp=True))  # what _get_loss reads of its quantizer
    stock = SignRoundQuantizer._get_loss
    with weighted_block_loss(weights):
        weighted = SignRoundQuantizer._get_loss(quantizer, output[:2], reference[:2], [0, 2], torch.nn.MSELoss())
    assert SignRoundQuantizer._get_loss is stock
    # samples 0 and 2: (4 + 1 + 0) * 4 channels over 2 * 5 * 4 elements
    assert weighted.item() == pytest.approx(20 / 40)


@pytest.mark.parametrize("builder", [tiny_idefics3, tiny_qwen2_5_vl], ids=["idefics3", "qwen2_5_vl"])
def test_qig_autoround_quantizes_the_text_model_of_two_families(builder, tmp_path, recorded_weights):
    tiny = builder(tmp_path / "model")
    recipe = QIGAutoRoundModifier(**{**AUTOROUND, "ignore": tiny.ignore})
    output = tmp_path / "checkpoint"
    quantize_to_checkpoint(tiny.model, tiny.processor, [recipe], tiny.dataset, output)

    layers = tiny.model.config.get_text_config().num_hidden_layers
    assert len(recorded_weights) == layers and all(len(layer) == len(tiny.dataset) for layer in recorded_weights)
    check_text_model_checkpoint(output, layers)


def test_calibrate_gives_the_layers_autoround_tuned_their_dtype_back(tmp_path):
    """AutoRound leaves each tuned layer in bfloat16; after ``calibrate`` the model runs on float32 inputs again."""
    tiny = tiny_idefics3(tmp_path / "model")
    dtypes = {name: parameter.dtype for name, parameter in tiny.model.named_parameters()}
    calibrate(tiny.model, tiny.processor, [AutoRoundModifier(**{**AUTOROUND, "ignore": tiny.ignore})], tiny.dataset)

    assert {name: parameter.dtype for name, parameter in tiny.model.named_parameters() if name in dtypes} == dtypes
    batch = batch_one_collator([{k: v for k, v in tiny.dataset[0].items() if k != "loss_mask"}])
    with torch.no_grad():
        assert torch.isfinite(tiny.model(**batch).logits).all()
