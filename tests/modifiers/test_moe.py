"""QIG on a mixture-of-experts decoder (tiny Qwen3-MoE: 4 experts, top-2, every layer sparse).

Each expert's linears see only 2-D rows (all ``T`` tokens in llm-compressor's default all-experts mode, else
the routed ones); QIG must weight exactly the routed rows, by score times routing weight, and leave the
all-experts filler rows at stock weight 1.
"""

import pytest
import torch
from llmcompressor import oneshot
from llmcompressor.modeling.moe.context import moe_calibration_context
from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
from llmcompressor.modeling.moe.linearize import linearize_moe
from llmcompressor.modifiers.gptq import GPTQModifier
from safetensors.torch import load_file

import qig_plugin  # noqa: F401  (registers the modifiers)
from qig_plugin.data import batch_one_collator
from qig_plugin.modifiers import QIGAWQModifier, QIGGPTQModifier, qig_awq, qig_gptq
from qig_plugin.modifiers.experts import ExpertRouting
from tests.tiny_models import MOE_IGNORE, TINY_MOE_TEXT, tiny_text_llm

NUM_EXPERTS = TINY_MOE_TEXT["num_experts"]
W4_G64 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return tiny_text_llm(tmp_path_factory.mktemp("moe"), "qwen3_moe")


def _reload(tiny):
    return type(tiny.model).from_pretrained(tiny.model.config.name_or_path, dtype=torch.float32)


def _calibrate(tiny, model, modifiers, **kwargs):
    oneshot(
        model=model,
        processor=tiny.processor,
        dataset=tiny.dataset,
        recipe=modifiers,
        num_calibration_samples=len(tiny.dataset),
        data_collator=batch_one_collator,
        sequential_targets=[tiny.sequential_target],
        pipeline="sequential",
        shuffle_calibration_samples=False,
        **kwargs,
    )


def _record_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def record(*args):
        result = real(*args)
        calls.append((args, result))
        return result

    monkeypatch.setattr(module, name, record)
    return calls


def test_routes_name_the_same_tokens_in_all_experts_and_routed_only_modes(moe):
    model = _reload(moe)
    linearize_moe(model)
    experts = next(m for m in model.modules() if isinstance(m, LinearExperts2D))
    routing = ExpertRouting(model)
    seen = []
    experts.register_forward_pre_hook(lambda m, args, kwargs: routing.record_hook(m, args, kwargs), with_kwargs=True)
    for index in range(NUM_EXPERTS):
        experts[index].register_forward_pre_hook(
            lambda m, args: seen.append((args[0], routing.route(m, args[0].shape[0])))
        )
    hidden = torch.randn(10, model.config.hidden_size)
    top_k_index = torch.stack([torch.randperm(NUM_EXPERTS)[:2] for _ in range(10)])
    top_k_weights = torch.rand(10, 2)
    with torch.no_grad():
        experts(hidden, top_k_index, top_k_weights)  # routed rows only
        with moe_calibration_context():
            experts(hidden, top_k_index, top_k_weights)  # every expert on all 10 rows

    routed_only, all_experts = seen[:NUM_EXPERTS], seen[NUM_EXPERTS:]
    for expert, ((x_routed, routed), (x_all, full)) in enumerate(zip(routed_only, all_experts)):
        assert full.total_rows == 10 and routed.total_rows == x_routed.shape[0]
        assert torch.equal(x_routed[routed.rows], x_all[full.rows])  # the same tokens, in the same order
        assert torch.equal(full.rows.sort().values, torch.where((top_k_index == expert).any(-1))[0])
        token, slot = torch.where(top_k_index == expert)
        assert torch.equal(full.routing_weights.sort().values, top_k_weights[token, slot].sort().values)


def test_qig_gptq_weights_each_experts_routed_rows_and_keeps_the_rest_at_one(moe, tmp_path, monkeypatch):
    calls = _record_calls(monkeypatch, qig_gptq, "expert_token_weights")
    model = _reload(moe)
    modifier = QIGGPTQModifier(qig_steps=2, ignore=MOE_IGNORE, config_groups={
        "group_0": {"targets": ["Linear"], "weights": W4_G64}})
    _calibrate(moe, model, [modifier])

    layers = model.config.num_hidden_layers
    # per layer and sample: every expert's gate/up group (through the expert) and its down_proj
    assert len(calls) == layers * len(moe.dataset) * NUM_EXPERTS * 2
    tokens = {len(row["input_ids"]) for row in moe.dataset}
    for (scores, route, _), weights in calls:
        assert route.total_rows in tokens and weights.shape == (route.total_rows,)  # all-experts mode
        filler = torch.ones(route.total_rows, dtype=torch.bool)
        filler[route.rows] = False
        assert (weights[filler] == 1).all()
        if route.rows.numel():
            routed = weights[route.rows]
            assert torch.allclose(routed.mean(), torch.tensor(1.0)) and scores.shape == (1, route.rows.numel())
    assert any(weights[route.rows].std() > 0.05 for (_, route, _), weights in calls if route.rows.numel() > 2)


def test_qig_gptq_with_weights_of_one_is_bit_identical_to_stock_gptq_on_moe(moe, tmp_path, monkeypatch):
    scheme = {"ignore": MOE_IGNORE, "config_groups": {"group_0": {"targets": ["Linear"], "weights": W4_G64}}}
    stock = _reload(moe)
    _calibrate(moe, stock, [GPTQModifier(**scheme)])
    stock.save_pretrained(tmp_path / "stock", save_compressed=True)

    monkeypatch.setattr(qig_gptq, "expert_token_weights", lambda scores, route, iqr_k: torch.ones(route.total_rows))
    monkeypatch.setattr(QIGGPTQModifier, "qig_weights", lambda self, scores, keep: torch.ones_like(scores))
    ones = _reload(moe)
    _calibrate(moe, ones, [QIGGPTQModifier(qig_steps=2, **scheme)])
    ones.save_pretrained(tmp_path / "ones", save_compressed=True)

    a, b = load_file(tmp_path / "stock" / "model.safetensors"), load_file(tmp_path / "ones" / "model.safetensors")
    assert a.keys() == b.keys() and any("experts" in name for name in a)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_qig_awq_weights_the_expert_up_down_search_by_routed_rows(moe, monkeypatch):
    from llmcompressor.modifiers.quantization import QuantizationModifier
    calls = _record_calls(monkeypatch, qig_awq, "expert_token_weights")
    model = _reload(moe)
    weights = {**W4_G64, "symmetric": False}
    stage = QuantizationModifier(ignore=MOE_IGNORE, config_groups={"group_0": {"targets": ["Linear"], "weights": weights}})
    _calibrate(moe, model, [QIGAWQModifier(qig_steps=2), stage])

    # one call per expert up -> down mapping, layer and calibration sample
    assert len(calls) == model.config.num_hidden_layers * NUM_EXPERTS * len(moe.dataset)
    for (_, route, _), lam in calls:
        assert lam.shape == (route.total_rows,)
        if route.rows.numel():
            assert torch.allclose(lam[route.rows].mean(), torch.tensor(1.0))
