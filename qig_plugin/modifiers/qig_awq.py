"""``QIGAWQModifier``: AWQ whose scale search weights every calibration token by QIG.

For each mapping (input-norm -> q/k/v, v -> o where shapes allow, post-norm -> gate/up,
up -> down) the QIG weight ``lambda`` (``[batch, seq]``, mean 1 over each sample's kept
tokens) is computed through the mapping's parent block (attention, the MLP, or the
balance linear itself) on every cached calibration batch, right before that mapping's
grid search, and the search minimizes ``sum_t lambda_t e_t / sum_t lambda_t``. On MoE
decoders, an expert's up -> down mapping weights the rows of its routed tokens by their QIG
score through the expert times their routing weight (:mod:`qig_plugin.modifiers.experts`).
"""

from functools import partial

import torch

from qig_plugin.attribution import block_input
from qig_plugin.modifiers.block_attribution import QIGAttribution, quantized_linears
from qig_plugin.modifiers.experts import expert_token_weights, routed_call
from qig_plugin.modifiers.weighted_awq import TokenWeightedAWQModifier
from qig_plugin.upstream import ResolvedMapping

__all__ = ["QIGAWQModifier"]


class QIGAWQModifier(QIGAttribution, TokenWeightedAWQModifier):
    """AWQ with QIG token weights in the search loss. Takes every ``AWQModifier`` field,
    ``loss_mode`` (``"mae"`` default, as the QIG reference, or ``"mse"``) and the ``qig_*``
    fields of :class:`~qig_plugin.modifiers.block_attribution.QIGAttribution`.

    ``Q(W)`` in the attribution quantizes every targeted linear of the parent block with
    the following quantization stage's weight scheme (RTN); the path starts at zero (the
    reference's weight-only baseline; AWQ's own search quantizes weights only).
    Needs a ``QuantizationModifier`` or ``GPTQModifier`` after it, like stock AWQ.
    """

    def mapping_token_weights(
        self, mapping: ResolvedMapping, keeps: list[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        attribute = partial(
            self.qig_scores, mapping.parent, quantized_linears(mapping.parent), input_linears=mapping.balance_layers
        )
        batches = self.cached_parent_calls(mapping)
        if len(batches) != len(keeps):
            raise RuntimeError(
                f"{mapping.parent_name}: {len(batches)} cached batches but {len(keeps)} token masks"
            )
        routes = self._expert_routes.pop(mapping.parent, None)
        if routes is None:
            return [self.qig_weights(attribute((), kwargs), keep) for kwargs, keep in zip(batches, keeps)]
        weights = []
        for kwargs, route in zip(batches, routes):
            position, _ = block_input((), kwargs)
            routed_args, routed_kwargs = routed_call((), kwargs, position, route)
            weights.append(expert_token_weights(attribute(routed_args, routed_kwargs), route, self.iqr_multiplier))
        return weights
