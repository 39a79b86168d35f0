"""The llm-compressor / compressed-tensors internals qig-plugin relies on, each checked by name.

Every private name below is used only in ``qig_plugin/upstream.py``. When an llm-compressor release
renames, removes or reshapes one, the test named after it fails here, before any calibration test
fails in a puzzling way.
"""

import inspect
import subprocess
import sys

import pytest
import torch

from qig_plugin import upstream
from qig_plugin.attribution import QIGSettings

AWQ = upstream.AWQModifier
SMOOTHQUANT = upstream.SmoothQuantModifier


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_a_llm_compressor_of_another_series_is_refused_at_import_with_the_supported_one(monkeypatch):
    monkeypatch.setattr(upstream, "version", lambda name: "0.15.2" if name == "llmcompressor" else "0.19.0")
    with pytest.raises(ImportError, match=r"qig-plugin 0\.1\.0 supports llmcompressor 0\.14\.x; found 0\.15\.2"):
        upstream.check_versions()
    monkeypatch.setattr(upstream, "version", lambda name: "0.14.3" if name == "llmcompressor" else "0.19.1")
    upstream.check_versions()  # patch releases of the supported series pass


def test_modifier_factory_tables():
    factory = upstream.ModifierFactory
    for table in ("_errors", "_registered_registry", "_main_registry", "_experimental_registry"):
        assert isinstance(getattr(factory, table), dict), table
    assert isinstance(factory._loaded, bool) and callable(factory.refresh)
    assert upstream.modifier_class("QIGGPTQModifier").__name__ == "QIGGPTQModifier"
    assert upstream.modifier_class("GPTQModifier") is upstream.GPTQModifier
    assert upstream.close_modifier_name("QIGGPTQModifer") == "QIGGPTQModifier"


def test_hooks_global_switch():
    assert isinstance(upstream.HooksMixin._HOOKS_DISABLED, bool)
    with upstream.hooks_disabled():
        assert upstream.HooksMixin._HOOKS_DISABLED
        with upstream.hooks_disabled():  # nested: still off after the inner context
            pass
        assert upstream.HooksMixin._HOOKS_DISABLED
    assert not upstream.HooksMixin._HOOKS_DISABLED


def test_intermediates_cache_pin_memory():
    assert _parameters(upstream.IntermediatesCache.pin_memory) == ["self", "batch_index", "input_names"]
    original = upstream.IntermediatesCache.pin_memory
    with upstream.unpinned_caches_without_accelerator():
        if not torch.accelerator.is_available():
            assert upstream.IntermediatesCache.pin_memory is upstream._skip_pinning
    assert upstream.IntermediatesCache.pin_memory is original


def test_gptq_module_names():
    assert "_module_names" in upstream.GPTQModifier.__private_attributes__
    assert _parameters(upstream.GPTQModifier.calibrate_module) == ["self", "module", "args", "_output"]


def test_awq_grid_search_seams():
    for attribute in ("_parent_args_cache", "_smooth_activation_stats", "_resolved_mappings"):
        assert attribute in AWQ.__private_attributes__, attribute
    assert _parameters(AWQ._compute_best_scale) == ["self", "mapping", "fp16_outputs", "orig_layer_weights"]
    assert _parameters(AWQ._compute_loss) == ["self", "fp16_outputs", "int_w_outputs"]
    assert _parameters(AWQ._apply_smoothing) == ["self", "model"]
    # x_mean is read from the stats as [sum, count] inside the grid search
    assert "x_sum, count = self._smooth_activation_stats[mapping.smooth_name]" in inspect.getsource(
        AWQ._compute_best_scale
    )


def test_smoothquant_smoothing_seams():
    assert _parameters(SMOOTHQUANT._infer_mappings_from_model) == ["self", "model"]
    assert _parameters(SMOOTHQUANT._apply_smoothing) == ["self", "model"]
    assert _parameters(SMOOTHQUANT._reduce_activation_scales) == ["self"]
    assert _parameters(SMOOTHQUANT._calculate_smoothing_scales) == ["self", "balance_layers", "activation_scales"]
    assert {"scales_", "resolved_mappings_"} <= set(SMOOTHQUANT.model_fields)
    assert isinstance(upstream.MINIMUM_SMOOTHING_SCALE, float)


def test_experts_token_order():
    forward = upstream.LinearExperts2D.forward
    assert _parameters(forward) == ["self", "hidden_states", "top_k_index", "top_k_weights"]
    source = inspect.getsource(forward)
    assert "expert_mask.permute(2, 1, 0)" in source and "torch.where(expert_mask[expert_index])" in source
    top_k_index = torch.randint(0, 5, (23, 2), generator=torch.Generator().manual_seed(0))
    expert_mask = torch.nn.functional.one_hot(top_k_index, 5).permute(2, 1, 0)
    for expert in range(5):
        expected = torch.where(expert_mask[expert])
        assert all(torch.equal(a, b) for a, b in zip(upstream.expert_token_rows(top_k_index, expert), expected))


def test_autoround_block_loss_and_pipeline_seams():
    assert upstream.AUTO_ROUND_SERIES == "0.15"
    quantizer = upstream._sign_round_quantizer()
    assert _parameters(quantizer._get_loss)[:6] == [
        "self", "pred_output", "ref_output", "indices", "loss_func", "device"]
    # the tuning loop calls it once per batch of sample indices
    assert "self._get_loss(pred_output, ref_output, indices, mse_loss, device" in inspect.getsource(
        quantizer.quantize_block)
    assert _parameters(upstream.AutoRoundModifier.apply_autoround) == ["self", "state", "modules"]
    assert _parameters(upstream.AutoRoundModifier._is_decoding_layer) == ["self", "module"]
    # llm-compressor turns error propagation off by class name; the wrapped pipeline does it by isinstance
    stock = inspect.getsource(upstream._STOCK_SEQUENTIAL_PIPELINE)
    assert 'type(m).__name__ == "AutoRoundModifier"' in stock and "if dataset_args.propagate_error:" in stock
    assert upstream.SequentialPipeline.__call__ is upstream._sequential_pipeline


def test_an_auto_round_of_another_series_is_refused_with_the_supported_one(monkeypatch):
    monkeypatch.setattr(upstream, "version", lambda name: "0.14.2")
    with pytest.raises(ImportError, match=r"auto-round 0\.15\.x; found 0\.14\.2"):
        upstream._sign_round_quantizer()


def test_no_other_module_touches_these_internals():
    import re
    from pathlib import Path

    import qig_plugin

    private_names = ("_errors", "_registered_registry", "_main_registry", "_HOOKS_DISABLED", "_module_names",
                     "_parent_args_cache", "_smooth_activation_stats", "_resolved_mappings", "_compute_best_scale",
                     "_compute_loss", "_apply_smoothing", "_reduce_activation_scales", "_calculate_smoothing_scales",
                     "_infer_mappings_from_model", "pin_memory", "_is_decoding_layer", "_get_loss", "propagate_error")
    package = Path(qig_plugin.__file__).parent
    offenders = [
        f"{path.relative_to(package)}: {name}"
        for path in package.rglob("*.py")
        if path.name != "upstream.py"
        for name in private_names
        if re.search(r"[.\"']" + re.escape(name) + r"\b", path.read_text())  # an attribute or its name as a string
    ]
    assert offenders == []


def test_qig_settings_are_validated_together():
    with pytest.raises(ValueError, match=r"qig_min_steps \(4\) exceeds qig_steps \(3\)"):
        QIGSettings(qig_steps=3, qig_min_steps=4)
    with pytest.raises(ValueError, match="qig_min_steps"):
        upstream.modifier_class("QIGGPTQModifier")(scheme="W4A16", targets="Linear", qig_steps=2, qig_min_steps=3)
    assert QIGSettings(qig_iqr_clip=False).iqr_multiplier is None


def run_python(*lines: str) -> str:
    """Run the lines in a fresh interpreter; return its stdout (it must exit 0)."""
    result = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_qig_help_and_bad_usage_import_neither_torch_nor_llmcompressor():
    output = run_python(
        "import sys",
        "from qig_plugin.cli import main",
        "assert main(['--help']) == 0",
        "assert main(['quantize']) == 2",
        "import qig_plugin.serve_env",
        "print('HEAVY', sorted({'torch', 'llmcompressor', 'transformers'} & set(sys.modules)))",
    )
    assert "HEAVY []" in output


def test_import_qig_plugin_registers_the_modifiers_once_llmcompressor_loads():
    output = run_python(
        "import sys",
        "import qig_plugin",
        "assert 'llmcompressor' not in sys.modules",
        "from llmcompressor.recipe import Recipe",
        "recipe = 'quant_stage:\\n  quant_modifiers:\\n    QIGGPTQModifier: {targets: Linear, scheme: W8A8}\\n'",
        "print(type(Recipe.create_instance(recipe).modifiers[0]).__name__)",
    )
    assert output.strip().endswith("QIGGPTQModifier")
