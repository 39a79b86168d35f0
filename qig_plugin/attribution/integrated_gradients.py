"""Integrated gradients along the straight path from a baseline to the input.

``IG(x) = (x - x0) * integral_0^1 grad fn(x0 + a (x - x0)) da``, the integral taken by a
quadrature rule. Pure torch; nothing here knows about llm-compressor.
"""

from collections.abc import Callable
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


# gradient of a scalar objective at a batch of points stacked along dim 0
def _gradient(fn: Callable[[torch.Tensor], torch.Tensor], points: torch.Tensor) -> torch.Tensor:
    points = points.detach().requires_grad_(True)
    with torch.enable_grad():
        value = fn(points)
        if value.ndim != 0:
            raise ValueError(f"fn must return a scalar, got shape {tuple(value.shape)}")
        (grad,) = torch.autograd.grad(value, points)
    return grad


def integrated_gradients(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    baseline: torch.Tensor | None = None,
    steps: int = 8,
    rule: QuadratureRule = "gauss_legendre",
    points_per_pass: int | None = None,
) -> torch.Tensor:
    """Integrated gradients of the scalar ``fn`` at ``x`` from ``baseline`` (zeros if None).

    :param fn: scalar objective; must be a sum over the leading dimension (samples are
        independent) whenever ``points_per_pass > 1``, because then several path points
        are stacked along dim 0 and evaluated in one call
    :param x: input ``[batch, ...]``
    :param baseline: path start, same shape as ``x`` (or broadcastable); zeros if None
    :param steps: number of quadrature nodes
    :param rule: ``"gauss_legendre"`` or ``"uniform"`` (see :func:`quadrature`)
    :param points_per_pass: path points evaluated per forward/backward pass (None: all
        nodes in one pass, the fastest on CPU: one large matmul beats several small ones)
    :return: attributions, same shape as ``x``; their sum approximates
        ``fn(x) - fn(baseline)`` (completeness)
    """
    baseline = torch.zeros_like(x) if baseline is None else baseline.expand_as(x)
    delta = x - baseline
    nodes, weights = quadrature(steps, rule)
    points_per_pass = points_per_pass or steps
    average_grad = torch.zeros_like(x)
    for start in range(0, steps, points_per_pass):
        chunk_nodes = nodes[start : start + points_per_pass].to(x.dtype)
        chunk_weights = weights[start : start + points_per_pass].to(x.dtype)
        points = torch.cat([baseline + float(a) * delta for a in chunk_nodes])
        grads = _gradient(fn, points).reshape(len(chunk_nodes), *x.shape)
        average_grad += torch.einsum("k,k...->...", chunk_weights, grads)
    return delta * average_grad
