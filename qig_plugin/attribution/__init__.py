"""Pure-torch QIG math: integrated gradients, token scores and weights, fake quantization."""

from qig_plugin.attribution.fake_quant import (
    fake_quantize_activation,
    fake_quantize_weight,
)
from qig_plugin.attribution.integrated_gradients import (
    QuadratureRule,
    integrated_gradients,
    quadrature,
)
from qig_plugin.attribution.token_weights import (
    discrepancy,
    linear_token_scores,
    qig_token_scores,
    token_weights,
)

__all__ = [
    "QuadratureRule",
    "discrepancy",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "integrated_gradients",
    "linear_token_scores",
    "qig_token_scores",
    "quadrature",
    "token_weights",
]
