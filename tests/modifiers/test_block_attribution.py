"""Block attribution: hoisting a block's input linears out of the path integral changes nothing but the cost."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from transformers import LlamaConfig, LlamaForCausalLM

from qig_plugin.attribution import fake_quantize_weight, qig_token_scores
from qig_plugin.modifiers import QIGGPTQModifier

W4_GROUP32 = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
INT8_TOKEN = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)


@pytest.fixture(scope="module")
def biased_llama():
    """A 2-layer Llama with biases in attention and MLP (as Qwen2's q/k/v), and the inputs of layer 1's blocks."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                         mlp_bias=True)
    model = LlamaForCausalLM(config).eval()
    layer = model.model.layers[1]
    blocks = {
        "attention": (layer.self_attn, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
        "mlp": (layer.mlp, [layer.mlp.gate_proj, layer.mlp.up_proj]),
        "o_proj": (layer.self_attn.o_proj, [layer.self_attn.o_proj]),
    }
    calls = {}
    handles = [
        block.register_forward_pre_hook(
            lambda _m, args, kwargs, name=name: calls.__setitem__(name, (args, kwargs)), with_kwargs=True
        )
        for name, (block, _) in blocks.items()
    ]
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 9)), use_cache=False)
    for handle in handles:
        handle.remove()
    return blocks, calls


@pytest.mark.parametrize("block_name", ["attention", "mlp", "o_proj"])
@pytest.mark.parametrize("baseline_args", [None, INT8_TOKEN], ids=["zero", "quantized"])
def test_hoisted_input_linears_give_the_same_scores(biased_llama, block_name, baseline_args):
    blocks, calls = biased_llama
    block, input_linears = blocks[block_name]
    weight_args = {m: W4_GROUP32 for m in block.modules() if isinstance(m, torch.nn.Linear)}
    args, kwargs = calls[block_name]
    modifier = QIGGPTQModifier(targets="Linear", scheme="W4A16", qig_min_steps=6)
    per_node = modifier.qig_scores(block, weight_args, args, kwargs, baseline_args)
    hoisted = modifier.qig_scores(block, weight_args, args, kwargs, baseline_args, input_linears)
    assert per_node.shape == (2, 9) and per_node.abs().sum() > 0
    assert torch.allclose(hoisted, per_node, rtol=1e-4, atol=1e-7)


def test_a_single_linear_takes_the_closed_form_of_its_path_integral(biased_llama):
    blocks, calls = biased_llama
    block, _ = blocks["o_proj"]
    args, kwargs = calls["o_proj"]
    modifier = QIGGPTQModifier(targets="Linear", scheme="W4A16")
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
