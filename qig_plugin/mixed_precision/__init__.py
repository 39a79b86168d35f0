"""Layer-wise mixed precision: QIG (or LUQ's activation entropy) chooses which linears get fewer bits."""

from qig_plugin.mixed_precision.allocation import (
    QuantUnit,
    allocate_widths,
    average_bits,
    check_budget,
)
from qig_plugin.mixed_precision.plan import (
    MixedPrecisionPlan,
    Sensitivity,
    plan_mixed_precision,
    quant_units,
)

__all__ = [
    "MixedPrecisionPlan",
    "QuantUnit",
    "Sensitivity",
    "allocate_widths",
    "average_bits",
    "check_budget",
    "plan_mixed_precision",
    "quant_units",
]
