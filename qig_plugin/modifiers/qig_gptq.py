"""``QIGGPTQModifier``: GPTQ whose Hessian weights every calibration token by QIG.

Stock GPTQ accumulates ``H = 2 sum_t x_t x_t^T``; this modifier accumulates
``H = 2 sum_t lambda_t x_t x_t^T``, where ``lambda`` (``[batch, seq]``, mean 1 over each
sample's kept tokens) is the QIG weight computed from the linear's own sub-layer group
(attention for q/k/v, the MLP for gate/up, the linear itself for o_proj/down_proj) on the
same batch, right before that block runs. Everything else is stock ``GPTQModifier``.
"""

from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

import torch
from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.utils.hooks import HooksMixin
from compressed_tensors.utils import match_named_modules
from pydantic import Field, PrivateAttr

from qig_plugin.attribution import (
    QuadratureRule,
    fake_quantize_activation,
    fake_quantize_weight,
    qig_token_scores,
    token_weights,
)
from qig_plugin.modifiers.groups import SubLayerGroup, resolve_groups

__all__ = ["QIGGPTQModifier"]


class QIGGPTQModifier(GPTQModifier):
    """GPTQ with QIG token weights in the Hessian. Takes every ``GPTQModifier`` field, plus:

    :param qig_steps: quadrature nodes of the path integral for attention/MLP blocks.
        Single-linear groups with a zero baseline use one node: their objective is
        positively homogeneous of degree 1, so one gradient is exact.
    :param qig_rule: ``"gauss_legendre"`` (default) or ``"uniform"`` (the reference's
        mean over ``linspace(0, 1, steps)``)
    :param qig_baseline: ``"zero"`` (the reference's weight-only path) or ``"quantized"``:
        the input quantized by the scheme's own dynamic activation quantizer (schemes
        with quantized activations only; llm-compressor's sequential pipeline already
        feeds each layer the quantized network's activations)
    :param qig_iqr_clip: clip each sample's weights to ``[Q1 - k IQR, Q3 + k IQR]``
    :param qig_iqr_k: the IQR multiplier ``k``
    :param qig_mask_padding: give weight 0 to padding (keys a token cannot attend to
        itself in the attention mask) and to tokens whose ``loss_mask`` is 0 when
        ``oneshot(..., use_loss_mask=True)``
    :param qig_points_per_pass: path points evaluated together in one block pass
    """

    qig_steps: int = Field(default=8, ge=1)
    qig_rule: QuadratureRule = "gauss_legendre"
    qig_baseline: Literal["zero", "quantized"] = "zero"
    qig_iqr_clip: bool = True
    qig_iqr_k: float = Field(default=1.5, ge=0)
    qig_mask_padding: bool = True
    qig_points_per_pass: int = Field(default=1, ge=1)

    _qig_groups: list[SubLayerGroup] = PrivateAttr(default_factory=list)
    _qig_weights: dict[torch.nn.Module, torch.Tensor] = PrivateAttr(default_factory=dict)
    _qig_token_mask: torch.Tensor | None = PrivateAttr(default=None)

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
        position, block_input = _block_input(args, kwargs)
        if block_input.ndim != 3:
            return
        keep = self._token_mask(block_input, kwargs)
        scores = self._scores(group, block, position, args, kwargs, block_input)
        weights = self._token_weights(scores, keep)
        for linear in group.linears:
            self._qig_weights[linear] = weights

    # lambda [batch, seq] with mean 1 over each sample's kept tokens, as stock GPTQ counts them
    def _token_weights(self, scores: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        kept_tokens = keep.sum(dim=-1, keepdim=True) if keep is not None else scores.shape[-1]
        iqr_k = self.qig_iqr_k if self.qig_iqr_clip else None
        return token_weights(scores, keep, iqr_k) * kept_tokens

    # QIG scores [batch, seq] of the block input, with hooks off and gradients on
    def _scores(self, group, block, position, args, kwargs, block_input) -> torch.Tensor:
        x = block_input.detach().float()
        block_linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
        fp_weights = {m: m.weight.detach().float() for m in block_linears}
        q_weights = {m: fake_quantize_weight(m.weight, a) for m, a in group.weight_args.items()}
        q_weights = {**fp_weights, **q_weights}
        float_args, float_kwargs = _to_float(args), _to_float(kwargs)
        batch = x.shape[0]

        def run(weights, points):
            repeats = points.shape[0] // batch
            call_args, call_kwargs = _repeat_batch((float_args, float_kwargs), batch, repeats)
            call_args, call_kwargs = _with_input(call_args, call_kwargs, position, points)
            with _linear_weights(weights):
                output = block(*call_args, **call_kwargs)
            return output[0] if isinstance(output, tuple) else output

        zero_baseline = self.qig_baseline == "zero"
        baseline = None if zero_baseline else fake_quantize_activation(x, group.input_args)
        steps = 1 if (zero_baseline and group.is_single_linear) else self.qig_steps
        with torch.enable_grad(), HooksMixin.disable_hooks():
            return qig_token_scores(
                partial(run, fp_weights),
                partial(run, q_weights),
                x,
                baseline,
                steps=steps,
                rule=self.qig_rule,
                points_per_pass=self.qig_points_per_pass,
            )

    # tokens that count [batch, seq] (None: all), from loss_mask and the attention mask
    def _token_mask(self, block_input: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor | None:
        if not self.qig_mask_padding:
            return None
        shape = block_input.shape[:2]
        attention_mask = kwargs.get("attention_mask")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 4:
            self._qig_token_mask = _attendable_tokens(attention_mask)
        keep = self._qig_token_mask if _has_shape(self._qig_token_mask, shape) else None
        state = active_session().state
        if state.loss_masks is not None and 0 <= state.current_batch_idx < len(state.loss_masks):
            loss_mask = state.loss_masks[state.current_batch_idx]
            if _has_shape(loss_mask, shape):
                loss_keep = loss_mask.to(block_input.device) != 0
                keep = loss_keep if keep is None else keep & loss_keep
        return keep


# run each linear with the given float32 weight: no parameter is touched, so neither the
# model nor the tensors autograd saved change (offloading and compressed-tensors' wrapped
# forwards reassign parameter data); the previous forwards come back on exit
@contextmanager
def _linear_weights(weights: dict[torch.nn.Linear, torch.Tensor]):
    previous = {m: m.__dict__.get("forward") for m in weights}
    for module, weight in weights.items():
        bias = None if module.bias is None else module.bias.detach().float()
        module.forward = partial(torch.nn.functional.linear, weight=weight, bias=bias)
    try:
        yield
    finally:
        for module, forward in previous.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _has_shape(tensor: torch.Tensor | None, shape: torch.Size) -> bool:
    return isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == tuple(shape)


# a token is real if it may attend to itself: the diagonal of a [batch, 1, q, k] mask
def _attendable_tokens(attention_mask: torch.Tensor) -> torch.Tensor:
    diagonal = attention_mask[:, 0].diagonal(dim1=-2, dim2=-1)
    if attention_mask.dtype == torch.bool:
        return diagonal
    return diagonal == 0


# the block's main input: its first positional argument, else its first tensor keyword
def _block_input(args: tuple, kwargs: dict[str, Any]) -> tuple[int | str, torch.Tensor]:
    if args and isinstance(args[0], torch.Tensor):
        return 0, args[0]
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return key, value
    raise ValueError("QIG could not find the block input among the block's arguments")


def _with_input(args: tuple, kwargs: dict, position: int | str, value: torch.Tensor):
    if isinstance(position, int):
        return (value, *args[1:]), kwargs
    return args, {**kwargs, position: value}


# floating tensors to float32 (the discrepancy is a small difference of large outputs)
def _to_float(tree):
    return _map_tensors(tree, lambda t: t.detach().float() if t.is_floating_point() else t)


# tile batch-leading tensors `repeats` times along dim 0 (path points stacked on the batch)
def _repeat_batch(tree, batch: int, repeats: int):
    if repeats == 1:
        return tree
    return _map_tensors(
        tree,
        lambda t: t.repeat(repeats, *([1] * (t.ndim - 1))) if t.ndim and t.shape[0] == batch else t,
    )


def _map_tensors(tree, fn):
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, tuple):
        return tuple(_map_tensors(item, fn) for item in tree)
    if isinstance(tree, list):
        return [_map_tensors(item, fn) for item in tree]
    if isinstance(tree, dict):
        return {key: _map_tensors(value, fn) for key, value in tree.items()}
    return tree
