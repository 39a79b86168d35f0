import pytest
import torch

from qig_plugin.attribution import integrated_gradients, quadrature


def smooth_objective(x: torch.Tensor) -> torch.Tensor:
    return (torch.sin(x) + 0.3 * x**2 + torch.tanh(2 * x) * x).sum()


@pytest.mark.parametrize("rule", ["gauss_legendre", "uniform"])
def test_quadrature_weights_sum_to_one_and_nodes_in_unit_interval(rule):
    nodes, weights = quadrature(8, rule)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert nodes.min() >= 0 and nodes.max() <= 1


def test_uniform_rule_is_reference_mean_over_linspace():
    nodes, weights = quadrature(32, "uniform")
    assert torch.allclose(nodes, torch.linspace(0, 1, 32, dtype=torch.float64))
    assert torch.all(weights == 1 / 32)


def test_gauss_legendre_integrates_polynomials_exactly():
    nodes, weights = quadrature(4, "gauss_legendre")
    # degree 7 = 2 * 4 - 1 is the highest degree integrated exactly
    assert (weights * nodes**7).sum().item() == pytest.approx(1 / 8, rel=1e-12)


@pytest.mark.parametrize("baseline_kind", ["zero", "random"])
def test_completeness_at_default_settings(baseline_kind):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    baseline = None if baseline_kind == "zero" else 0.5 * torch.randn_like(x)
    start = torch.zeros_like(x) if baseline is None else baseline
    attributions = integrated_gradients(smooth_objective, x, baseline)
    expected = smooth_objective(x) - smooth_objective(start)
    assert attributions.shape == x.shape
    assert abs(attributions.sum().item() - expected.item()) <= 0.01 * abs(expected.item())


def test_linear_function_attribution_is_exact_with_one_node():
    torch.manual_seed(0)
    coefficients = torch.randn(5, 4)
    x = torch.randn(2, 5, 4)
    attributions = integrated_gradients(lambda z: (z * coefficients).sum(), x, steps=1)
    assert torch.allclose(attributions, x * coefficients, atol=1e-6)


def test_points_per_pass_does_not_change_the_result():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    one_at_a_time = integrated_gradients(smooth_objective, x, steps=8, points_per_pass=1)
    for points_per_pass in (3, None):
        batched = integrated_gradients(smooth_objective, x, steps=8, points_per_pass=points_per_pass)
        assert torch.allclose(one_at_a_time, batched, atol=1e-12)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown quadrature rule"):
        quadrature(4, "simpson")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        quadrature(0, "uniform")
    with pytest.raises(ValueError, match="must return a scalar"):
        integrated_gradients(lambda z: z * 2, torch.ones(1, 2, 3))


@pytest.mark.parametrize("baseline_kind", ["zero", "random"])
@pytest.mark.parametrize("points_per_pass", [None, 2])
def test_hoisted_input_maps_give_the_same_integral(baseline_kind, points_per_pass):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    baseline = None if baseline_kind == "zero" else 0.5 * torch.randn_like(x)
    read, unread = torch.randn(4, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)

    # reads its input directly and through one map; the second map's projection is never used
    def hoisted(points, projected, _unused):
        return (torch.tanh(projected) ** 2).sum() + smooth_objective(points)

    def plain(points):
        return hoisted(points, points @ read.T, None)

    expected = integrated_gradients(plain, x, baseline, steps=5, points_per_pass=points_per_pass)
    attributions = integrated_gradients(
        hoisted, x, baseline, steps=5, points_per_pass=points_per_pass, input_maps=[read, unread]
    )
    assert torch.allclose(attributions, expected, rtol=1e-10, atol=1e-12)
