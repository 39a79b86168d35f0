"""Sub-layer groups: which block's discrepancy gives the token weights of each linear.

A group is a set of targeted linears that read the same input, plus the block whose
output discrepancy QIG attributes: q/k/v -> the attention module, gate/up -> the MLP,
and any other linear (o_proj, down_proj, ...) -> the linear itself. Groups come from
llm-compressor's own mappings for the model, not from class names: the multi-layer balance
sets of its AWQ mappings, then of its SmoothQuant mappings (Gemma 3's AWQ mappings leave out
q/k/v, whose input norm AWQ does not smooth there, but they still read one input).
"""

from collections import defaultdict
from dataclasses import dataclass

import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.utils import match_name
from llmcompressor.modifiers.transform.awq.base import get_lowest_common_ancestor_with_avoid
from llmcompressor.modifiers.transform.awq.dynamic_mappings import get_layer_mappings_from_model
from llmcompressor.modifiers.transform.smoothquant.dynamic_mappings import (
    get_layer_mappings_from_model as get_smoothquant_mappings_from_model,
)


@dataclass
class SubLayerGroup:
    """Linears attributed through one block.

    :param block: module whose forward is attributed; its first input is the group input
    :param block_name: the block's name in the model
    :param linears: targeted linears of the group, whose Hessians get the weights
    :param weight_args: every targeted linear inside ``block`` (the group's and others,
        e.g. o_proj inside attention) -> its weight quantization args, to build ``Q(W)``
    :param input_args: the group's input-activation args (None for weight-only schemes)
    """

    block: torch.nn.Module
    block_name: str
    linears: list[torch.nn.Module]
    weight_args: dict[torch.nn.Module, QuantizationArgs]
    input_args: QuantizationArgs | None


def _make_group(
    model: torch.nn.Module, names: list[str], block_name: str, targeted: set[torch.nn.Module]
) -> SubLayerGroup:
    block = model.get_submodule(block_name)
    linears = [model.get_submodule(name) for name in names]
    return SubLayerGroup(
        block=block,
        block_name=block_name,
        linears=linears,
        weight_args={m: m.quantization_scheme.weights for m in block.modules() if m in targeted},
        input_args=linears[0].quantization_scheme.input_activations,
    )


def resolve_groups(model: torch.nn.Module, linear_names: list[str]) -> list[SubLayerGroup]:
    """Partition the targeted linears of ``model`` into sub-layer groups.

    :param model: the model, with quantization schemes attached to its targeted linears
    :param linear_names: names of the linears being calibrated
    :return: one group per block, in model order
    """
    balance_sets = [m.balance_layers for m in get_layer_mappings_from_model(model)]
    balance_sets += [m.balance_layers for m in get_smoothquant_mappings_from_model(model)]
    shared_input_sets = [patterns for patterns in balance_sets if len(patterns) > 1]
    members: dict[tuple[int, str], list[str]] = defaultdict(list)
    for name in linear_names:
        set_index = next(
            (i for i, patterns in enumerate(shared_input_sets)
             if any(match_name(name, p) for p in patterns)),
            None,
        )
        parent = name.rsplit(".", 1)[0] if set_index is not None else name
        members[(set_index, parent)].append(name)

    targeted = {model.get_submodule(name) for name in linear_names}
    groups = []
    for names in members.values():
        block_name = names[0]
        if len(names) > 1:
            block_name, _ = get_lowest_common_ancestor_with_avoid(names, model, torch.nn.ModuleList)
        groups.append(_make_group(model, names, block_name, targeted))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(groups, key=lambda g: order[g.block_name])
