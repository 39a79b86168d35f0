"""Pure-torch QIG math: integrated gradients, token scores and weights, fake quantization, and
:func:`attribute_block`, the one block-attribution entry point the modifiers, ``qig explain`` and
the benchmarks share."""

from qig_plugin.attribution.block import (
    AttributionCache,
    BlockAttribution,
    attribute_block,
    block_discrepancy,
    block_input,
    is_token_wise,
    linear_weights,
)
from qig_plugin.attribution.fake_quant import (
    fake_quantize_activation,
    fake_quantize_weight,
)
from qig_plugin.attribution.integrated_gradients import (
    QuadratureRule,
    integrated_gradients,
    quadrature,
)
from qig_plugin.attribution.settings import QIGSettings, settings_of
from qig_plugin.attribution.token_weights import (
    TokenScores,
    calibration_token_weights,
    discrepancy,
    linear_token_scores,
    qig_token_scores,
    token_weights,
)

__all__ = [
    "AttributionCache",
    "BlockAttribution",
    "QIGSettings",
    "QuadratureRule",
    "TokenScores",
    "attribute_block",
    "block_discrepancy",
    "block_input",
    "calibration_token_weights",
    "discrepancy",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "integrated_gradients",
    "is_token_wise",
    "linear_token_scores",
    "linear_weights",
    "qig_token_scores",
    "quadrature",
    "settings_of",
    "token_weights",
]
