"""``QIGGPTQModifier``: GPTQ whose Hessian weights every calibration token by QIG.

Stock GPTQ accumulates ``H = 2 sum_t x_t x_t^T``; this modifier accumulates
``H = 2 sum_t lambda_t x_t x_t^T``, where ``lambda`` (``[batch, seq]``, mean 1 over each
sample's kept tokens) is the QIG weight computed from the linear's own sub-layer group
(attention for q/k/v, the MLP for gate/up, the linear itself for o_proj/down_proj) on the
same batch, right before that block runs. MoE experts (2-D inputs of routed tokens) are
attributed on the tokens routed to them (:mod:`qig_plugin.modifiers.experts`). Everything else
is stock ``GPTQModifier``.
"""

from functools import partial
from typing import Any, Literal

import torch
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import Event, State
from pydantic import PrivateAttr

from qig_plugin.attribution import block_input
from qig_plugin.modifiers.block_attribution import QIGAttribution
from qig_plugin.modifiers.experts import ExpertRoutingHooks, expert_token_weights, routed_call
from qig_plugin.modifiers.groups import SubLayerGroup, resolve_groups
from qig_plugin.upstream import GPTQSeam

__all__ = ["QIGGPTQModifier"]


class QIGGPTQModifier(QIGAttribution, ExpertRoutingHooks, GPTQSeam):
    """GPTQ with QIG token weights in the Hessian. Takes every ``GPTQModifier`` field, the
    ``qig_*`` fields of :class:`QIGAttribution` (steps, rule, IQR clipping, padding mask), and:

    :param qig_baseline: ``"zero"`` (the reference's weight-only path) or ``"quantized"``:
        the input quantized by the scheme's own dynamic activation quantizer (schemes
        with quantized activations only; llm-compressor's sequential pipeline already
        feeds each layer the quantized network's activations)
    """

    qig_baseline: Literal["zero", "quantized"] = "zero"

    _qig_groups: list[SubLayerGroup] = PrivateAttr(default_factory=list)
    _qig_group_of: dict[torch.nn.Module, SubLayerGroup] = PrivateAttr(default_factory=dict)
    _pending_weights: dict[torch.nn.Module, torch.Tensor] = PrivateAttr(default_factory=dict)

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        super().on_calibration_start(state, event, **kwargs)
        schemes = {
            name: module.quantization_scheme
            for name, module in match_named_modules(state.model, self.resolved_targets, self.ignore)
            if isinstance(module, torch.nn.Linear) and self.calibrated_module_name(module) is not None
        }
        self._qig_groups = resolve_groups(state.model, schemes)
        self._qig_group_of = {linear: group for group in self._qig_groups for linear in group.linears}
        if self.qig_baseline == "quantized":
            weight_only = [g.block_name for g in self._qig_groups if g.input_args is None]
            if weight_only:
                raise ValueError(
                    f"qig_baseline='quantized' needs a scheme that quantizes activations, but "
                    f"{weight_only[0]} is weight-only (its quantized input equals its input); "
                    "use qig_baseline: zero"
                )
        self.start_expert_routing(state.model)
        for group in self._qig_groups:
            self.register_hook(
                group.block, partial(self._attribute_group, group), "forward_pre", with_kwargs=True
            )

    def calibrate_module(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...], _output):
        """Scale the input rows by ``sqrt(lambda_t)`` so GPTQ's ``x x^T`` becomes ``lambda x x^T``.

        ``lambda`` is ``[batch, seq]`` for ``[batch, seq, features]`` inputs, ``[rows]`` for an expert's ``[rows, features]``.
        """
        weights = self._pending_weights.pop(module, None)
        if weights is None and args[0].ndim == 3 and module in self._qig_group_of:
            raise ValueError(
                f"QIG could not place {self.calibrated_module_name(module) or type(module).__name__}: it ran on a "
                f"[batch, seq, features] input without its sub-layer group's block "
                f"({self._qig_group_of[module].block_name}) running first on this batch, so it has no token "
                "weights (the model calls it outside that block, or twice per block call). Quantize it with a "
                "stock GPTQModifier: add it to this QIGGPTQModifier's ignore list and target it in a GPTQModifier"
            )
        if weights is not None:
            inp = args[0]
            inp = inp.float() * weights.to(inp.device).sqrt().unsqueeze(-1)
            args = (inp, *args[1:])
        return super().calibrate_module(module, args, _output)

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        super().on_calibration_end(state, event, **kwargs)
        self._pending_weights.clear()
        self._qig_token_mask = None
        self.stop_expert_routing()
        self._qig_group_of.clear()

    def group_weights(
        self, group: SubLayerGroup, args: tuple, kwargs: dict[str, Any]
    ) -> dict[torch.nn.Module, torch.Tensor]:
        """Token weights of each linear of ``group`` on one call of its block (empty when it has none).

        :return: ``[batch, seq]`` weights for a ``[batch, seq, hidden]`` block input, ``[rows]`` for an
            expert's ``[rows, hidden]`` input
        """
        position, block_in = block_input(args, kwargs)
        block = group.block
        baseline_args = None if self.qig_baseline == "zero" else group.input_args
        if block_in.ndim == 2 and self.expert_routing.is_expert(block):
            route = self.expert_routing.route(block, block_in.shape[0])
            if route is None:
                return {}
            routed_args, routed_kwargs = routed_call(args, kwargs, position, route)
            scores = self.qig_scores(
                block, group.weight_args, routed_args, routed_kwargs, baseline_args, group.linears
            )
            weights = expert_token_weights(scores, route, self.iqr_multiplier)
        elif block_in.ndim == 3:
            keep = self.token_mask(block_in, kwargs)
            scores = self.qig_scores(block, group.weight_args, args, kwargs, baseline_args, group.linears)
            weights = self.qig_weights(scores, keep)
        else:
            return {}
        return dict.fromkeys(group.linears, weights)

    # forward pre-hook of a group's block: lambda for its linears on this batch, until they calibrate
    def _attribute_group(self, group: SubLayerGroup, _block, args: tuple, kwargs: dict[str, Any]):
        self._pending_weights.update(self.group_weights(group, args, kwargs))
