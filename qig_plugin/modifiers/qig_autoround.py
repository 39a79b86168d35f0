"""``QIGAutoRoundModifier``: AutoRound whose block reconstruction loss weights every calibration token by QIG.

Stock AutoRound tunes each decoder layer's rounding offsets and clipping by signed gradient descent on
``mean_t ||f(x_t; W) - f(x_t; Q_r(W))||^2`` over the layer's cached calibration tokens. This modifier
minimizes ``mean_t lambda_t ||...||^2`` instead, where ``lambda`` (``[batch, seq]``, mean 1 over each
sample's kept tokens, 0 on padding) is the mean of the QIG weights of the layer's sub-layer groups
(attention for q/k/v, the MLP for gate/up, o_proj and down_proj alone; the same groups and attribution as
QIG-GPTQ), computed on every calibration batch as the pipeline runs the layer, before AutoRound tunes it.
Everything else is stock ``AutoRoundModifier``.
"""

from functools import partial
from typing import Any

import torch
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import Event, State
from pydantic import PrivateAttr

from qig_plugin.attribution import block_input
from qig_plugin.modifiers.block_attribution import QIGAttribution
from qig_plugin.modifiers.groups import SubLayerGroup, resolve_groups
from qig_plugin.upstream import AutoRoundSeam

__all__ = ["QIGAutoRoundModifier"]


class QIGAutoRoundModifier(QIGAttribution, AutoRoundSeam):
    """AutoRound with QIG token weights in its block loss. Takes every ``AutoRoundModifier`` field and the
    ``qig_*`` fields of :class:`~qig_plugin.modifiers.block_attribution.QIGAttribution`. ``Q(W)`` in the
    attribution is the scheme's round-to-nearest; the path starts at zero.

    Sample yaml::

        quant_stage:
          quant_modifiers:
            QIGAutoRoundModifier:
              targets: [Linear]
              ignore: ["re:.*lm_head", "re:.*vision_model.*", "re:.*connector.*"]
              scheme: W4A16
              iters: 200
              enable_torch_compile: false
    """

    _qig_groups_of_layer: dict[torch.nn.Module, list[SubLayerGroup]] = PrivateAttr(default_factory=dict)
    # per decoder layer, per group of it: the [batch, seq] weights of each calibration batch so far
    _layer_batch_weights: dict[torch.nn.Module, list[list[torch.Tensor]]] = PrivateAttr(default_factory=dict)

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        super().on_calibration_start(state, event, **kwargs)
        schemes = {
            name: module.quantization_scheme
            for name, module in match_named_modules(state.model, self.resolved_targets, self.ignore)
            if isinstance(module, torch.nn.Linear) and getattr(module, "quantization_scheme", None) is not None
        }
        layers = {name: module for name, module in state.model.named_modules() if self.is_decoding_layer(module)}
        for group in resolve_groups(state.model, schemes):
            layer = next((m for name, m in layers.items() if group.block_name.startswith(f"{name}.")), None)
            if layer is None:
                continue  # a linear outside every decoder layer: AutoRound does not tune it
            groups = self._qig_groups_of_layer.setdefault(layer, [])
            self.register_hook(
                group.block, partial(self._attribute_group, layer, len(groups), group), "forward_pre", with_kwargs=True
            )
            groups.append(group)

    def tuning_token_weights(self, decoding_layer: torch.nn.Module) -> list[torch.Tensor] | None:
        """Per calibration batch of ``decoding_layer``: the mean of its groups' QIG weights ``[batch, seq]``."""
        per_group = self._layer_batch_weights.pop(decoding_layer, None)
        if not per_group:
            return None
        return [torch.stack(batch).mean(dim=0) for batch in zip(*per_group, strict=True)]

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        super().on_calibration_end(state, event, **kwargs)
        self._layer_batch_weights.clear()
        self._qig_groups_of_layer.clear()
        self._qig_token_mask = None

    # forward pre-hook of a group's block during the calibration pass: that batch's weights, kept for tuning
    def _attribute_group(self, layer: torch.nn.Module, index: int, group: SubLayerGroup, _block, args: tuple,
                         kwargs: dict[str, Any]):
        block_in = block_input(args, kwargs)[1]
        scores = self.qig_scores(group.block, group.weight_args, args, kwargs, input_linears=group.linears)
        weights = self.qig_weights(scores, self.token_mask(block_in, kwargs))
        per_group = self._layer_batch_weights.setdefault(
            layer, [[] for _ in self._qig_groups_of_layer[layer]]
        )
        per_group[index].append(weights.detach().cpu())
