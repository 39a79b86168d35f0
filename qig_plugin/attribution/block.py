"""QIG scores of one block's input tokens: the one entry point every QIG user calls.

:func:`attribute_block` takes a block (an attention module, an MLP, a single linear), the
arguments it is called with, the weight quantization args of its targeted linears and the
:class:`~qig_plugin.attribution.settings.QIGSettings`, and returns each token's QIG score: the
hidden-mean of ``|IG|`` of the block's quantization discrepancy ``f(x; W) - f(x; Q(W))`` with
respect to its input (``qig_attribution: exact``), or, for blocks whose tokens do not interact,
each token's summed integrated gradients taken forward only (``fast``, the default). The QIG
modifiers, ``qig explain`` and the benchmarks all call it.
Pure torch plus compressed-tensors' quantizers; nothing here knows about llm-compressor.
"""

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from weakref import WeakKeyDictionary

import torch
from compressed_tensors.quantization import QuantizationArgs

from qig_plugin.attribution.fake_quant import fake_quantize_activation, fake_quantize_weight
from qig_plugin.attribution.settings import QIGSettings
from qig_plugin.attribution.token_weights import discrepancy, linear_token_scores, qig_token_scores

__all__ = ["AttributionCache", "BlockAttribution", "attribute_block", "block_input", "is_token_wise", "linear_weights"]

# batches in a row a block must pass the completeness check with one node count before it takes
# that count unchecked (the check's forward of both branches at both path ends is ~15-20% of a batch)
CHECKED_BATCHES = 2
# qig_attribution fast: attention's path integral by the one-node Gauss-Legendre rule (the path's midpoint),
# unchecked. On the validation split its quantized models are within exact QIG's intervals (KL, VQA) and
# calibration at 64k tokens is 10% faster than with 2 nodes (docs/measurements.md)
FAST_NODES = 1
FAST_RULE = "gauss_legendre"
# linears whose Q(W) stays cached: the 7 of a dense decoder layer (an MoE layer has more and rebuilds them)
QUANTIZED_WEIGHTS_KEPT = 8


@dataclass
class BlockAttribution:
    """QIG scores of one block call.

    :param scores: per token ``[batch, seq]``, non-negative
    :param nodes: quadrature nodes of the path integral; 0 for a single linear's closed form
    :param completeness_error: relative completeness error of the accepted path integral where it
        was checked (None: closed form, or a node count that had settled)
    """

    scores: torch.Tensor
    nodes: int
    completeness_error: float | None


@dataclass
class AttributionCache:
    """What :func:`attribute_block` carries from one call to the next on the same blocks.

    :param node_counts: block -> (nodes its last attribution used, batches in a row that used that
        count): where its next batch starts, and whether that count has settled
    :param quantized_weights: linear -> ((data pointer, version, args) of the weight it was built
        from, ``Q(W)``), oldest first; kept while the weight is unchanged (one layer's calibration sees
        the same weights on every batch), for the last layer's linears only
    :param token_wise: block -> whether its output at a token depends on that token's input alone
        (probed on its first call by :func:`is_token_wise`)
    """

    node_counts: WeakKeyDictionary = field(default_factory=WeakKeyDictionary)
    token_wise: WeakKeyDictionary = field(default_factory=WeakKeyDictionary)
    quantized_weights: dict[torch.nn.Module, tuple[tuple, torch.Tensor]] = field(default_factory=dict)

    def weight_pair(
        self, block: torch.nn.Module, weight_args: Mapping[torch.nn.Module, QuantizationArgs]
    ) -> tuple[dict[torch.nn.Module, torch.Tensor], dict[torch.nn.Module, torch.Tensor]]:
        """Float32 ``W`` and ``Q(W)`` ``[out, in]`` of every linear in ``block`` (``Q(W) = W`` where not targeted)."""
        fp_weights, q_weights = {}, {}
        for module in block.modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            weight = module.weight
            fp_weights[module] = q_weights[module] = weight.detach().float()
            if module in weight_args:
                key = (weight.data_ptr(), weight._version, weight_args[module])
                cached = self.quantized_weights.get(module)
                if cached is None or cached[0] != key:
                    cached = self.quantized_weights[module] = (key, fake_quantize_weight(weight, weight_args[module]))
                    while len(self.quantized_weights) > QUANTIZED_WEIGHTS_KEPT:
                        del self.quantized_weights[next(iter(self.quantized_weights))]
                q_weights[module] = cached[1]
        return fp_weights, q_weights


def attribute_block(
    block: torch.nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    weight_args: Mapping[torch.nn.Module, QuantizationArgs],
    settings: QIGSettings | None = None,
    *,
    input_linears: Sequence[torch.nn.Module] = (),
    baseline_args: QuantizationArgs | None = None,
    cache: AttributionCache | None = None,
) -> BlockAttribution:
    """QIG scores of ``block``'s input tokens on one call.

    ``qig_attribution: exact``: a single linear with a zero baseline takes the closed form (its
    discrepancy is positively homogeneous of degree 1, so ``x * grad`` is exact); any other block
    takes the path integral with the node ladder of ``settings`` (fewest nodes that pass the
    completeness check, a count kept unchecked once it passed on :data:`CHECKED_BATCHES` batches in a
    row, tracked in ``cache``). ``qig_attribution: fast``: a token-wise block (:func:`is_token_wise`)
    scores each token by its own discrepancy change along the path, ``|F(x_t) - F(x0_t)|`` (the sum of
    its integrated gradients, forward only); any other block takes the path integral at its midpoint
    (:data:`FAST_NODES`, one Gauss-Legendre node), unchecked. Run it with gradients allowed; it turns them on
    itself.

    :param block: the attributed module, called as ``block(*args, **kwargs)``; its output (or the
        first element of a tuple output) is ``[batch, seq, hidden_out]``
    :param args, kwargs: the block's call arguments; its input ``[batch, seq, hidden]`` is the first
        positional argument, else the first tensor keyword
    :param weight_args: targeted linears inside ``block`` -> the weight args that build ``Q(W)``;
        other linears keep ``W`` in both branches
    :param settings: the ``qig_*`` settings (defaults when None)
    :param input_linears: linears of ``block`` that read its input (q/k/v, gate/up, or the block
        itself): their projections are taken once per path, not per node; other modules among them
        run as usual
    :param baseline_args: None for the zero baseline, else the input-activation args whose dynamic
        fake quantization of the input is the path's start (the paper's ``x^q``)
    :param cache: node counts and ``Q(W)`` kept across calls (None: a fresh one, nothing kept)
    :return: the scores ``[batch, seq]``, the node count and the completeness error
    :raises ValueError: when no linear of ``block`` is in ``weight_args`` (then ``Q(W) = W``)
    """
    settings = settings or QIGSettings()
    cache = cache or AttributionCache()
    if not any(module in weight_args for module in block.modules()):
        raise ValueError(
            f"QIG attributes through a {type(block).__name__} none of whose linears has a weight quantization "
            "scheme, so Q(W) = W: put a QuantizationModifier, GPTQModifier or QIGGPTQModifier targeting its "
            "linears after it in the recipe"
        )
    position, block_in = block_input(args, kwargs)
    x = block_in.detach().float()
    fast = settings.qig_attribution == "fast"
    fp_weights, q_weights = cache.weight_pair(block, weight_args)
    if baseline_args is None and isinstance(block, torch.nn.Linear):
        weight_error = fp_weights[block] - q_weights[block]
        if fast:  # F(0) = 0: the bias cancels
            return BlockAttribution((x @ weight_error.T).abs().mean(dim=-1), 0, None)
        return BlockAttribution(linear_token_scores(x, weight_error), 0, None)
    input_linears = [m for m in input_linears if m in fp_weights]  # e.g. an MoE router is no nn.Linear
    float_args, float_kwargs = _to_float(args), _to_float(kwargs)
    batch = x.shape[0]

    def run(weights, points, *projections):
        repeats = points.shape[0] // batch
        call_args, call_kwargs = _repeat_batch((float_args, float_kwargs), batch, repeats)
        call_args, call_kwargs = _with_input(call_args, call_kwargs, position, points)
        with linear_weights(weights, points, dict(zip(input_linears, projections))):
            output = block(*call_args, **call_kwargs)
        return output[0] if isinstance(output, tuple) else output

    baseline = None if baseline_args is None else fake_quantize_activation(x, baseline_args)
    if fast:
        if block not in cache.token_wise:
            with torch.no_grad():
                cache.token_wise[block] = is_token_wise(partial(run, fp_weights), x)
        if cache.token_wise[block]:
            return BlockAttribution(_discrepancy_change(run, fp_weights, q_weights, x, baseline), 0, None)
        nodes, batches_at_nodes, rule = FAST_NODES, CHECKED_BATCHES, FAST_RULE  # taken unchecked
    else:
        rule = settings.qig_rule
        nodes, batches_at_nodes = cache.node_counts.get(block, (settings.qig_min_steps, 0))
    settled = batches_at_nodes >= CHECKED_BATCHES
    with torch.enable_grad():
        result = qig_token_scores(
            partial(run, fp_weights),
            partial(run, q_weights),
            x,
            baseline,
            steps=nodes if settled else settings.qig_steps,
            rule=rule,
            points_per_pass=settings.qig_points_per_pass,
            min_steps=None if settled else nodes,
            completeness_tol=settings.qig_completeness_tol,
            fp_maps=[fp_weights[m] for m in input_linears],
            q_maps=[q_weights[m] for m in input_linears],
        )
    if not fast:
        cache.node_counts[block] = (result.nodes, batches_at_nodes + 1 if result.nodes == nodes else 1)
    return BlockAttribution(result.scores, result.nodes, result.completeness_error)


def block_discrepancy(
    block: torch.nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    weight_args: Mapping[torch.nn.Module, QuantizationArgs],
    cache: AttributionCache | None = None,
) -> torch.Tensor:
    """The block's quantization discrepancy at each output token, ``mean_h |f(x; W) - f(x; Q(W))|``, forward only.

    What QIG attributes (completeness: a token-wise block's scores in ``fast`` are exactly this); its own
    cheapest stand-in. Arguments as for :func:`attribute_block`; run it with every modifier's hooks off.

    :return: ``[batch, seq]``
    """
    fp_weights, q_weights = (cache or AttributionCache()).weight_pair(block, weight_args)
    float_args, float_kwargs = _to_float(args), _to_float(kwargs)
    outputs = []
    with torch.no_grad():
        for weights in (fp_weights, q_weights):
            with linear_weights(weights):
                output = block(*float_args, **float_kwargs)
            outputs.append(output[0] if isinstance(output, tuple) else output)
    return discrepancy(*outputs)


def is_token_wise(block_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> bool:
    """Whether ``block_fn``'s output at each token depends on that token's input alone.

    Probed once: every sample's even tokens are changed (``1 - x``) and its odd tokens' outputs
    compared, then the other way round. Any block that mixes tokens (attention, causal or not, with
    any positional encoding, however padded) moves some real token's output; an MLP or a linear
    moves none.

    :param block_fn: the block on ``k`` copies of the batch stacked along dim 0, ``[k * batch, seq,
        hidden]`` -> ``[k * batch, seq, hidden_out]``
    :param x: a real input ``[batch, seq, hidden]``
    :return: True for a token-wise block (and for single-token inputs, where nothing can mix)
    """
    batch, seq = x.shape[:2]
    if seq < 2:
        return True
    even = (torch.arange(seq, device=x.device) % 2 == 0).view(1, seq, 1)
    changed = 1.0 - x
    outputs = block_fn(torch.cat([x, torch.where(even, changed, x), torch.where(even, x, changed)]))
    reference, odd_kept, even_kept = outputs.split(batch)
    unchanged = torch.where(even, even_kept, odd_kept)
    tolerance = 1e-5 * reference.abs().amax().clamp_min(1e-12)
    return bool(((unchanged - reference).abs() <= tolerance).all())


# per token |F(x) - F(x0)|, F = hidden-mean |f(.; W) - f(.; Q(W))|: [batch, seq]
def _discrepancy_change(run, fp_weights, q_weights, x: torch.Tensor, baseline: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        if baseline is None and all(linear.bias is None for linear in fp_weights):
            return discrepancy(run(fp_weights, x), run(q_weights, x))  # F(0) = 0 without biases
        start = torch.zeros_like(x) if baseline is None else baseline.expand_as(x)
        ends = torch.cat([start, x])
        per_token = discrepancy(run(fp_weights, ends), run(q_weights, ends))
        return (per_token[len(x):] - per_token[: len(x)]).abs()


def block_input(args: tuple, kwargs: dict[str, Any]) -> tuple[int | str, torch.Tensor]:
    """The block's main input and where it sits: its first positional argument, else its first tensor keyword."""
    if args and isinstance(args[0], torch.Tensor):
        return 0, args[0]
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return key, value
    raise ValueError("QIG could not find the block input among the block's arguments")


@contextmanager
def linear_weights(
    weights: Mapping[torch.nn.Linear, torch.Tensor],
    block_input: torch.Tensor | None = None,
    projections: Mapping[torch.nn.Linear, torch.Tensor] | None = None,
):
    """Run each linear with the given float32 weight ``[out, in]`` inside the context.

    No parameter is touched, so neither the model nor the tensors autograd saved change
    (offloading and compressed-tensors' wrapped forwards reassign parameter data). A linear given a
    precomputed projection of ``block_input`` returns it (plus bias) when called on that very
    tensor. The previous forwards come back on exit.
    """
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
