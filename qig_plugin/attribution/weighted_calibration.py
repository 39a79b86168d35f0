"""Token-weighted calibration statistics: AWQ's search loss, its activation mean, SmoothQuant's ranges, MBQ's ratios.

Pure torch. Token weights ``lambda`` are ``[batch, seq]``, non-negative; a token with weight 0
(padding) never counts. With every kept weight equal to 1, each function returns exactly the
statistic stock llm-compressor computes over the kept tokens.
"""

from typing import Literal

import torch

LossMode = Literal["mae", "mse"]


def weighted_reconstruction_error(
    reference: list[torch.Tensor], candidate: list[torch.Tensor], weights: list[torch.Tensor], mode: LossMode
) -> float:
    """``sum_t lambda_t e_t / (H sum_t lambda_t)`` over all batches, the AWQ grid-search loss.

    :param reference: per batch, the full-precision block output ``[batch, seq, H]``
    :param candidate: per batch, the output with ``Q(W s) / s`` weights, same shapes
    :param weights: per batch, token weights ``[batch, seq]``
    :param mode: ``"mae"``: ``e_t = sum_h |diff|`` (MBQ's and QIG's default) or ``"mse"``:
        ``e_t = sum_h diff^2`` (stock AWQ's loss)
    :return: the weighted mean error per element
    """
    if not (len(reference) == len(candidate) == len(weights)):
        raise ValueError(
            f"got {len(reference)} reference, {len(candidate)} candidate and {len(weights)} weight batches; "
            "each calibration batch needs one of each"
        )
    total = torch.zeros((), dtype=torch.float64)
    weight_sum = torch.zeros((), dtype=torch.float64)
    for ref, cand, lam in zip(reference, candidate, weights):
        if lam.shape != ref.shape[:-1]:
            raise ValueError(f"token weights {tuple(lam.shape)} do not match the outputs {tuple(ref.shape)}")
        diff = ref.float() - cand.to(ref.device).float()
        error = diff.abs().sum(-1) if mode == "mae" else diff.pow(2).sum(-1)
        lam = lam.to(error.device).float()
        total += (lam * error).sum().double().cpu()
        weight_sum += lam.sum().double().cpu() * ref.shape[-1]
    if weight_sum <= 0:
        raise ValueError("every token weight is 0 (all padding?): the search loss is undefined")
    return (total / weight_sum).item()


def masked_channel_abs_sum(x: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``sum |x|`` over the kept tokens and their count (AWQ's activation-mean statistic).

    :param x: activations ``[batch, seq, hidden]``
    :param keep: ``[batch, seq]`` bool, or None for every token
    :return: sums ``[hidden]`` (float32) and the kept-token count (0-d int64)
    """
    flat = x.detach().abs().flatten(0, -2)
    if keep is not None:
        flat = flat[keep.to(flat.device).flatten()]
    return flat.float().sum(dim=0), torch.tensor(flat.shape[0])


def weighted_channel_range(
    x: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel min and max of the importance-scaled activations ``(lambda_t / max lambda) x_t``.

    SmoothQuant sets each channel's smoothing scale from its range over calibration tokens,
    so one outlier token decides it. Scaling every token by its relative importance lets an
    outlier set the range only in proportion to how much its quantization error matters.
    This is a weighted abs-max rather than a weighted quantile: it keeps SmoothQuant's
    streaming min/max (a quantile needs every token of every batch held at once), reduces
    exactly to the stock range when all weights are equal, and a weight only ever moves a
    token toward 0, never beyond the extremes stock would see (with 0 included).

    :param x: activations ``[batch, seq, hidden]``
    :param weights: token weights ``[batch, seq]`` (per-sample scale does not matter)
    :param keep: ``[batch, seq]`` bool tokens that count, or None for all; a sample
        needs at least one kept token
    :return: ``(min, max)``, each ``[hidden]``
    """
    if weights.shape != x.shape[:-1]:
        raise ValueError(f"token weights {tuple(weights.shape)} do not match activations {tuple(x.shape)}")
    keep = torch.ones_like(weights, dtype=torch.bool) if keep is None else keep.to(weights.device).bool()
    weights = torch.where(keep, weights.float(), torch.zeros_like(weights, dtype=torch.float32))
    peak = weights.amax(dim=-1, keepdim=True)
    relative = torch.where(peak > 0, weights / peak.clamp_min(torch.finfo(torch.float32).tiny), keep.float())
    scaled = x.float() * relative.to(x.device).unsqueeze(-1)
    kept = keep.to(x.device).unsqueeze(-1)
    low = torch.where(kept, scaled, torch.full_like(scaled, float("inf"))).flatten(0, -2).amin(dim=0)
    high = torch.where(kept, scaled, torch.full_like(scaled, float("-inf"))).flatten(0, -2).amax(dim=0)
    return low.to(x.dtype), high.to(x.dtype)


def modality_ratios(vision_grad: torch.Tensor, text_grad: torch.Tensor) -> torch.Tensor:
    """MBQ's per-layer vision weight ``r_l = max(g_vis(l) / g_text(l), median_l of that ratio)``.

    :param vision_grad: ``[layers]`` mean ``|dL/dY|`` over vision-token elements
    :param text_grad: ``[layers]`` mean ``|dL/dY|`` over answer-token elements
    :return: ratios ``[layers]``, finite, floored at their median
    """
    if vision_grad.shape != text_grad.shape or vision_grad.ndim != 1:
        raise ValueError(f"gradient magnitudes must be two [layers] vectors, got {vision_grad.shape} and {text_grad.shape}")
    if not (torch.isfinite(vision_grad).all() and torch.isfinite(text_grad).all() and (text_grad > 0).all()):
        raise ValueError(
            "MBQ gradient magnitudes must be finite with non-zero text gradients; the calibration "
            "samples need answer tokens that carry the caption loss"
        )
    ratios = vision_grad / text_grad
    return ratios.clamp_min(ratios.median())
