"""``QIGGPTQModifier``: GPTQ whose Hessian weights every calibration token by QIG.

Stock GPTQ accumulates ``H = 2 sum_t x_t x_t^T``; this modifier accumulates
``H = 2 sum_t lambda_t x_t x_t^T``, where ``lambda`` (``[batch, seq]``, mean 1 over each
sample's kept tokens) is the QIG weight computed from the linear's own sub-layer group
(attention for q/k/v, the MLP for gate/up, the linear itself for o_proj/down_proj) on the
same batch, right before that block runs. Everything else is stock ``GPTQModifier``.
"""

from functools import partial
from typing import Any, Literal

import torch
from compressed_tensors.utils import match_named_modules
from llmcompressor.core import Event, State
from llmcompressor.modifiers.gptq import GPTQModifier
from pydantic import PrivateAttr

from qig_plugin.modifiers.block_attribution import QIGAttribution, block_input
from qig_plugin.modifiers.groups import SubLayerGroup, resolve_groups

__all__ = ["QIGGPTQModifier"]


class QIGGPTQModifier(QIGAttribution, GPTQModifier):
    """GPTQ with QIG token weights in the Hessian. Takes every ``GPTQModifier`` field, the
    ``qig_*`` fields of :class:`QIGAttribution` (steps, rule, IQR clipping, padding mask), and:

    :param qig_baseline: ``"zero"`` (the reference's weight-only path) or ``"quantized"``:
        the input quantized by the scheme's own dynamic activation quantizer (schemes
        with quantized activations only; llm-compressor's sequential pipeline already
        feeds each layer the quantized network's activations)
    """

    qig_baseline: Literal["zero", "quantized"] = "zero"

    _qig_groups: list[SubLayerGroup] = PrivateAttr(default_factory=list)
    _qig_weights: dict[torch.nn.Module, torch.Tensor] = PrivateAttr(default_factory=dict)

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        super().on_calibration_start(state, event, **kwargs)
        names = [
            name
            for name, module in match_named_modules(state.model, self.resolved_targets, self.ignore)
            if isinstance(module, torch.nn.Linear) and module in self._module_names
        ]
        self._qig_groups = resolve_groups(state.model, names)
        if self.qig_baseline == "quantized":
            weight_only = [g.block_name for g in self._qig_groups if g.input_args is None]
            if weight_only:
                raise ValueError(
                    f"qig_baseline='quantized' needs a scheme that quantizes activations, but "
                    f"{weight_only[0]} is weight-only (its quantized input equals its input); "
                    "use qig_baseline: zero"
                )
        for group in self._qig_groups:
            self.register_hook(
                group.block, partial(self._attribute_group, group), "forward_pre", with_kwargs=True
            )

    def calibrate_module(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...], _output):
        """Scale the input rows by ``sqrt(lambda_t)`` so GPTQ's ``x x^T`` becomes ``lambda x x^T``."""
        weights = self._qig_weights.pop(module, None)
        if weights is not None:
            inp = args[0]
            inp = inp.float() * weights.to(inp.device).sqrt().unsqueeze(-1)
            args = (inp, *args[1:])
        return super().calibrate_module(module, args, _output)

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        super().on_calibration_end(state, event, **kwargs)
        self._qig_weights.clear()
        self._qig_token_mask = None

    # forward pre-hook of a group's block: compute lambda for its linears on this batch
    def _attribute_group(self, group: SubLayerGroup, block, args: tuple, kwargs: dict[str, Any]):
        _, block_in = block_input(args, kwargs)
        if block_in.ndim != 3:
            return
        keep = self._token_mask(block_in, kwargs)
        baseline_args = None if self.qig_baseline == "zero" else group.input_args
        scores = self._block_scores(block, group.weight_args, args, kwargs, baseline_args)
        weights = self._token_weights(scores, keep)
        for linear in group.linears:
            self._qig_weights[linear] = weights
