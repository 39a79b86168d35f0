import pytest
import torch
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

import qig_plugin  # noqa: F401  (registers the modifiers)
from qig_plugin.modifiers import QIGSmoothQuantModifier
from tests.modifiers.tiny_llama import calibrate_tiny_llama

SAMPLES = 3
W8A8 = {"targets": ["Linear"], "scheme": "W8A8", "ignore": ["lm_head"]}


def smoothed_norms(model_dir, smoothquant) -> dict[str, torch.Tensor]:
    """The norm weights after smoothing (SmoothQuant divides each norm by its scales)."""
    model = calibrate_tiny_llama(
        model_dir,
        [smoothquant, QuantizationModifier(**W8A8)],
        samples=SAMPLES,
        shuffle_calibration_samples=False,  # the same batch order in every run
    )
    return {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if name.endswith("layernorm")
    }


def test_smoothing_scales_follow_the_token_weights(tiny_llama_dir, monkeypatch):
    stock = smoothed_norms(tiny_llama_dir, SmoothQuantModifier(smoothing_strength=0.8))
    qig = smoothed_norms(tiny_llama_dir, QIGSmoothQuantModifier(smoothing_strength=0.8, qig_steps=2))

    calls = []
    real_token_weights = QIGSmoothQuantModifier.qig_weights

    def weights_of_one(self, scores, keep):
        calls.append(real_token_weights(self, scores, keep))
        return torch.ones_like(scores)

    monkeypatch.setattr(QIGSmoothQuantModifier, "qig_weights", weights_of_one)
    ones = smoothed_norms(tiny_llama_dir, QIGSmoothQuantModifier(smoothing_strength=0.8, qig_steps=2))

    assert len(stock) == 4 and len(calls) == SAMPLES * 2 * 2  # samples x layers x (attention, mlp)
    assert any(w.std() > 0.05 for w in calls)  # the real QIG weights are not uniform
    assert all(torch.equal(stock[name], ones[name]) for name in stock)  # equal weights: stock scales
    assert all(not torch.equal(stock[name], qig[name]) for name in stock)  # QIG weights: other scales


def test_smoothquant_without_a_quantization_stage_says_add_one(tiny_llama_dir):
    with pytest.raises(ValueError, match="targeting its linears after it"):
        calibrate_tiny_llama(
            tiny_llama_dir,
            [QIGSmoothQuantModifier(), QuantizationModifier(targets=["re:.*lm_head"], scheme="W8A8")],
            samples=1,
        )
