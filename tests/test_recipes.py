"""Every recipe under recipes/ runs on a tiny model and writes the config it promises."""

import json
from pathlib import Path

import pytest
import yaml
from llmcompressor import oneshot

import qig_plugin  # noqa: F401  (registers the modifiers)
from tests.modifiers.tiny_llama import load_tiny_llama, random_token_dataset, tiny_tokenizer

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def declared_groups(recipe_path: Path) -> dict:
    stages = yaml.safe_load(recipe_path.read_text())
    (modifiers,) = [m for stage in stages.values() for m in stage.values()]
    quantizing = [fields for fields in modifiers.values() if "config_groups" in fields]
    assert len(quantizing) == 1, f"{recipe_path.name}: expected one quantizing modifier"
    return quantizing[0]["config_groups"]


def test_recipes_exist_in_stock_twins():
    names = {path.stem for path in RECIPES}
    qig = {name for name in names if name.startswith("qig_gptq_")}
    assert {"qig_gptq_w4a16", "qig_gptq_w4a8"} <= qig
    assert all(name.removeprefix("qig_") in names for name in qig)


@pytest.mark.parametrize("recipe_path", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_checkpoint_matches_recipe(recipe_path, tiny_llama_dir, tmp_path):
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
    model.save_pretrained(tmp_path, save_compressed=True)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
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
    assert "lm_head" in config["ignore"]
