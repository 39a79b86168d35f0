"""QIG token scores and the calibration token weights derived from them.

A token's QIG score is the hidden-mean of ``|IG|`` of a block's quantization discrepancy
``sum_t mean_h |f(x; W)_t - f(x; Q(W))_t|`` with respect to the block input ``x``.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from qig_plugin.attribution.integrated_gradients import QuadratureRule, integrated_gradients, path_projections


# per-token quantization discrepancy of a block: mean over hidden of |fp - q|
def discrepancy(fp_output: torch.Tensor, q_output: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, hidden]`` outputs -> ``[batch, seq]`` mean absolute difference."""
    return (fp_output - q_output).abs().mean(dim=-1)


# QIG scores of a single linear from a zero baseline, in closed form
def linear_token_scores(x: torch.Tensor, weight_error: torch.Tensor) -> torch.Tensor:
    """QIG scores of a linear block ``x W^T + b`` against ``x Q(W)^T + b`` from a zero baseline.

    The discrepancy is ``F(x) = sum_t mean_o |x_t E^T|`` with ``E = W - Q(W)`` (the bias cancels),
    positively homogeneous of degree 1, so its integrated gradients from 0 are exactly
    ``x * grad F(x)`` with ``grad F(x) = sign(x E^T) E / out``: two matmuls, no autograd.

    :param x: block input ``[batch, seq, in]``
    :param weight_error: ``W - Q(W)`` ``[out, in]``
    :return: scores ``[batch, seq]``, the hidden-mean of ``|IG|``
    """
    gradients = (x @ weight_error.T).sign() @ weight_error / weight_error.shape[0]
    return (x * gradients).abs().mean(dim=-1)


class TokenScores(NamedTuple):
    """What :func:`qig_token_scores` found.

    :param scores: QIG score of every token ``[batch, seq]``, non-negative
    :param nodes: quadrature nodes of the accepted path integral
    :param completeness_error: ``|sum IG - (F(x) - F(x0))| / |F(x) - F(x0)|`` of the accepted result,
        None when no completeness check ran (``min_steps`` None or not below ``steps``)
    """

    scores: torch.Tensor
    nodes: int
    completeness_error: float | None


def qig_token_scores(
    fp_fn: Callable[..., torch.Tensor],
    q_fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    baseline: torch.Tensor | None = None,
    steps: int = 6,
    rule: QuadratureRule = "gauss_legendre",
    points_per_pass: int | None = None,
    min_steps: int | None = None,
    completeness_tol: float = 0.01,
    fp_maps: Sequence[torch.Tensor] = (),
    q_maps: Sequence[torch.Tensor] = (),
) -> TokenScores:
    """QIG score of every token of ``x``, with the fewest nodes that integrate it well.

    With ``min_steps`` set, the path integral is first taken with ``min_steps`` nodes and
    accepted if it is complete: ``|sum IG - (F(x) - F(x0))| <= completeness_tol * |F(x) - F(x0)|``
    (``F`` at both path ends costs one forward of both branches); otherwise it is retaken
    with half again as many nodes (2, 3, 4, 6, ...) up to ``steps``, which is accepted as is.
    Token-wise blocks (MLPs) pass with 2 nodes, attention mostly with 3.

    :param fp_fn: the full-precision block, ``[n, seq, hidden_in] -> [n, seq, hidden_out]``,
        called as ``fp_fn(points, *projections)`` with ``points @ M.T`` for each ``M`` in ``fp_maps``
    :param q_fn: the same block with quantized weights ``Q(W)``, given its ``q_maps`` projections
    :param x: block input ``[batch, seq, hidden_in]``
    :param baseline: path start: None for zeros (the reference's weight-only path), or
        the quantized input ``x^q`` (the paper), shape of ``x``
    :param steps: quadrature nodes (the most used); ``rule``: ``"gauss_legendre"`` or ``"uniform"``
    :param points_per_pass: path points stacked along the batch dim per pass (None: all;
        the blocks must treat dim 0 as independent samples whenever it is not 1)
    :param min_steps: nodes tried first (None or >= ``steps``: always ``steps``)
    :param completeness_tol: relative completeness error accepted from ``min_steps`` nodes
    :param fp_maps, q_maps: weights ``[out, hidden_in]`` of the linears each branch applies to
        its input, hoisted out of the path integral (see :func:`integrated_gradients`)
    :return: the scores ``[batch, seq]``, the nodes used and the completeness error where it was checked
    """
    if x.ndim != 3:
        raise ValueError(f"x must be [batch, seq, hidden], got shape {tuple(x.shape)}")

    maps = (*fp_maps, *q_maps)
    projected_path = path_projections(maps, x, baseline)

    def objective_per_token(points: torch.Tensor, *projections: torch.Tensor) -> torch.Tensor:
        fp_output = fp_fn(points, *projections[: len(fp_maps)])
        return discrepancy(fp_output, q_fn(points, *projections[len(fp_maps) :]))

    def objective(points: torch.Tensor, *projections: torch.Tensor) -> torch.Tensor:
        return objective_per_token(points, *projections).sum()

    def attribute(nodes: int) -> torch.Tensor:
        return integrated_gradients(
            objective, x, baseline, steps=nodes, rule=rule, points_per_pass=points_per_pass, input_maps=maps,
            projected_path=projected_path,
        )

    nodes = steps if min_steps is None else min(min_steps, steps)
    change = None
    if nodes < steps:
        with torch.no_grad():
            start = torch.zeros_like(x) if baseline is None else baseline.expand_as(x)
            ends = torch.cat([start, x])  # one pass of both branches over both path ends
            projected_ends = [torch.cat([torch.zeros_like(d), d]) if s is None else torch.cat([s, s + d])
                              for s, d in projected_path]
            per_token = objective_per_token(ends, *projected_ends)
            change = (per_token[len(x) :].sum() - per_token[: len(x)].sum()).item()

    def relative_error(attributions: torch.Tensor) -> float:
        return abs(attributions.sum().item() - change) / max(abs(change), torch.finfo(torch.float64).tiny)

    while nodes < steps:
        attributions = attribute(nodes)
        error = relative_error(attributions)
        if error <= completeness_tol:
            return TokenScores(attributions.abs().mean(dim=-1), nodes, error)
        nodes = min(steps, nodes + max(1, nodes // 2))
    attributions = attribute(steps)
    return TokenScores(attributions.abs().mean(dim=-1), steps, None if change is None else relative_error(attributions))


# per-sample: divide by the sum over the kept tokens (masked tokens stay 0)
def _normalize(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    values = torch.where(keep, values, torch.zeros_like(values))
    totals = values.sum(dim=-1, keepdim=True)
    return torch.where(totals > 0, values / totals.clamp_min(torch.finfo(values.dtype).tiny),
                       keep / keep.sum(dim=-1, keepdim=True).clamp_min(1))


# per-sample quartiles over the kept tokens only: [batch] each
def _masked_quartiles(values: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    masked = torch.where(keep, values, torch.full_like(values, float("nan")))
    quartiles = torch.nanquantile(masked, torch.tensor([0.25, 0.75], dtype=values.dtype), dim=-1)
    return quartiles[0], quartiles[1]


def token_weights(
    scores: torch.Tensor, mask: torch.Tensor | None = None, iqr_k: float | None = 1.5
) -> torch.Tensor:
    """Calibration weights from token scores, summing to 1 per sample.

    Per sample: normalize the scores to sum 1, clip them to
    ``[Q1 - iqr_k * IQR, Q3 + iqr_k * IQR]`` (quartiles over the kept tokens), renormalize.

    :param scores: ``[batch, seq]`` non-negative token scores
    :param mask: ``[batch, seq]`` bool or 0/1, true for tokens to keep; False tokens
        (padding, optionally the system prompt) get weight 0 and are left out of the
        quartiles. None keeps every token.
    :param iqr_k: IQR multiplier; None disables clipping
    :return: weights ``[batch, seq]``, each kept row sums to 1 (uniform over the kept
        tokens where all scores are 0); all-masked rows are all 0
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be [batch, seq], got shape {tuple(scores.shape)}")
    if mask is None:
        keep = torch.ones_like(scores, dtype=torch.bool)
    elif mask.shape != scores.shape:
        raise ValueError(
            f"token mask shape {tuple(mask.shape)} does not match scores {tuple(scores.shape)}; "
            "the mask needs one entry per token of each sample"
        )
    else:
        keep = mask.bool()
    if not torch.isfinite(scores[keep]).all():
        raise FloatingPointError(
            "QIG scores contain NaN or Inf; compute the attribution in float32 (fp16/bf16 "
            "discrepancies underflow or overflow)"
        )
    weights = _normalize(scores.float(), keep)
    if iqr_k is not None:
        q1, q3 = _masked_quartiles(weights, keep)
        spread = iqr_k * (q3 - q1)
        low = (q1 - spread).clamp_min(0).unsqueeze(-1)
        weights = torch.minimum(torch.maximum(weights, low), (q3 + spread).unsqueeze(-1))
        weights = _normalize(weights, keep)
    return weights.to(scores.dtype)


def calibration_token_weights(
    scores: torch.Tensor, keep: torch.Tensor | None, iqr_k: float | None = 1.5
) -> torch.Tensor:
    """:func:`token_weights` scaled to mean 1 over each sample's kept tokens, as stock calibration counts them.

    :param scores: ``[batch, seq]`` non-negative token scores
    :param keep: ``[batch, seq]`` tokens that count (None: all)
    :param iqr_k: IQR clipping multiplier (None: no clipping)
    :return: weights ``[batch, seq]``: kept tokens sum to their count per sample, the others are 0
    """
    kept_tokens = keep.sum(dim=-1, keepdim=True) if keep is not None else scores.shape[-1]
    return token_weights(scores, keep, iqr_k) * kept_tokens
