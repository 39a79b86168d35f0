"""Integrated gradients along the straight path from a baseline to the input.

``IG(x) = (x - x0) * integral_0^1 grad fn(x0 + a (x - x0)) da``, the integral taken by a
quadrature rule. Pure torch; nothing here knows about llm-compressor.
"""

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

QuadratureRule = Literal["gauss_legendre", "uniform"]


# nodes in [0, 1] and weights summing to 1 for a quadrature rule
def quadrature(steps: int, rule: QuadratureRule) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``[steps]`` on [0, 1] and their weights ``[steps]`` (summing to 1).

    - ``"uniform"``: the QIG reference release: ``linspace(0, 1, steps)`` with equal
      weights ``1/steps`` (both endpoints included, a plain mean, not the trapezoid).
    - ``"gauss_legendre"``: Gauss-Legendre nodes mapped to [0, 1]; exact for polynomials
      of degree ``2 * steps - 1`` along the path, so few nodes suffice for smooth blocks.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if rule == "uniform":
        nodes = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
        weights = torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    elif rule == "gauss_legendre":
        unit_nodes, unit_weights = np.polynomial.legendre.leggauss(steps)
        nodes = torch.from_numpy((unit_nodes + 1.0) / 2.0)
        weights = torch.from_numpy(unit_weights / 2.0)
    else:
        raise ValueError(f"unknown quadrature rule {rule!r}: use 'gauss_legendre' or 'uniform'")
    return nodes, weights


# gradients of a scalar objective at a batch of points stacked along dim 0, and at the
# points' precomputed projections (None where the objective does not read one)
def _gradients(
    fn: Callable[..., torch.Tensor], points: torch.Tensor, projections: list[torch.Tensor]
) -> tuple[torch.Tensor | None, ...]:
    inputs = [t.detach().requires_grad_(True) for t in (points, *projections)]
    with torch.enable_grad():
        value = fn(*inputs)
        if value.ndim != 0:
            raise ValueError(f"fn must return a scalar, got shape {tuple(value.shape)}")
        return torch.autograd.grad(value, inputs, allow_unused=True)


# the straight path's projections through each map: (start or None for a zero start, direction)
def path_projections(
    input_maps: Sequence[torch.Tensor], x: torch.Tensor, baseline: torch.Tensor | None = None
) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """``(baseline @ M.T, (x - baseline) @ M.T)`` for each map ``M`` ``[out, hidden]``; the start is None for a zero baseline."""
    delta = x if baseline is None else x - baseline
    return [(None if baseline is None else baseline @ m.T, delta @ m.T) for m in input_maps]


def integrated_gradients(
    fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    baseline: torch.Tensor | None = None,
    steps: int = 8,
    rule: QuadratureRule = "gauss_legendre",
    points_per_pass: int | None = None,
    input_maps: Sequence[torch.Tensor] = (),
    projected_path: list[tuple[torch.Tensor | None, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Integrated gradients of the scalar ``fn`` at ``x`` from ``baseline`` (zeros if None).

    Linear maps of the input can be hoisted out of the path integral: a projection
    ``P = z @ M.T`` is affine along the straight path, so it is computed once at the path's
    start and direction instead of once per node, and its gradients, averaged over the
    nodes first, flow back through ``M`` in one matmul: ``x . M^T g = (M x) . g``. The
    result is the same integral; a block's input linears (q/k/v, gate/up) then cost two
    matmuls per branch whatever the node count.

    :param fn: scalar objective ``fn(points, *projections)``, where ``points`` is
        ``[n, ...]`` and ``projections[m] = points @ input_maps[m].T``; it must be a sum over
        the leading dimension (samples are independent) whenever ``points_per_pass > 1``,
        because then several path points are stacked along dim 0 and evaluated in one call
    :param x: input ``[batch, ..., hidden]``
    :param baseline: path start, same shape as ``x`` (or broadcastable); zeros if None
    :param steps: number of quadrature nodes
    :param rule: ``"gauss_legendre"`` or ``"uniform"`` (see :func:`quadrature`)
    :param points_per_pass: path points evaluated per forward/backward pass (None: all
        nodes in one pass, the fastest on CPU: one large matmul beats several small ones)
    :param input_maps: matrices ``[out_m, hidden]`` whose projections ``fn`` receives
    :param projected_path: :func:`path_projections` of ``input_maps``, when the caller has them
    :return: attributions, same shape as ``x``; their sum approximates
        ``fn(x, *projections of x) - fn(baseline, *projections of baseline)`` (completeness)
    """
    projected_path = path_projections(input_maps, x, baseline) if projected_path is None else projected_path
    baseline = torch.zeros_like(x) if baseline is None else baseline.expand_as(x)
    delta = x - baseline
    nodes, weights = quadrature(steps, rule)
    points_per_pass = points_per_pass or steps
    average_grads = [torch.zeros_like(x), *(torch.zeros_like(d) for _, d in projected_path)]
    used = [False] * len(average_grads)
    for first in range(0, steps, points_per_pass):
        chunk_nodes = [float(a) for a in nodes[first : first + points_per_pass]]
        chunk_weights = weights[first : first + points_per_pass].to(x.dtype)
        points = torch.cat([baseline + a * delta for a in chunk_nodes])
        projections = [torch.cat([a * d if s is None else s + a * d for a in chunk_nodes]) for s, d in projected_path]
        for index, grads in enumerate(_gradients(fn, points, projections)):
            if grads is not None:
                average = average_grads[index]
                average += torch.einsum("k,k...->...", chunk_weights, grads.reshape(len(chunk_nodes), *average.shape))
                used[index] = True
    direct, *through_maps = average_grads
    pulled_back = (g @ m for g, m, read in zip(through_maps, input_maps, used[1:]) if read)
    return delta * sum(pulled_back, direct)
