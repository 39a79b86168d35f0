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
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from compressed_tensors.utils import match_name, match_named_modules

from qig_plugin.upstream import awq_mappings_of, get_lowest_common_ancestor_with_avoid, smoothquant_mappings_of


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
    model: torch.nn.Module, names: list[str], block_name: str, schemes: dict[torch.nn.Module, QuantizationScheme]
) -> SubLayerGroup:
    block = model.get_submodule(block_name)
    linears = [model.get_submodule(name) for name in names]
    return SubLayerGroup(
        block=block,
        block_name=block_name,
        linears=linears,
        weight_args={m: schemes[m].weights for m in block.modules() if m in schemes},
        input_args=schemes[linears[0]].input_activations,
    )


def resolve_groups(model: torch.nn.Module, schemes: dict[str, QuantizationScheme]) -> list[SubLayerGroup]:
    """Partition the targeted linears of ``model`` into sub-layer groups.

    :param model: the model
    :param schemes: name of each linear being calibrated -> its quantization scheme (the one
        attached to it in calibration, or the one a recipe would attach)
    :return: one group per block, in model order
    """
    linear_names = list(schemes)
    balance_sets = [m.balance_layers for m in awq_mappings_of(model)]
    balance_sets += [m.balance_layers for m in smoothquant_mappings_of(model)]
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

    targeted = {model.get_submodule(name): scheme for name, scheme in schemes.items()}
    groups = []
    for names in members.values():
        block_name = names[0]
        if len(names) > 1:
            block_name, _ = get_lowest_common_ancestor_with_avoid(names, model, torch.nn.ModuleList)
        groups.append(_make_group(model, names, block_name, targeted))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(groups, key=lambda g: order[g.block_name])


def targeted_linears(model: torch.nn.Module, config: QuantizationConfig) -> dict[str, QuantizationScheme]:
    """The linears a quantization config targets -> their scheme, without attaching anything to ``model``.

    :param config: e.g. a quantizing modifier's ``resolve_quantization_config()``; its ``ignore`` applies
    """
    schemes = {}
    for scheme in config.config_groups.values():
        for name, module in match_named_modules(model, scheme.targets, config.ignore or []):
            if isinstance(module, torch.nn.Linear) and scheme.weights is not None:
                schemes.setdefault(name, scheme)
    return schemes
