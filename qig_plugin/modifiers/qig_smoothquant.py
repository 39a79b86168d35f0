"""``QIGSmoothQuantModifier``: SmoothQuant whose activation ranges weight every token by QIG.

Stock SmoothQuant keeps, per smooth layer (the norm before q/k/v or gate/up), the running
per-channel min and max of its output over every calibration token, and sets the
smoothing scale ``s_j = range_j^alpha / max|W_j|^(1 - alpha)`` from ``range = max - min``.
Here each batch's output is first scaled token-wise by ``lambda_t / max_t lambda_t``, the
relative QIG weight computed through the balance layers' parent block (attention for
q/k/v, the MLP for gate/up) on that batch, and padding is left out of the min and max
(see :func:`~qig_plugin.attribution.weighted_calibration.weighted_channel_range` for why
a weighted abs-max). The smoothing itself, and the GPTQ stage after it, are stock, except
that distributed every rank reads the unsmoothed weights before any rank writes the smoothed
ones (:class:`~qig_plugin.upstream.SmoothQuantSeam`).
"""

from functools import partial
from typing import Any

import torch
from llmcompressor.core import Event, State
from llmcompressor.utils.pytorch.module import get_module_to_name_dict
from pydantic import PrivateAttr

from qig_plugin.attribution import block_input
from qig_plugin.attribution.weighted_calibration import weighted_channel_range
from qig_plugin.modifiers.block_attribution import QIGAttribution, quantized_linears
from qig_plugin.modifiers.language_model import language_model_name, scope_to_language_model
from qig_plugin.upstream import (
    SmoothQuantScale,
    SmoothQuantSeam,
    get_lowest_common_ancestor_with_avoid,
    smoothquant_mappings_of,
)

__all__ = ["QIGSmoothQuantModifier"]


class QIGSmoothQuantModifier(QIGAttribution, SmoothQuantSeam):
    """SmoothQuant with QIG-weighted activation ranges. Takes every ``SmoothQuantModifier``
    field and the ``qig_*`` fields of
    :class:`~qig_plugin.modifiers.block_attribution.QIGAttribution`.

    Without ``mappings``, the model's default SmoothQuant mappings are scoped to its
    language model, so a VLM's vision tower never matches. ``Q(W)`` in the attribution
    uses the weight scheme of the quantization stage that must follow (GPTQ or
    QIG-GPTQ); the path starts at zero.
    """

    # per smooth layer: its output [batch, seq, hidden] on the current batch, until the
    # parent block's pre-hook (which runs right after) weights it
    _held_outputs: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)

    def default_mappings(self, model: torch.nn.Module) -> list:
        """Stock SmoothQuant's mappings for ``model``, scoped to its language model."""
        prefix = language_model_name(model)
        return [
            [[scope_to_language_model(b, prefix) for b in m.balance_layers],
             scope_to_language_model(m.smooth_layers, prefix)]
            for m in smoothquant_mappings_of(model)
        ]

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        """Replaces stock's unweighted min/max hooks with the hold-then-weight pair."""
        names = get_module_to_name_dict(state.model)
        for mapping in self.resolved_mappings_:
            balance_names = [names[layer] for layer in mapping.balance_layers]
            _, parent = get_lowest_common_ancestor_with_avoid(balance_names, state.model, torch.nn.ModuleList)
            self.register_hook(mapping.smooth_layer, partial(self._hold_output, mapping.smooth_name), "forward")
            self.register_hook(
                parent,
                partial(self._update_weighted_range, mapping.smooth_name, mapping.balance_layers),
                "forward_pre",
                with_kwargs=True,
            )

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        super().on_calibration_end(state, event, **kwargs)
        self._held_outputs.clear()
        self._qig_token_mask = None

    def _hold_output(self, smooth_name: str, _module, _args, output):
        self._held_outputs[smooth_name] = (output[0] if isinstance(output, tuple) else output).detach()

    def _update_weighted_range(
        self, smooth_name: str, balance_layers: list, block: torch.nn.Module, args: tuple, kwargs: dict[str, Any]
    ):
        output = self._held_outputs.pop(smooth_name)
        _, block_in = block_input(args, kwargs)
        keep = self.token_mask(block_in, kwargs)
        scores = self.qig_scores(block, quantized_linears(block), args, kwargs, input_linears=balance_layers)
        weights = self.qig_weights(scores, keep)
        low, high = weighted_channel_range(output, weights, keep)
        if smooth_name in self.scales_:
            scale = self.scales_[smooth_name]
            scale.min_channel_vals = torch.minimum(scale.min_channel_vals, low)
            scale.max_channel_vals = torch.maximum(scale.max_channel_vals, high)
        else:
            self.scales_[smooth_name] = SmoothQuantScale(min_channel_vals=low, max_channel_vals=high)
