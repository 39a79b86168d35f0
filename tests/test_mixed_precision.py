"""Layer-wise mixed precision: the allocation under a budget, the units, and the recipe through the real ``oneshot``."""

import json
import math
import random
from functools import partial

import pytest
import torch
import yaml

import qig_plugin  # noqa: F401  (registers the modifiers)
from qig_plugin.mixed_precision import (
    QuantUnit,
    allocate_widths,
    average_bits,
    plan_mixed_precision,
    quant_units,
)
from tests.modifiers.tiny_llama import (
    calibrate_tiny_llama,
    load_tiny_llama,
    random_token_dataset,
)

WIDTHS = (2, 3, 4, 8)


def random_units_and_costs(count: int, seed: int):
    rng = random.Random(seed)
    units = [QuantUnit(f"unit{i}", (f"unit{i}.linear",), rng.choice([4096, 8192, 16384])) for i in range(count)]
    # convex, decreasing in the width, as quantization error is
    costs = {u.name: {bits: rng.uniform(0.5, 2.0) * 4.0 ** -bits for bits in WIDTHS} for u in units}
    return units, costs


@pytest.mark.parametrize("budget", [2.0, 2.5, 3.0, 3.5, 4.0, 6.0, 8.0])
def test_the_budget_is_met_exactly_or_below(budget):
    units, costs = random_units_and_costs(40, seed=int(budget * 10))
    widths = allocate_widths(units, costs, budget)
    assert set(widths) == {u.name for u in units} and set(widths.values()) <= set(WIDTHS)
    assert average_bits(units, widths) <= budget + 1e-12
    # it narrows only while over the budget: undoing its last step (some unit one width wider) would not fit
    largest_step = max(u.weights for u in units) * 4 / sum(u.weights for u in units)
    assert average_bits(units, widths) > budget - largest_step or budget == 8


def test_the_least_sensitive_units_get_fewer_bits():
    units = [QuantUnit(name, (name,), 1000) for name in ("robust", "fragile")]
    costs = {"robust": {bits: 4.0 ** -bits for bits in WIDTHS}, "fragile": {bits: 100 * 4.0 ** -bits for bits in WIDTHS}}
    assert allocate_widths(units, costs, 3.0) == {"robust": 2, "fragile": 4}


@pytest.mark.parametrize("budget", [1.5, math.nan])
def test_a_budget_below_the_narrowest_width_is_refused_with_the_fix(budget):
    units, costs = random_units_and_costs(3, seed=0)
    with pytest.raises(ValueError, match=r"below the narrowest candidate width \(2 bits\); ask for at least 2"):
        allocate_widths(units, costs, budget)


def test_units_keep_fused_linears_together(tiny_llama_dir):
    units, _ = quant_units(load_tiny_llama(tiny_llama_dir))
    assert [u.name for u in units[:4]] == [
        "model.layers.0.self_attn.{q_proj,k_proj,v_proj}", "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.{gate_proj,up_proj}", "model.layers.0.mlp.down_proj"]
    assert len(units) == 8 and sum(u.weights for u in units) == 2 * (128 * 128 * 2 + 64 * 128 * 2 + 3 * 128 * 256)


def rows(samples: int):
    dataset = random_token_dataset(samples=samples)
    return [{key: torch.tensor([row[key]]) for key in ("input_ids", "attention_mask")} for row in dataset]


@pytest.mark.parametrize("sensitivity", ["qig", "entropy"])
def test_a_plan_becomes_a_recipe_gptq_runs_with_fused_widths_shared(sensitivity, tiny_llama_dir, tmp_path):
    model = load_tiny_llama(tiny_llama_dir)
    plan = plan_mixed_precision(model, rows(3), budget_bits=3.5, sensitivity=sensitivity)
    assert plan.average_bits <= 3.5 and len(set(plan.widths.values())) > 1  # a real mix
    assert all(set(costs.values()) != {0.0} for costs in plan.costs.values())
    assert all(costs[2] > costs[4] for costs in plan.costs.values())  # fewer bits hurt more

    recipe = plan.recipe("GPTQModifier")
    assert "share a width" in recipe and yaml.safe_load(recipe)
    quantized = calibrate_tiny_llama(tiny_llama_dir, recipe, samples=2)
    quantized.save_pretrained(tmp_path / "out", save_compressed=True)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    width_of = {name: group["weights"]["num_bits"] for group in config["config_groups"].values()
                for name in group["targets"]}
    for unit in plan.units:
        assert {width_of[name] for name in unit.linears} == {plan.widths[unit.name]}


def test_uniform_takes_the_widest_width_within_the_budget(tiny_llama_dir):
    plan = plan_mixed_precision(load_tiny_llama(tiny_llama_dir), rows(1), budget_bits=3.5, sensitivity="uniform")
    assert set(plan.widths.values()) == {3} and plan.costs is None


def test_sixteen_bits_keeps_a_unit_unquantized_and_out_of_the_recipe(tiny_llama_dir):
    plan = plan_mixed_precision(load_tiny_llama(tiny_llama_dir), rows(2), budget_bits=10.0, widths=(4, 16))
    kept = [unit for unit in plan.units if plan.widths[unit.name] == 16]
    assert kept and plan.average_bits <= 10.0 and all(plan.costs[unit.name][16] == 0.0 for unit in plan.units)
    (group,) = yaml.safe_load(plan.recipe())["quant_stage"]["quant_modifiers"]["QIGGPTQModifier"]["config_groups"].values()
    assert group["weights"]["num_bits"] == 4
    assert not {name for unit in kept for name in unit.linears} & set(group["targets"])
    everything_kept = plan_mixed_precision(load_tiny_llama(tiny_llama_dir), rows(1), 16.0, (4, 16), "uniform")
    with pytest.raises(ValueError, match="nothing to quantize; lower the budget"):
        everything_kept.recipe()


def test_plan_bits_writes_a_recipe_qig_quantize_runs(tmp_path, capsys):
    from qig_plugin.cli import main
    from tests.tiny_text_folder import build_tiny_text_folder

    model = build_tiny_text_folder(tmp_path)
    recipe = tmp_path / "mixed.yaml"
    assert main(["plan-bits", str(model), "--bits", "3.5", "--samples", "2", "--output", str(recipe)]) == 0
    assert "average      " in capsys.readouterr().out
    groups = yaml.safe_load(recipe.read_text())["quant_stage"]["quant_modifiers"]["QIGGPTQModifier"]["config_groups"]
    assert len(groups) > 1
    assert main(["quantize", str(model), "--recipe", str(recipe), "--samples", "2", "--allow-unservable",
                 "--output", str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert {g["weights"]["num_bits"] for g in config["config_groups"].values()} == {
        g["weights"]["num_bits"] for g in groups.values()}


@pytest.mark.parametrize(("arguments", "message"), [
    (["--bits", "1.5"], "--bits: budget of 1.5 bits per weight is below the narrowest candidate width"),
    (["--bits", "3", "--widths", "3", "12"], "--widths 12: pass weight widths from 1 to 8 bits, or 16"),
    (["--bits", "3", "--output-exists"], "already exists; choose another --output or pass --overwrite"),
])
def test_plan_bits_refuses_bad_input_before_loading_anything(arguments, message, tmp_path, capsys):
    from qig_plugin.cli import main

    output = tmp_path / "recipe.yaml"
    if "--output-exists" in arguments:
        arguments.remove("--output-exists")
        output.write_text("mine\n")
    assert main(["plan-bits", str(tmp_path / "no-model-needed"), *arguments, "--output", str(output)]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob(".*.tmp"))


def test_qig_costs_are_each_blocks_discrepancy_relative_to_the_residual_stream(tiny_llama_dir):
    """One scale for every unit: a token-wise unit's cost is its block's output discrepancy over the residual's RMS,
    summed over tokens; attention's (QIG shares of the same total) lies between that total over the largest and
    over the smallest residual RMS. (Raw QIG scores are on a different scale for attention than for MLPs.) The
    ``discrepancy`` control is the first form for every unit."""
    from compressed_tensors.quantization import QuantizationArgs

    from qig_plugin.attribution import block_discrepancy
    from qig_plugin.modifiers.language_model import decoder_layers

    model = load_tiny_llama(tiny_llama_dir)
    batches = rows(2)
    plan = plan_mixed_precision(model, batches, budget_bits=3.5, widths=(3, 8), sensitivity="qig")
    control = plan_mixed_precision(model, batches, budget_bits=3.5, widths=(3, 8), sensitivity="discrepancy")
    units, group_of = quant_units(model)
    _, layers = decoder_layers(model)
    args3 = QuantizationArgs(num_bits=3, type="int", symmetric=True, strategy="group", group_size=64)
    expected = {unit.name: [0.0, 0.0, 0.0] for unit in units}  # sum d/r, sum d / max r, sum d / min r
    residual = {}

    def residual_hook(layer, args, kwargs):
        residual["rms"] = args[0].float().pow(2).mean(-1).sqrt() if args else \
            kwargs["hidden_states"].float().pow(2).mean(-1).sqrt()

    def block_hook(_block, args, kwargs, name):
        if residual.get("busy"):
            return
        residual["busy"] = True
        group, rms = group_of[name], residual["rms"]
        d = block_discrepancy(group.block, args, kwargs, dict.fromkeys(group.linears, args3))
        expected[name][0] += float((d / rms).sum())
        expected[name][1] += float(d.sum() / rms.max())
        expected[name][2] += float(d.sum() / rms.min())
        residual["busy"] = False

    handles = [layer.register_forward_pre_hook(residual_hook, with_kwargs=True) for layer in layers]
    handles += [group.block.register_forward_pre_hook(partial(block_hook, name=name), with_kwargs=True)
                for name, group in group_of.items()]
    with torch.no_grad():
        for batch in batches:
            model(**batch, use_cache=False)
    for handle in handles:
        handle.remove()
    for name, (relative, low, high) in expected.items():
        assert control.costs[name][3] == pytest.approx(relative, rel=1e-4), name  # forward only, every unit
        cost = plan.costs[name][3]
        if "self_attn.{" in name:  # attention: QIG shares of the total
            assert low * 0.999 <= cost <= high * 1.001, name
        else:
            assert cost == pytest.approx(relative, rel=1e-4), name
