import json
import subprocess
import sys

import pytest
import torch
import yaml
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.recipe import Recipe
from safetensors.torch import load_file

import qig_plugin  # noqa: F401  (registers the modifiers)
from qig_plugin.attribution import block as attribution_block
from qig_plugin.modifiers import block_attribution
from qig_plugin.modifiers import QIGGPTQModifier
from qig_plugin.modifiers.groups import resolve_groups, targeted_linears
from qig_plugin.modifiers.block_attribution import attendable_tokens as _attendable_tokens
from tests.modifiers.tiny_llama import calibrate_tiny_llama, load_tiny_llama

SCHEME = {"targets": ["Linear"], "scheme": "W4A16", "ignore": ["lm_head"]}


def quantize(model_dir, recipe, output_dir, **kwargs):
    model = calibrate_tiny_llama(model_dir, recipe, samples=6, **kwargs)
    model.save_pretrained(output_dir, save_compressed=True)
    return load_file(output_dir / "model.safetensors"), model


def test_weights_of_one_give_a_checkpoint_bit_identical_to_stock_gptq(tiny_llama_dir, tmp_path, monkeypatch):
    in_order = {"shuffle_calibration_samples": False}  # the Hessian's running mean rounds by batch order
    stock, _ = quantize(tiny_llama_dir, GPTQModifier(**SCHEME), tmp_path / "stock", **in_order)

    calls = []
    real_token_weights = QIGGPTQModifier.qig_weights

    def weights_of_one(self, scores, keep):
        calls.append(real_token_weights(self, scores, keep))  # the full QIG path still runs
        return torch.ones_like(scores)

    monkeypatch.setattr(QIGGPTQModifier, "qig_weights", weights_of_one)
    ones, _ = quantize(tiny_llama_dir, QIGGPTQModifier(**SCHEME), tmp_path / "ones", **in_order)

    assert len(calls) == 6 * 2 * 4  # samples x layers x groups (attention, o_proj, mlp, down_proj)
    assert stock.keys() == ones.keys()
    assert all(torch.equal(stock[name], ones[name]) for name in stock)


def test_qig_weights_change_the_checkpoint(tiny_llama_dir, tmp_path):
    stock, _ = quantize(tiny_llama_dir, GPTQModifier(**SCHEME), tmp_path / "stock")
    qig, model = quantize(tiny_llama_dir, QIGGPTQModifier(**SCHEME), tmp_path / "qig")
    packed = [name for name in stock if name.endswith("weight_packed")]
    changed = [name for name in packed if not torch.equal(stock[name], qig[name])]
    assert len(packed) == 14 and len(changed) >= 10
    config = json.loads((tmp_path / "qig" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == 4


def test_hessian_is_the_token_weighted_sum(tiny_llama_dir):
    model = load_tiny_llama(tiny_llama_dir)
    linear = model.model.layers[0].mlp.down_proj
    modifier = QIGGPTQModifier(**SCHEME)
    torch.manual_seed(0)
    inputs = torch.randn(2, 5, linear.in_features)
    weights = torch.rand(2, 5) * 2
    modifier._pending_weights[linear] = weights
    modifier.calibrate_module(linear, (inputs,), None)
    expected = 2 * torch.einsum("bt,bti,btj->ij", weights, inputs, inputs)
    assert torch.allclose(modifier._hessians[linear], expected, rtol=1e-5, atol=1e-5)
    assert linear not in modifier._pending_weights  # consumed, never reused for another batch


def test_groups_follow_llm_compressor_mappings(tiny_llama_dir):
    model = load_tiny_llama(tiny_llama_dir)
    schemes = targeted_linears(model, QIGGPTQModifier(**SCHEME).resolve_quantization_config())
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert list(schemes) == names
    groups = resolve_groups(model, schemes)
    blocks = [g.block_name for g in groups]
    assert blocks[:4] == [
        "model.layers.0.self_attn",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp",
        "model.layers.0.mlp.down_proj",
    ]
    attention = groups[0]
    assert len(attention.linears) == 3 and len(attention.weight_args) == 4  # q/k/v, plus o_proj in Q(W)
    assert sum(len(g.linears) for g in groups) == len(names)


def test_padding_is_read_from_the_attention_mask():
    minimum = torch.finfo(torch.float32).min
    causal = torch.triu(torch.full((4, 4), minimum), diagonal=1)
    left_padded = causal.clone()
    left_padded[:, 0] = minimum
    mask = torch.stack([causal, left_padded])[:, None]
    assert _attendable_tokens(mask).tolist() == [[True] * 4, [False, True, True, True]]


def test_recipe_yaml_round_trip(tiny_llama_dir, tmp_path):
    recipe = """
quant_stage:
  quant_modifiers:
    QIGGPTQModifier:
      targets: [Linear]
      ignore: [lm_head]
      scheme: W4A16
      qig_steps: 4
      qig_rule: uniform
      qig_iqr_clip: false
"""
    _, _ = quantize(tiny_llama_dir, recipe, tmp_path / "out")
    saved = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    fields = saved["quant_stage"]["quant_modifiers"]["QIGGPTQModifier"]
    assert fields["qig_steps"] == 4 and fields["qig_rule"] == "uniform" and fields["qig_iqr_clip"] is False
    (modifier,) = Recipe.create_instance(str(tmp_path / "out" / "recipe.yaml")).modifiers
    assert isinstance(modifier, QIGGPTQModifier)
    assert (modifier.qig_steps, modifier.qig_rule, modifier.qig_iqr_clip) == (4, "uniform", False)


def test_unknown_field_is_rejected():
    with pytest.raises(ValueError, match="qig_stepz"):
        QIGGPTQModifier(**SCHEME, qig_stepz=3)


def test_quantized_baseline_on_weight_only_scheme_is_explained(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="use qig_baseline: zero"):
        quantize(tiny_llama_dir, QIGGPTQModifier(**SCHEME, qig_baseline="quantized"), tmp_path / "out")


def test_recipe_without_plugin_import_says_import_qig_plugin():
    code = (
        "from llmcompressor.recipe import Recipe\n"
        "Recipe.create_instance('quant_stage:\\n  quant_modifiers:\\n    QIGGPTQModifier: {scheme: W4A16}\\n')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "import qig_plugin" in result.stderr


def test_fast_attribution_integrates_attention_alone_at_its_midpoint(tiny_llama_dir, tmp_path, monkeypatch):
    integrals = []  # (block, min_steps, steps) of every path integral taken
    real_token_scores = attribution_block.qig_token_scores
    real_attribute = attribution_block.attribute_block

    def recording_token_scores(*args, min_steps, steps, **kwargs):
        integrals[-1].extend((min_steps, steps))
        return real_token_scores(*args, min_steps=min_steps, steps=steps, **kwargs)

    def recording_attribute(block, *args, **kwargs):
        integrals.append([type(block).__name__])
        return real_attribute(block, *args, **kwargs)

    monkeypatch.setattr(attribution_block, "qig_token_scores", recording_token_scores)
    monkeypatch.setattr(block_attribution, "attribute_block", recording_attribute)
    quantize(tiny_llama_dir, QIGGPTQModifier(**SCHEME), tmp_path / "qig")  # qig_attribution: fast, the default

    assert len(integrals) == 6 * 2 * 4
    taken = [c for c in integrals if len(c) > 1]
    assert {c[0] for c in taken} == {"LlamaAttention"}  # MLPs and single linears: forward only
    assert len(taken) == 6 * 2 and all(c[1:] == [None, 1] for c in taken)  # one node, unchecked


def test_each_block_starts_from_its_last_node_count_and_keeps_a_settled_one_unchecked(
    tiny_llama_dir, tmp_path, monkeypatch
):
    calls = []  # per block attribution: [block, then min_steps, steps, nodes used of its qig_token_scores]
    real_token_scores = attribution_block.qig_token_scores
    real_block_scores = QIGGPTQModifier.qig_scores

    def recording_token_scores(*args, min_steps, steps, **kwargs):
        result = real_token_scores(*args, min_steps=min_steps, steps=steps, **kwargs)
        calls[-1].extend((min_steps, steps, result.nodes))
        return result

    def recording_block_scores(self, block, *args, **kwargs):
        calls.append([block])
        return real_block_scores(self, block, *args, **kwargs)

    monkeypatch.setattr(attribution_block, "qig_token_scores", recording_token_scores)
    monkeypatch.setattr(QIGGPTQModifier, "qig_scores", recording_block_scores)
    quantize(tiny_llama_dir, QIGGPTQModifier(**SCHEME, qig_attribution="exact", qig_completeness_tol=1e-4),
             tmp_path / "qig")

    assert len(calls) == 6 * 2 * 4
    linears = [c for c in calls if isinstance(c[0], torch.nn.Linear)]
    assert len(linears) == 6 * 2 * 2 and all(len(c) == 1 for c in linears)  # closed form, no path integral
    history: dict[int, list] = {}
    for block, *attribution in (c for c in calls if not isinstance(c[0], torch.nn.Linear)):
        history.setdefault(id(block), []).append(attribution)
    assert len(history) == 2 * 2 and all(len(h) == 6 for h in history.values())
    used_counts, unchecked = set(), 0
    for attributions in history.values():
        start, batches_at_start = 2, 0  # qig_min_steps, then the count the block last used
        for min_steps, steps, used in attributions:
            if batches_at_start >= 2:  # settled: that count alone, no completeness check
                assert (min_steps, steps, used) == (None, start, start)
                unchecked += 1
            else:
                assert (min_steps, steps) == (start, 6) and used >= start
            batches_at_start = batches_at_start + 1 if used == start else 1
            start = used
            used_counts.add(used)
    assert used_counts <= {2, 3, 4, 6} and max(used_counts) > 2 and unchecked > 0
