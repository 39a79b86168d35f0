"""QIG token weights of one block's input, shared by every QIG modifier.

``QIGAttribution`` is a pydantic mixin: its ``qig_*`` fields become recipe fields of the
modifier that inherits it, and its methods turn one batch of a block's inputs into QIG
token weights ``lambda`` (``[batch, seq]``, mean 1 over each sample's kept tokens). The
modifiers differ only in where they read the block inputs (a forward pre-hook for GPTQ
and SmoothQuant, AWQ's cached parent kwargs) and in what they weight with ``lambda``.
"""

from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any
from weakref import WeakKeyDictionary

import torch
from compressed_tensors.quantization import QuantizationArgs
from llmcompressor.core import active_session
from llmcompressor.modifiers.utils.hooks import HooksMixin
from pydantic import BaseModel, Field, PrivateAttr

from qig_plugin.attribution import (
    QuadratureRule,
    fake_quantize_activation,
    fake_quantize_weight,
    linear_token_scores,
    qig_token_scores,
    token_weights,
)

# batches in a row a block must pass the completeness check with one node count before it takes
# that count unchecked (the check's forward of both branches at both path ends is ~15-20% of a batch)
_CHECKED_BATCHES = 2
# linears whose Q(W) stays cached: the 7 of a dense decoder layer (an MoE layer has more and rebuilds them)
_QUANTIZED_WEIGHTS_KEPT = 8

__all__ = ["QIGAttribution", "TokenMasking", "attendable_tokens", "block_input", "quantized_linears"]


class TokenMasking(BaseModel):
    """Which tokens of a batch count: pydantic mixin reading padding and ``loss_mask``."""

    # the last [batch, seq] token mask read from a 4-D attention mask (the decoder layer's
    # blocks after attention, e.g. the MLP, see no attention mask of their own)
    _qig_token_mask: torch.Tensor | None = PrivateAttr(default=None)

    # tokens that count [batch, seq] (None: all), from loss_mask and the attention mask
    def _token_mask(self, block_in: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor | None:
        shape = block_in.shape[:2]
        attention_mask = kwargs.get("attention_mask")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 4:
            self._qig_token_mask = attendable_tokens(attention_mask)
        keep = self._qig_token_mask if _has_shape(self._qig_token_mask, shape) else None
        state = active_session().state
        if state.loss_masks is not None and 0 <= state.current_batch_idx < len(state.loss_masks):
            loss_mask = state.loss_masks[state.current_batch_idx]
            if _has_shape(loss_mask, shape):
                loss_keep = loss_mask.to(block_in.device) != 0
                keep = loss_keep if keep is None else keep & loss_keep
        return keep


class QIGAttribution(TokenMasking):
    """QIG fields and token-weight computation, mixed into llm-compressor modifiers.

    :param qig_steps: the most quadrature nodes of the path integral for attention/MLP
        blocks. 6 Gauss-Legendre nodes keep completeness within 0.1% and the token
        ranking at Spearman >= 0.9996 of a 256-node reference on the default model's
        blocks (benchmarks/attribution_fidelity.py); the reference release's 32 uniform
        points are off by up to 3.8%. Single-linear blocks with a zero baseline take
        none: their objective is positively homogeneous of degree 1, so ``x * grad`` at
        ``x`` is exact, in closed form (:func:`linear_token_scores`).
    :param qig_min_steps: nodes tried first; the result is kept when its completeness
        error is within ``qig_completeness_tol``, else the block is retaken with half again
        as many nodes (2, 3, 4, 6) up to ``qig_steps``. Each block starts from the count
        that last passed (MLPs pass with 2 nodes, most attention blocks with 3), and once a
        count has passed on 2 batches in a row the block keeps it without the check
    :param qig_completeness_tol: accepted relative completeness error
        ``|sum IG - (F(x) - F(x0))| / |F(x) - F(x0)|`` of a ``qig_min_steps`` result
    :param qig_rule: ``"gauss_legendre"`` (default) or ``"uniform"`` (the reference's
        mean over ``linspace(0, 1, steps)``)
    :param qig_iqr_clip: clip each sample's weights to ``[Q1 - k IQR, Q3 + k IQR]``
    :param qig_iqr_k: the IQR multiplier ``k``
    :param qig_mask_padding: give weight 0 to padding (keys a token cannot attend to
        itself in the attention mask) and to tokens whose ``loss_mask`` is 0 when
        ``oneshot(..., use_loss_mask=True)``
    :param qig_points_per_pass: path points evaluated together in one block pass
        (None: all nodes at once, the fastest; set it to bound memory on long sequences)
    """

    qig_steps: int = Field(default=6, ge=1)
    qig_min_steps: int = Field(default=2, ge=1)
    qig_completeness_tol: float = Field(default=0.01, ge=0)
    qig_rule: QuadratureRule = "gauss_legendre"
    qig_iqr_clip: bool = True
    qig_iqr_k: float = Field(default=1.5, ge=0)
    qig_mask_padding: bool = True
    qig_points_per_pass: int | None = Field(default=None, ge=1)

    # block -> (nodes its last attribution used, batches in a row that used that count), where its next batch starts
    _qig_block_steps: WeakKeyDictionary = PrivateAttr(default_factory=WeakKeyDictionary)
    # linear -> ((data pointer, version, args) of the weight it was built from, Q(W)), oldest first
    _qig_quantized: dict[torch.nn.Module, tuple[tuple, torch.Tensor]] = PrivateAttr(default_factory=dict)

    # lambda [batch, seq] with mean 1 over each sample's kept tokens, as stock calibration counts them
    def qig_weights(self, scores: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        kept_tokens = keep.sum(dim=-1, keepdim=True) if keep is not None else scores.shape[-1]
        iqr_k = self.qig_iqr_k if self.qig_iqr_clip else None
        return token_weights(scores, keep, iqr_k) * kept_tokens

    # QIG scores [batch, seq] of the block input, with hooks off and gradients on
    def qig_scores(
        self,
        block: torch.nn.Module,
        weight_args: dict[torch.nn.Module, QuantizationArgs],
        args: tuple,
        kwargs: dict[str, Any],
        baseline_args: QuantizationArgs | None = None,
        input_linears: Sequence[torch.nn.Module] = (),
    ) -> torch.Tensor:
        """QIG scores of ``block``'s input on one batch.

        :param block: the attributed module; called as ``block(*args, **kwargs)``
        :param weight_args: linears inside ``block`` -> weight args that build ``Q(W)``
        :param args, kwargs: the block's call arguments; the input ``[batch, seq, hidden]``
            is the first positional argument, else the first tensor keyword
        :param baseline_args: None for the zero baseline, else the input-activation args
            whose dynamic fake quantization of the input is the baseline
        :param input_linears: linears of ``block`` that read its input (q/k/v, gate/up, or
            the block itself): their projections are taken once per path, not per node;
            other modules among them run as usual
        :return: scores ``[batch, seq]``
        """
        if not weight_args:
            raise ValueError(
                f"{type(self).__name__} attributes through a {type(block).__name__} none of whose linears has "
                "a weight quantization scheme, so Q(W) = W: put a QuantizationModifier, GPTQModifier or "
                "QIGGPTQModifier targeting its linears after it in the recipe"
            )
        position, block_in = block_input(args, kwargs)
        x = block_in.detach().float()
        fp_weights, q_weights = self._qig_weight_pair(block, weight_args)
        if baseline_args is None and isinstance(block, torch.nn.Linear):
            return linear_token_scores(x, fp_weights[block] - q_weights[block])
        input_linears = [m for m in input_linears if m in fp_weights]  # e.g. an MoE router is no nn.Linear
        float_args, float_kwargs = _to_float(args), _to_float(kwargs)
        batch = x.shape[0]

        def run(weights, points, *projections):
            repeats = points.shape[0] // batch
            call_args, call_kwargs = _repeat_batch((float_args, float_kwargs), batch, repeats)
            call_args, call_kwargs = _with_input(call_args, call_kwargs, position, points)
            with _linear_weights(weights, points, dict(zip(input_linears, projections))):
                output = block(*call_args, **call_kwargs)
            return output[0] if isinstance(output, tuple) else output

        baseline = None if baseline_args is None else fake_quantize_activation(x, baseline_args)
        nodes, batches_at_nodes = self._qig_block_steps.get(block, (min(self.qig_min_steps, self.qig_steps), 0))
        settled = batches_at_nodes >= _CHECKED_BATCHES
        with torch.enable_grad(), _hooks_disabled():
            scores, used = qig_token_scores(
                partial(run, fp_weights),
                partial(run, q_weights),
                x,
                baseline,
                steps=nodes if settled else self.qig_steps,
                rule=self.qig_rule,
                points_per_pass=self.qig_points_per_pass,
                min_steps=None if settled else nodes,
                completeness_tol=self.qig_completeness_tol,
                fp_maps=[fp_weights[m] for m in input_linears],
                q_maps=[q_weights[m] for m in input_linears],
            )
        self._qig_block_steps[block] = (used, batches_at_nodes + 1 if used == nodes else 1)
        return scores

    # float32 W and Q(W) of every linear in `block`; Q(W) is kept while W is unchanged (one
    # layer's calibration sees the same weights on every batch), for the last layer's linears only
    def _qig_weight_pair(
        self, block: torch.nn.Module, weight_args: dict[torch.nn.Module, QuantizationArgs]
    ) -> tuple[dict[torch.nn.Module, torch.Tensor], dict[torch.nn.Module, torch.Tensor]]:
        fp_weights, q_weights = {}, {}
        for module in block.modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            weight = module.weight
            fp_weights[module] = weight.detach().float()
            q_weights[module] = fp_weights[module]
            if module in weight_args:
                key = (weight.data_ptr(), weight._version, weight_args[module])
                cached = self._qig_quantized.get(module)
                if cached is None or cached[0] != key:
                    cached = self._qig_quantized[module] = (key, fake_quantize_weight(weight, weight_args[module]))
                    while len(self._qig_quantized) > _QUANTIZED_WEIGHTS_KEPT:
                        del self._qig_quantized[next(iter(self._qig_quantized))]
                q_weights[module] = cached[1]
        return fp_weights, q_weights

    def _token_mask(self, block_in: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor | None:
        return super()._token_mask(block_in, kwargs) if self.qig_mask_padding else None


def quantized_linears(block: torch.nn.Module) -> dict[torch.nn.Module, QuantizationArgs]:
    """Every linear inside ``block`` with a weight quantization scheme -> its weight args."""
    return {
        module: module.quantization_scheme.weights
        for module in block.modules()
        if isinstance(module, torch.nn.Linear)
        and getattr(getattr(module, "quantization_scheme", None), "weights", None) is not None
    }


# run each linear with the given float32 weight: no parameter is touched, so neither the
# model nor the tensors autograd saved change (offloading and compressed-tensors' wrapped
# forwards reassign parameter data); a linear given a precomputed projection of
# `block_input` returns it (plus bias) when called on that very tensor; the previous
# forwards come back on exit
@contextmanager
def _linear_weights(
    weights: dict[torch.nn.Linear, torch.Tensor],
    block_input: torch.Tensor | None = None,
    projections: dict[torch.nn.Linear, torch.Tensor] | None = None,
):
    previous = {m: m.__dict__.get("forward") for m in weights}
    for module, weight in weights.items():
        bias = None if module.bias is None else module.bias.detach().float()
        projection = (projections or {}).get(module)
        module.forward = partial(_project_or_apply, weight=weight, bias=bias, block_input=block_input,
                                 projection=projection)
    try:
        yield
    finally:
        for module, forward in previous.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _project_or_apply(input, weight, bias, block_input, projection):  # noqa: A002 (nn.Linear's argument name)
    if projection is None or input is not block_input:
        return torch.nn.functional.linear(input, weight, bias)
    # a new tensor, so that in-place changes downstream never touch the gradient leaf
    return projection.clone() if bias is None else projection + bias


# disable every modifier's hooks, leaving them disabled on exit when they already were
# (HooksMixin.disable_hooks re-enables on exit, which inside AWQ's smoothing would let its
# caching hooks fire during the grid search)
def _hooks_disabled():
    return nullcontext() if HooksMixin._HOOKS_DISABLED else HooksMixin.disable_hooks()


def _has_shape(tensor: torch.Tensor | None, shape: torch.Size) -> bool:
    return isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == tuple(shape)


def attendable_tokens(attention_mask: torch.Tensor) -> torch.Tensor:
    """A token is real if it may attend to itself: the diagonal of a ``[batch, 1, q, k]`` mask -> ``[batch, q]``."""
    diagonal = attention_mask[:, 0].diagonal(dim1=-2, dim2=-1)
    if attention_mask.dtype == torch.bool:
        return diagonal
    return diagonal == 0


def block_input(args: tuple, kwargs: dict[str, Any]) -> tuple[int | str, torch.Tensor]:
    """The block's main input and where it sits: its first positional argument, else its first tensor keyword."""
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
