import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme

from qig_plugin.attribution import fake_quantize_activation, fake_quantize_weight


def group_args(num_bits: int, group_size: int, symmetric: bool = True) -> QuantizationArgs:
    return QuantizationArgs(
        num_bits=num_bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size
    )


@pytest.mark.parametrize("num_bits,symmetric", [(4, True), (3, True), (4, False)])
def test_group_fake_quant_has_at_most_2_pow_bits_levels_per_group(num_bits, symmetric):
    torch.manual_seed(0)
    weight = torch.randn(16, 128)
    quantized = fake_quantize_weight(weight, group_args(num_bits, 64, symmetric))
    for group in quantized.reshape(16, 2, 64).reshape(-1, 64):
        assert group.unique().numel() <= 2**num_bits
    step = weight.reshape(16, 2, 64).abs().amax(-1, keepdim=True) / (2 ** (num_bits - 1) - 0.5)
    assert torch.all((quantized - weight).reshape(16, 2, 64).abs() <= step)


def test_preset_schemes_give_their_own_grid():
    torch.manual_seed(0)
    weight = torch.randn(8, 128)
    w8_channel = preset_name_to_scheme("W8A8", ["Linear"]).weights
    quantized = fake_quantize_weight(weight, w8_channel)
    scale = weight.abs().amax(1, keepdim=True) / 127.5
    assert torch.allclose(quantized / scale, (quantized / scale).round(), atol=1e-3)
    assert (quantized - weight).abs().max() < (weight - fake_quantize_weight(weight, group_args(4, 128))).abs().max()


def test_weight_is_not_modified_in_place():
    weight = torch.randn(4, 64)
    original = weight.clone()
    fake_quantize_weight(weight, group_args(4, 64))
    assert torch.equal(weight, original)


def test_indivisible_group_size_is_explained():
    with pytest.raises(ValueError, match="not divisible by group_size 128"):
        fake_quantize_weight(torch.randn(4, 576), group_args(4, 128))


def test_dynamic_per_token_activation_quantization():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64)
    args = preset_name_to_scheme("W8A8", ["Linear"]).input_activations
    quantized = fake_quantize_activation(x, args)
    per_token_step = x.abs().amax(-1, keepdim=True) / 127.5
    assert torch.all((quantized - x).abs() <= per_token_step / 2 + 1e-6)
    assert not torch.equal(quantized, x)
