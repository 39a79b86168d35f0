"""Every shipped recipe (qig_plugin/recipes/) runs on a tiny model and writes the config it promises."""

import json
from pathlib import Path

import pytest
import yaml
from llmcompressor import oneshot

import qig_plugin  # noqa: F401  (registers the modifiers)
from qig_plugin.quantize import quantize_to_checkpoint
from qig_plugin.recipes import shipped_recipes
from qig_plugin.upstream import unpinned_caches_without_accelerator
from tests.modifiers.tiny_llama import load_tiny_llama, random_token_dataset, tiny_tokenizer
from tests.tiny_models import tiny_idefics3

RECIPES = shipped_recipes()
# plugin recipe prefix -> what its stock twin's name starts with instead
TWIN_PREFIXES = {"qig_gptq_": "gptq_", "qig_awq_": "awq_", "qig_sq_gptq_": "sq_gptq_", "mbq_awq_": "awq_",
                 "qig_autoround_": "autoround_"}
REQUIRED = {
    "qig_gptq_w4a16", "qig_gptq_w4a8", "qig_awq_w3a16", "qig_awq_w4a16",
    "qig_sq_gptq_w4a8", "qig_sq_gptq_w8a8", "mbq_awq_w3a16", "qig_autoround_w3a16", "qig_autoround_w4a16",
    "qig_autoround_w4a8",
}


def recipe_modifiers(recipe_path: Path) -> dict[str, dict]:
    stages = yaml.safe_load(recipe_path.read_text())
    return {name: fields for stage in stages.values() for mods in stage.values() for name, fields in mods.items()}


def declared_groups(recipe_path: Path) -> dict:
    quantizing = [fields for fields in recipe_modifiers(recipe_path).values() if "config_groups" in fields]
    assert len(quantizing) == 1, f"{recipe_path.name}: expected one modifier with config_groups"
    return quantizing[0]["config_groups"]


def needs_images(recipe_path: Path) -> bool:
    return "MBQModifier" in recipe_modifiers(recipe_path)


@pytest.fixture(autouse=True)
def stock_awq_runs_on_cpu():
    """Stock AWQ 0.14.0.1 pins its cache unconditionally, which fails on CPU-only torch."""
    with unpinned_caches_without_accelerator():
        yield


def test_recipes_exist_in_stock_twins():
    names = {path.stem for path in RECIPES}
    assert REQUIRED <= names
    plugin = [name for name in names if any(name.startswith(prefix) for prefix in TWIN_PREFIXES)]
    for name in plugin:
        prefix = max((p for p in TWIN_PREFIXES if name.startswith(p)), key=len)
        twin = TWIN_PREFIXES[prefix] + name.removeprefix(prefix)
        assert twin in names, f"{name} has no stock twin {twin}"
        assert declared_groups(RECIPES[0].parent / f"{name}.yaml") == declared_groups(
            RECIPES[0].parent / f"{twin}.yaml"
        ), f"{name} and {twin} quantize differently"


@pytest.mark.parametrize("recipe_path", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_checkpoint_matches_recipe(recipe_path, tiny_llama_dir, tmp_path):
    if needs_images(recipe_path):
        tiny = tiny_idefics3(tmp_path / "model")
        quantize_to_checkpoint(tiny.model, tiny.processor, str(recipe_path), tiny.dataset.select(range(2)), tmp_path / "out")
    else:
        model = load_tiny_llama(tiny_llama_dir)
        oneshot(
            model=model,
            processor=tiny_tokenizer(),
            dataset=random_token_dataset(samples=2),
            recipe=str(recipe_path),
            num_calibration_samples=2,
            max_seq_length=24,
            pipeline="sequential",
        )
        model.save_pretrained(tmp_path / "out", save_compressed=True)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    (written,) = config["config_groups"].values()
    (declared,) = declared_groups(recipe_path).values()
    for kind in ("weights", "input_activations"):
        expected = declared.get(kind)
        if expected is None:
            assert written.get(kind) is None
            continue
        assert {key: written[kind][key] for key in expected} == expected
    expected_format = "pack-quantized" if "input_activations" not in declared else "int-quantized"
    assert config["format"] == expected_format
    assert any("lm_head" in name for name in config["ignore"])
    # every modifier ran, in order (the saved recipe.yaml is not parsed: llm-compressor 0.14 writes
    # GPTQ's actorder as a python/object tag that neither yaml.safe_load nor Recipe can read back)
    saved = (tmp_path / "out" / "recipe.yaml").read_text()
    positions = [saved.find(f"{name}:") for name in recipe_modifiers(recipe_path)]
    assert -1 not in positions and positions == sorted(positions), saved
