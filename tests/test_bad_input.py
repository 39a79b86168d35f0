"""Bad input: each case exits 2 (or raises, through the Python API) with a message naming the problem
and the fix, and writes nothing: no output folder, no partial sibling, the inputs unchanged.

Checks that come before the model is loaded run against a folder that only has the right file names;
``_load_model_and_processor`` is replaced by a function that fails the test, which proves the check
ran before any model work. (A recipe naming a QIG modifier without ``import qig_plugin`` is covered
by ``tests/modifiers/test_qig_gptq.py::test_recipe_without_plugin_import_says_import_qig_plugin``.)
"""

import errno
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from qig_plugin import cli, quantize
from qig_plugin.cli import main
from qig_plugin.quantize import quantize_to_checkpoint
from qig_plugin.recipes import shipped_recipe
from qig_plugin.validation import NonFiniteActivationError
from tests.modifiers.tiny_llama import load_tiny_llama, random_token_dataset, tiny_tokenizer

W8A8_RECIPE = shipped_recipe("gptq_w8a8")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its content."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A folder with a model folder of the right file names; model loading fails the test."""

    def must_not_load(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(cli, "_load_model_and_processor", must_not_load)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    config = {"model_type": "idefics3", "text_config": {"hidden_size": 576}, "vision_config": {}}
    (model_dir / "config.json").write_text(json.dumps(config))
    for name in ("model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        (model_dir / name).write_text("")
    return tmp_path


def run_and_check_nothing_written(root: Path, argv: list[str], capsys) -> str:
    """Run ``qig argv``; assert exit 2, no new or changed file under ``root``; return stderr."""
    before = snapshot(root)
    assert main(argv) == 2
    assert snapshot(root) == before
    return capsys.readouterr().err


def quantize_args(root: Path, *extra: str) -> list[str]:
    return ["quantize", str(root / "model"), "--output", str(root / "out"), *extra]


def test_missing_model_folder(workspace, capsys):
    err = run_and_check_nothing_written(
        workspace, ["quantize", str(workspace / "nope"), "--scheme", "W8A8", "--output", str(workspace / "out")], capsys
    )
    assert "model folder" in err and "does not exist" in err and "save_pretrained" in err


def test_model_folder_without_tokenizer(workspace, capsys):
    (workspace / "model" / "tokenizer.json").unlink()
    err = run_and_check_nothing_written(workspace, quantize_args(workspace, "--scheme", "W8A8"), capsys)
    assert "no tokenizer files" in err and "processor.save_pretrained(folder)" in err


def test_vision_model_folder_without_image_processor(workspace, capsys):
    (workspace / "model" / "preprocessor_config.json").unlink()
    err = run_and_check_nothing_written(workspace, quantize_args(workspace, "--scheme", "W8A8"), capsys)
    assert "without image processor files" in err


def test_pickle_weights_are_not_read(workspace, capsys):
    model_dir = workspace / "model"
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    err = run_and_check_nothing_written(workspace, quantize_args(workspace, "--scheme", "W8A8"), capsys)
    assert "only pickle weights (pytorch_model.bin)" in err and "safe_serialization=True" in err


def test_remote_code_needs_trust_remote_code(workspace, capsys):
    config_file = workspace / "model" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "auto_map": {"AutoModel": "m.Model"}}))
    err = run_and_check_nothing_written(workspace, quantize_args(workspace, "--scheme", "W8A8"), capsys)
    assert "custom model code (AutoModel)" in err and "--trust-remote-code" in err


def test_flat_recipe_parses_to_no_modifiers(workspace, capsys):
    recipe = workspace / "flat.yaml"
    recipe.write_text("QIGGPTQModifier:\n  scheme: W8A8\n")
    err = run_and_check_nothing_written(workspace, quantize_args(workspace, "--recipe", str(recipe)), capsys)
    assert "parses to no modifiers" in err and "_stage" in err


def test_unknown_modifier_field_names_the_field_and_the_near_miss(workspace, capsys):
    recipe = workspace / "typo.yaml"
    recipe.write_text("q_stage:\n  q_modifiers:\n    QIGGPTQModifier:\n      scheme: W8A8\n      qig_stepz: 4\n")
    err = run_and_check_nothing_written(workspace, quantize_args(workspace, "--recipe", str(recipe)), capsys)
    assert "QIGGPTQModifier has no field 'qig_stepz'; did you mean 'qig_steps'?" in err


def test_unservable_scheme_is_refused_before_quantizing(workspace, capsys):
    # vLLM has no CPU kernel for 3-bit weights on any CPU
    err = run_and_check_nothing_written(workspace, quantize_args(workspace, "--scheme", "W3A16"), capsys)
    assert "vLLM on this CPU cannot serve W3A16" in err and "--allow-unservable" in err


def test_existing_output_folder_is_refused_without_overwrite(workspace, capsys):
    (workspace / "out").mkdir()
    (workspace / "out" / "keep.txt").write_text("mine")
    err = run_and_check_nothing_written(workspace, quantize_args(workspace, "--scheme", "W8A8"), capsys)
    assert "already exists" in err and "--overwrite" in err


def test_undecodable_image_names_the_record(workspace, capsys):
    (workspace / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    records = [{"image": "broken.png", "prompt": "What is this?", "answer": "A photo."}]
    (workspace / "data.json").write_text(json.dumps(records))
    err = run_and_check_nothing_written(
        workspace, quantize_args(workspace, "--scheme", "W8A8", "--data", str(workspace / "data.json")), capsys
    )
    assert "record 0 of" in err and "broken.png cannot be decoded" in err


def test_empty_calibration_file(workspace, capsys):
    (workspace / "data.jsonl").write_text("\n")
    err = run_and_check_nothing_written(
        workspace, quantize_args(workspace, "--scheme", "W8A8", "--data", str(workspace / "data.jsonl")), capsys
    )
    assert "holds no calibration records" in err


def test_all_padding_calibration_set(workspace, capsys):
    rows = {"input_ids": [[5, 6, 7], [8, 9]], "attention_mask": [[0, 0, 0], [0, 0]]}
    Dataset.from_dict(rows).save_to_disk(str(workspace / "padding"))
    err = run_and_check_nothing_written(
        workspace, quantize_args(workspace, "--scheme", "W8A8", "--data", str(workspace / "padding")), capsys
    )
    assert "2 of 2 rows are all padding (rows 0, 1)" in err


def test_token_mask_length_mismatch(workspace, capsys):
    rows = {"input_ids": [[5, 6, 7]], "attention_mask": [[1, 1, 1]], "loss_mask": [[1.0, 1.0]]}
    Dataset.from_dict(rows).save_to_disk(str(workspace / "mismatch"))
    err = run_and_check_nothing_written(
        workspace, quantize_args(workspace, "--scheme", "W8A8", "--data", str(workspace / "mismatch")), capsys
    )
    assert "row 0" in err and "loss_mask has 2 entries but input_ids has 3 tokens" in err


def test_explain_refuses_an_undecodable_image(workspace, capsys):
    (workspace / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    err = run_and_check_nothing_written(
        workspace,
        ["explain", str(workspace / "model"), "--image", str(workspace / "broken.jpg"), "--prompt", "Hi",
         "--output", str(workspace / "w.png")],
        capsys,
    )
    assert "--image: image" in err and "cannot be decoded" in err


def test_usage_error_exits_2(capsys):
    assert main(["quantize"]) == 2
    assert "the following arguments are required" in capsys.readouterr().err


def test_nan_activations_stop_calibration_and_write_nothing(tiny_llama_dir, tmp_path):
    model = load_tiny_llama(tiny_llama_dir)
    dataset = random_token_dataset(samples=2)
    with torch.no_grad():
        model.model.embed_tokens.weight[dataset[0]["input_ids"][0]] = float("nan")
    with pytest.raises(NonFiniteActivationError, match=r"NaN/Inf in the input of decoder layer model\.layers\.0"):
        quantize_to_checkpoint(model, tiny_tokenizer(), W8A8_RECIPE, dataset, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()], ids=["disk-full", "interrupted"]
)
def test_failed_save_leaves_no_output_folder(tiny_llama_dir, tmp_path, monkeypatch, failure):
    monkeypatch.setattr(quantize, "oneshot", lambda **_kwargs: None)  # only the save is under test
    processor = tiny_tokenizer()

    def fail(*_args, **_kwargs):
        raise failure

    monkeypatch.setattr(processor, "save_pretrained", fail)  # the weights are written, then the save fails
    with pytest.raises(type(failure)):
        quantize_to_checkpoint(load_tiny_llama(tiny_llama_dir), processor, W8A8_RECIPE, random_token_dataset(2),
                               tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
