import pytest
import torch

from qig_plugin.attribution import (
    discrepancy,
    integrated_gradients,
    linear_token_scores,
    qig_token_scores,
    quadrature,
    token_weights,
)


class SmallBlock(torch.nn.Module):
    """A block that mixes tokens (causal averaging) between two nonlinear linears."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.up = torch.nn.Linear(hidden, 2 * hidden)
        self.down = torch.nn.Linear(2 * hidden, hidden)

    def forward(self, x, up_weight=None):
        up = torch.nn.functional.linear(x, self.up.weight if up_weight is None else up_weight, self.up.bias)
        seq = x.shape[1]
        causal = torch.tril(torch.ones(seq, seq, dtype=x.dtype)) / torch.arange(1, seq + 1, dtype=x.dtype)[:, None]
        return self.down(torch.tanh(causal @ up))


def brute_force_scores(fp_fn, q_fn, x, baseline, nodes, weights):
    """Per token and channel: finite-difference gradient along the path, one entry at a time."""
    batch, seq, hidden = x.shape
    objective = lambda z: discrepancy(fp_fn(z), q_fn(z)).sum()
    epsilon = 1e-6
    attributions = torch.zeros_like(x)
    for b in range(batch):
        for t in range(seq):
            for h in range(hidden):
                gradient = 0.0
                for a, w in zip(nodes, weights):
                    point = baseline + a * (x - baseline)
                    plus, minus = point.clone(), point.clone()
                    plus[b, t, h] += epsilon
                    minus[b, t, h] -= epsilon
                    gradient += w * (objective(plus) - objective(minus)) / (2 * epsilon)
                attributions[b, t, h] = (x - baseline)[b, t, h] * gradient
    return attributions.abs().mean(-1)


@pytest.mark.parametrize("baseline_kind", ["zero", "quantized"])
def test_qig_token_scores_match_brute_force(baseline_kind):
    torch.manual_seed(0)
    block = SmallBlock().double()
    quantized_up = (block.up.weight * 4).round() / 4
    fp_fn = lambda z: block(z)
    q_fn = lambda z: block(z, quantized_up)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    baseline = None if baseline_kind == "zero" else (x * 8).round() / 8
    scores, used, _ = qig_token_scores(fp_fn, q_fn, x, baseline, steps=3, rule="gauss_legendre")
    assert used == 3

    nodes, weights = quadrature(3, "gauss_legendre")
    start = torch.zeros_like(x) if baseline is None else baseline
    expected = brute_force_scores(fp_fn, q_fn, x, start, nodes.tolist(), weights.tolist())
    assert scores.shape == (2, 5)
    assert torch.allclose(scores, expected, rtol=1e-4, atol=1e-9)


def test_linear_closed_form_matches_brute_force():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 6).double()
    quantized = (linear.weight * 4).round() / 4
    fp_fn = lambda z: linear(z)
    q_fn = lambda z: torch.nn.functional.linear(z, quantized, linear.bias)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    scores = linear_token_scores(x, linear.weight.detach() - quantized)

    nodes, weights = quadrature(3, "gauss_legendre")
    expected = brute_force_scores(fp_fn, q_fn, x, torch.zeros_like(x), nodes.tolist(), weights.tolist())
    assert scores.shape == (2, 5) and scores.min() > 0
    assert torch.allclose(scores, expected, rtol=1e-4, atol=1e-9)


def small_block_branches(seed: int = 0, step: float = 0.25):
    torch.manual_seed(seed)
    block = SmallBlock().double()
    quantized_up = (block.up.weight / step).round() * step
    return (lambda z: block(z)), (lambda z: block(z, quantized_up))


def test_few_nodes_are_kept_only_when_complete():
    fp_fn, q_fn = small_block_branches()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    objective = lambda z: discrepancy(fp_fn(z), q_fn(z)).sum()
    change = (objective(x) - objective(torch.zeros_like(x))).item()
    two_nodes = integrated_gradients(objective, x, steps=2)
    error = abs(two_nodes.sum().item() - change) / abs(change)

    loose, loose_used, _ = qig_token_scores(fp_fn, q_fn, x, steps=6, min_steps=2, completeness_tol=2 * error)
    assert loose_used == 2
    assert torch.allclose(loose, two_nodes.abs().mean(-1))

    # a failed count is retaken with half again as many nodes: 2, 3, 4, then steps
    strict, strict_used, _ = qig_token_scores(fp_fn, q_fn, x, steps=6, min_steps=2, completeness_tol=error / 2)
    assert strict_used in (3, 4, 6)
    assert torch.allclose(strict, integrated_gradients(objective, x, steps=strict_used).abs().mean(-1))
    for count in range(2, strict_used):
        if count in (2, 3, 4):
            retaken = integrated_gradients(objective, x, steps=count)
            assert abs(retaken.sum().item() - change) > error / 2 * abs(change)

    exact, exact_used, _ = qig_token_scores(fp_fn, q_fn, x, steps=6, min_steps=2, completeness_tol=0.0)
    assert exact_used == 6
    assert torch.allclose(exact, integrated_gradients(objective, x, steps=6).abs().mean(-1))


def test_token_weights_sum_to_one_per_sample_and_ignore_masked_tokens():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0], [0.5, 0.5, 1.0, 2.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    weights = token_weights(scores, mask)
    assert torch.allclose(weights.sum(-1), torch.ones(2))
    assert weights[1, 4] == 0
    # the outlier is clipped to Q3 + 1.5 IQR, so it weighs far less than its raw share
    raw_share = 100.0 / scores[0].sum()
    assert weights[0, 4] < raw_share / 2
    assert torch.all(weights[0, :4].diff() > 0)


def test_iqr_none_is_plain_normalization():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])
    assert torch.allclose(token_weights(scores, iqr_k=None), scores / scores.sum())


def test_masked_tokens_do_not_move_the_quartiles():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 1e6]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    assert torch.allclose(token_weights(scores, mask)[0, :5], token_weights(scores[:, :5])[0])


def test_all_zero_scores_give_uniform_weights_over_kept_tokens():
    weights = token_weights(torch.zeros(1, 4), torch.tensor([[1, 1, 0, 1]]))
    assert torch.allclose(weights, torch.tensor([[1 / 3, 1 / 3, 0.0, 1 / 3]]))


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match="does not match scores"):
        token_weights(torch.ones(2, 5), torch.ones(2, 4))
    with pytest.raises(FloatingPointError, match="float32"):
        token_weights(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        token_weights(torch.ones(5))
