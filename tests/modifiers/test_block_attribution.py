"""Block attribution: hoisting a block's input linears out of the path integral changes nothing but the cost."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from transformers import LlamaConfig, LlamaForCausalLM

from qig_plugin.attribution import (
    AttributionCache,
    QIGSettings,
    attribute_block,
    discrepancy,
    fake_quantize_activation,
    fake_quantize_weight,
    integrated_gradients,
    linear_weights,
    qig_token_scores,
)
from qig_plugin.modifiers import QIGGPTQModifier

W4_GROUP32 = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
INT8_TOKEN = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)


@pytest.fixture(scope="module")
def biased_llama_model():
    """A 2-layer Llama with biases in attention and MLP (as Qwen2's q/k/v), and its layer 1."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                         mlp_bias=True)
    model = LlamaForCausalLM(config).eval()
    layer = model.model.layers[1]
    return model, layer


@pytest.fixture(scope="module")
def biased_llama(biased_llama_model):
    """Layer 1's blocks and their inputs on a batch of 2 x 9 tokens."""
    model, layer = biased_llama_model
    blocks = {
        "attention": (layer.self_attn, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
        "mlp": (layer.mlp, [layer.mlp.gate_proj, layer.mlp.up_proj]),
        "o_proj": (layer.self_attn.o_proj, [layer.self_attn.o_proj]),
    }
    return blocks, block_calls(model, blocks, torch.randint(0, 64, (2, 9)))


def block_calls(model, blocks, input_ids, attention_mask=None):
    """Each block's (args, kwargs) when ``model`` runs on ``input_ids`` ``[batch, seq]``."""
    calls = {}
    handles = [
        block.register_forward_pre_hook(
            lambda _m, args, kwargs, name=name: calls.__setitem__(name, (args, kwargs)), with_kwargs=True
        )
        for name, (block, _) in blocks.items()
    ]
    with torch.no_grad():
        model(input_ids, attention_mask=attention_mask, use_cache=False)
    for handle in handles:
        handle.remove()
    return calls


@pytest.mark.parametrize("block_name", ["attention", "mlp", "o_proj"])
@pytest.mark.parametrize("baseline_args", [None, INT8_TOKEN], ids=["zero", "quantized"])
def test_hoisted_input_linears_give_the_same_scores(biased_llama, block_name, baseline_args):
    blocks, calls = biased_llama
    block, input_linears = blocks[block_name]
    weight_args = {m: W4_GROUP32 for m in block.modules() if isinstance(m, torch.nn.Linear)}
    args, kwargs = calls[block_name]
    modifier = QIGGPTQModifier(targets="Linear", scheme="W4A16", qig_attribution="exact", qig_min_steps=6)
    per_node = modifier.qig_scores(block, weight_args, args, kwargs, baseline_args)
    hoisted = modifier.qig_scores(block, weight_args, args, kwargs, baseline_args, input_linears)
    assert per_node.shape == (2, 9) and per_node.abs().sum() > 0
    assert torch.allclose(hoisted, per_node, rtol=1e-4, atol=1e-7)


def test_a_single_linear_takes_the_closed_form_of_its_path_integral(biased_llama):
    blocks, calls = biased_llama
    block, _ = blocks["o_proj"]
    args, kwargs = calls["o_proj"]
    modifier = QIGGPTQModifier(targets="Linear", scheme="W4A16", qig_attribution="exact")
    closed_form = modifier.qig_scores(block, {block: W4_GROUP32}, args, kwargs, input_linears=[block])
    q_weight = fake_quantize_weight(block.weight, W4_GROUP32)
    x = args[0].detach().float()
    path_integral, _, _ = qig_token_scores(block, lambda z: torch.nn.functional.linear(z, q_weight, block.bias), x,
                                        steps=6)
    assert closed_form.shape == (2, 9) and closed_form.min() > 0
    assert torch.allclose(closed_form, path_integral, rtol=1e-4, atol=1e-7)


def test_quantized_weights_are_rebuilt_when_a_weight_changes(biased_llama):
    blocks, calls = biased_llama
    block, input_linears = blocks["mlp"]
    weight_args = {m: W4_GROUP32 for m in block.modules() if isinstance(m, torch.nn.Linear)}
    modifier = QIGGPTQModifier(targets="Linear", scheme="W4A16")
    before = modifier.qig_scores(block, weight_args, *calls["mlp"], input_linears=input_linears)
    original = block.up_proj.weight.detach().clone()
    try:
        with torch.no_grad():  # as AWQ's smoothing and update_offload_parameter change weights
            block.up_proj.weight.mul_(torch.linspace(0.5, 2.0, original.shape[1]))
        after = modifier.qig_scores(block, weight_args, *calls["mlp"], input_linears=input_linears)
        fresh = QIGGPTQModifier(targets="Linear", scheme="W4A16")
        expected = fresh.qig_scores(block, weight_args, *calls["mlp"], input_linears=input_linears)
    finally:
        with torch.no_grad():
            block.up_proj.weight.copy_(original)
    assert not torch.allclose(after, before)
    assert torch.equal(after, expected)



FAST = QIGSettings(qig_attribution="fast")


@pytest.mark.parametrize("left_padding", [0, 3])
def test_probing_finds_the_blocks_whose_tokens_do_not_interact(biased_llama_model, biased_llama, left_padding):
    model, _ = biased_llama_model
    blocks, _ = biased_llama
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :left_padding] = 0  # a padded first sample: the probe must still see attention mix its real tokens
    calls = block_calls(model, blocks, torch.randint(0, 64, (2, 9)), mask)
    cache = AttributionCache()
    for name, (block, input_linears) in blocks.items():
        weight_args = {m: W4_GROUP32 for m in block.modules() if isinstance(m, torch.nn.Linear)}
        attribute_block(block, *calls[name], weight_args, FAST, input_linears=input_linears, cache=cache)
    assert cache.token_wise[blocks["mlp"][0]] is True
    assert cache.token_wise[blocks["attention"][0]] is False
    assert blocks["o_proj"][0] not in cache.token_wise  # a lone linear needs no probe


@pytest.mark.parametrize("baseline_args", [None, INT8_TOKEN], ids=["zero", "quantized"])
def test_fast_scores_of_a_token_wise_block_are_each_tokens_summed_integrated_gradients(biased_llama, baseline_args):
    """Completeness, token by token: an MLP's token t only moves its own output, so the sum of its
    integrated gradients is F(x_t) - F(x0_t), which the fast form evaluates without a path integral."""
    blocks, calls = biased_llama
    block, input_linears = blocks["mlp"]
    weight_args = {m: W4_GROUP32 for m in block.modules() if isinstance(m, torch.nn.Linear)}
    args, kwargs = calls["mlp"]
    fast = attribute_block(block, args, kwargs, weight_args, FAST, input_linears=input_linears,
                           baseline_args=baseline_args)
    fp = {m: m.weight.detach().float() for m in weight_args}
    q = {m: fake_quantize_weight(m.weight, W4_GROUP32) for m in weight_args}

    def objective(points):
        with linear_weights(fp):
            fp_out = block(points)
        with linear_weights(q):
            q_out = block(points)
        return discrepancy(fp_out, q_out).sum()

    x = args[0].detach().float()
    baseline = None if baseline_args is None else fake_quantize_activation(x, baseline_args)
    summed = integrated_gradients(objective, x, baseline, steps=32).sum(dim=-1)
    assert fast.nodes == 0 and fast.scores.shape == (2, 9)
    assert torch.allclose(fast.scores, summed.abs(), rtol=1e-3, atol=1e-6)


def test_fast_attention_is_the_path_integral_at_its_midpoint_unchecked(biased_llama):
    blocks, calls = biased_llama
    block, input_linears = blocks["attention"]
    weight_args = {m: W4_GROUP32 for m in block.modules() if isinstance(m, torch.nn.Linear)}
    args, kwargs = calls["attention"]

    def attribute(settings):
        return attribute_block(block, args, kwargs, weight_args, settings, input_linears=input_linears)

    fast = attribute(FAST)
    one_node = attribute(QIGSettings(qig_attribution="exact", qig_min_steps=1, qig_steps=1))
    assert fast.nodes == 1 and fast.completeness_error is None
    assert torch.allclose(fast.scores, one_node.scores, rtol=1e-5, atol=1e-8)
    # the node settings are exact's: fast ignores them
    other_nodes = attribute(QIGSettings(qig_attribution="fast", qig_rule="uniform", qig_min_steps=3))
    assert torch.equal(other_nodes.scores, fast.scores)
    assert not torch.allclose(attribute(QIGSettings(qig_attribution="exact")).scores, fast.scores, rtol=1e-3)


def test_fast_single_linear_scores_are_its_output_error(biased_llama):
    blocks, calls = biased_llama
    block, _ = blocks["o_proj"]
    args, kwargs = calls["o_proj"]
    fast = attribute_block(block, args, kwargs, {block: W4_GROUP32}, FAST)
    q_weight = fake_quantize_weight(block.weight, W4_GROUP32)
    x = args[0].detach().float()
    expected = (torch.nn.functional.linear(x, block.weight.float(), block.bias.float())
                - torch.nn.functional.linear(x, q_weight, block.bias.float())).abs().mean(dim=-1)
    assert torch.allclose(fast.scores, expected, rtol=1e-4, atol=1e-7)
