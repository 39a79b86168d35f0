import pytest
import torch

from qig_plugin.attribution.weighted_calibration import (
    masked_channel_abs_sum,
    modality_ratios,
    weighted_channel_range,
    weighted_reconstruction_error,
)


def outputs(seed: int, shape=(2, 5, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_equal_weights_give_the_stock_mse():
    ref, cand = [outputs(0), outputs(1)], [outputs(2), outputs(3)]
    ones = [torch.ones(2, 5), torch.ones(2, 5)]
    stock = sum(torch.nn.functional.mse_loss(a, b, reduction="sum") for a, b in zip(ref, cand)) / (2 * 80)
    assert weighted_reconstruction_error(ref, cand, ones, "mse") == pytest.approx(stock.item(), rel=1e-6)
    mae = sum((a - b).abs().sum() for a, b in zip(ref, cand)) / (2 * 80)
    assert weighted_reconstruction_error(ref, cand, ones, "mae") == pytest.approx(mae.item(), rel=1e-6)


def test_zero_weight_tokens_never_count_and_weights_scale_tokens():
    ref, cand = outputs(0), outputs(1)
    weights = torch.tensor([[1.0, 2.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5, 0.0]])
    garbage = cand.clone()
    garbage[weights == 0] = 1e6  # padding outputs can be anything
    loss = weighted_reconstruction_error([ref], [cand], [weights], "mae")
    assert weighted_reconstruction_error([ref], [garbage], [weights], "mae") == pytest.approx(loss)
    per_token = (ref - cand).abs().sum(-1)
    assert loss == pytest.approx(((weights * per_token).sum() / (weights.sum() * 8)).item(), rel=1e-6)


def test_reconstruction_error_rejects_mismatched_weights():
    with pytest.raises(ValueError, match="do not match"):
        weighted_reconstruction_error([outputs(0)], [outputs(1)], [torch.ones(2, 4)], "mse")
    with pytest.raises(ValueError, match="all padding"):
        weighted_reconstruction_error([outputs(0)], [outputs(1)], [torch.zeros(2, 5)], "mse")


def test_activation_mean_leaves_padding_out():
    x = outputs(0)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 3:] = False
    x_padded = x.clone()
    x_padded[~keep] = 1e6
    total, count = masked_channel_abs_sum(x_padded, keep)
    assert count.item() == 8
    assert torch.allclose(total, x.abs()[keep].sum(0))
    all_total, all_count = masked_channel_abs_sum(x, None)
    assert all_count.item() == 10 and torch.equal(all_total, x.abs().flatten(0, 1).sum(0))


def test_weighted_range_reduces_to_min_max_and_shrinks_unimportant_outliers():
    x = outputs(0)
    low, high = weighted_channel_range(x, torch.full((2, 5), 3.0), None)
    assert torch.equal(low, x.flatten(0, 1).amin(0)) and torch.equal(high, x.flatten(0, 1).amax(0))

    x[0, 2, 0] = 100.0  # an outlier on one token
    weights = torch.ones(2, 5)
    weights[0, 2] = 0.01
    _, high = weighted_channel_range(x, weights, None)
    assert high[0] < 5  # the unimportant outlier counts at 1/100 of its size
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, 2] = False
    _, high = weighted_channel_range(x, torch.ones(2, 5), keep)
    assert high[0] < 5  # padding does not count at all


def test_modality_ratios_are_finite_and_floored_at_their_median():
    vision = torch.tensor([0.1, 0.4, 0.05, 0.3])
    text = torch.tensor([1.0, 1.0, 1.0, 1.0])
    ratios = modality_ratios(vision, text)
    median = torch.tensor([0.1, 0.4, 0.05, 0.3]).median()
    assert torch.isfinite(ratios).all()
    assert torch.equal(ratios, torch.tensor([0.1, 0.4, 0.05, 0.3]).clamp_min(median))
    with pytest.raises(ValueError, match="answer tokens"):
        modality_ratios(vision, torch.tensor([1.0, 0.0, 1.0, 1.0]))
