"""The quantized branch ``Q(W)`` of a block, from compressed-tensors' own quantization args.

Round-to-nearest with min-max scales, computed per the scheme's strategy (tensor, channel
or group) and quantized/dequantized with compressed-tensors' ``fake_quantize``, so that
``Q(W)`` sits on exactly the grid the checkpoint will use (W4 g128 sym, W3 g64, W8
channel, ...). Nothing is copied or modified in place: callers get one dequantized
weight per linear and swap it in for the attribution only.
"""

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams, compute_dynamic_scales_and_zp


# per-strategy min/max of a [out, in] weight, shaped like the scheme's scale tensor
def _weight_ranges(weight: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    if args.strategy == QuantizationStrategy.TENSOR:
        return weight.amin().reshape(1), weight.amax().reshape(1)
    if args.strategy == QuantizationStrategy.CHANNEL:
        return weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True)
    if args.strategy == QuantizationStrategy.GROUP:
        rows, columns = weight.shape
        if columns % args.group_size:
            raise ValueError(
                f"weight with {columns} columns is not divisible by group_size "
                f"{args.group_size}; choose a group size that divides the layer width"
            )
        groups = weight.reshape(rows, columns // args.group_size, args.group_size)
        return groups.amin(dim=-1), groups.amax(dim=-1)
    raise NotImplementedError(
        f"QIG's fake quantization supports tensor, channel and group strategies, "
        f"not {args.strategy}"
    )


def fake_quantize_weight(weight: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """Round-to-nearest ``Q(W)`` of a linear weight ``[out, in]`` on the scheme's grid.

    :return: the dequantized weight ``[out, in]`` in float32
    """
    weight = weight.detach().float()
    min_vals, max_vals = _weight_ranges(weight, args)
    scale, zero_point = calculate_qparams(min_vals, max_vals, args)
    return fake_quantize(weight, scale.float(), zero_point, args).float()


def fake_quantize_activation(x: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """Dynamic ``Q_a(x)`` of an activation ``[batch, seq, hidden]`` (per token or tensor).

    Used as the quantized input ``x^q`` (the paper's IG baseline) for schemes that
    quantize activations (W4A8, W8A8).
    """
    if not args.dynamic:
        raise ValueError(
            "the quantized-input baseline needs dynamic activation quantization; static "
            "activation scales are not known before calibration ends"
        )
    x = x.detach().float()
    scale, zero_point = compute_dynamic_scales_and_zp(x, args, module=None)
    return fake_quantize(x, scale, zero_point, args).float()
