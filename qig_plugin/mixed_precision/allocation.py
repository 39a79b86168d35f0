"""Which weight width each unit of linears gets under an average-bits budget. Pure Python; no torch.

A unit is a set of linears that must share one width because vLLM fuses them into one kernel call
(q/k/v, gate/up) or a linear alone (o_proj, down_proj). Each unit has a cost at each candidate width
(its sensitivity: how much quantizing it to that width hurts); :func:`allocate_widths` picks the widths
that keep the total cost low with the average bits per weight at or below the budget.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["QuantUnit", "allocate_widths", "average_bits", "check_budget"]


@dataclass(frozen=True)
class QuantUnit:
    """Linears quantized to one width.

    :param name: the unit's name, e.g. ``model.layers.3.self_attn.qkv`` for q/k/v
    :param linears: the full names of its linears in the model
    :param weights: the number of weights (parameters of the linears' weight matrices)
    """

    name: str
    linears: tuple[str, ...]
    weights: int


def average_bits(units: Sequence[QuantUnit], widths: Mapping[str, int]) -> float:
    """Weight bits per weight of ``units`` at ``widths`` (unit name -> bits), scales and zero points not counted."""
    total = sum(unit.weights for unit in units)
    return sum(unit.weights * widths[unit.name] for unit in units) / total


def check_budget(budget_bits: float, candidates: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``budget_bits`` is a number at or above the narrowest candidate width."""
    if math.isnan(budget_bits) or budget_bits < min(candidates):
        raise ValueError(
            f"budget of {budget_bits} bits per weight is below the narrowest candidate width ({min(candidates)} bits); "
            f"ask for at least {min(candidates)}, or add a narrower width"
        )


def allocate_widths(
    units: Sequence[QuantUnit], costs: Mapping[str, Mapping[int, float]], budget_bits: float
) -> dict[str, int]:
    """Unit name -> width, with ``average_bits`` at most ``budget_bits``.

    Greedy on the marginal cost: every unit starts at its widest candidate; then, while the average is above
    the budget, the unit whose next narrower width adds the least cost per weight bit saved narrows by one
    step. With costs convex in the width this is the optimum of the relaxed problem (a Lagrangian solution).

    :param costs: unit name -> {width: cost}; every unit has the same candidate widths
    :raises ValueError: the budget is below the narrowest width or not a number, a unit has no costs, or
        the units have different candidate widths
    """
    if not units:
        raise ValueError("no units to allocate widths to: the model has no quantized linears")
    missing = [unit.name for unit in units if unit.name not in costs]
    if missing:
        raise ValueError(f"no sensitivity for {missing[0]} (and {len(missing) - 1} more units)")
    candidates = sorted(costs[units[0].name])
    if any(sorted(costs[unit.name]) != candidates for unit in units):
        raise ValueError("every unit needs a cost at the same candidate widths")
    check_budget(budget_bits, candidates)
    widths = {unit.name: candidates[-1] for unit in units}
    total = sum(unit.weights for unit in units)
    spent = sum(unit.weights * widths[unit.name] for unit in units)
    while spent > budget_bits * total:
        best, best_rate = None, None
        for unit in units:
            index = candidates.index(widths[unit.name])
            if index == 0:
                continue
            narrower = candidates[index - 1]
            added = costs[unit.name][narrower] - costs[unit.name][widths[unit.name]]
            rate = added / (unit.weights * (widths[unit.name] - narrower))
            if best_rate is None or rate < best_rate:
                best, best_rate = unit, rate
        step = candidates[candidates.index(widths[best.name]) - 1]
        spent -= best.weights * (widths[best.name] - step)
        widths[best.name] = step
    return widths
