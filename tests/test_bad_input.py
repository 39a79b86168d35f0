"""Bad input: each case exits 2 (or raises, through the Python API) with a one-line message naming the
problem and the fix, and writes nothing: no output folder, no parent folder, no partial sibling, no probe
file, the inputs unchanged.

Checks that come before the model is loaded run against a folder that only has the right file names (and a
safetensors header); loading the model, or even its processor, is replaced by a function that fails the
test, which proves the check ran before any model work. Checks that need the model (a hub model's checkpoint
size, in ``quantize_to_checkpoint``) are shown to run before calibration starts: ``oneshot`` fails the test.
(A recipe naming a QIG modifier without ``import qig_plugin`` is covered by
``tests/modifiers/test_qig_gptq.py::test_recipe_without_plugin_import_says_import_qig_plugin``.)
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from safetensors.numpy import save_file

from qig_plugin import cli, quantize
from qig_plugin.cli import main
from qig_plugin.data import load_photo
from qig_plugin.quantize import quantize_to_checkpoint
from qig_plugin.recipes import shipped_recipe
from qig_plugin.validation import InputError, NonFiniteActivationError
from tests.modifiers.tiny_llama import load_tiny_llama, random_token_dataset, tiny_tokenizer
from tests.tiny_vlm_folder import build_tiny_vlm_folder

W8A8_RECIPE = shipped_recipe("gptq_w8a8")
REPO_ROOT = Path(__file__).resolve().parent.parent


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file under ``root`` with its content, and every folder (as None)."""
    return {
        str(path.relative_to(root)): path.read_bytes() if path.is_file() else None for path in sorted(root.rglob("*"))
    }


def must_not_run(what: str):
    def fail(*_args, **_kwargs):
        raise AssertionError(f"{what} before the bad input was found")

    return fail


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a model or a processor fails the test."""
    monkeypatch.setattr(cli, "_load_model_and_processor", must_not_run("the model was loaded"))
    monkeypatch.setattr(cli, "_load_model", must_not_run("the model was loaded"))
    monkeypatch.setattr(cli, "_load_processor", must_not_run("the processor was loaded"))


def write_weights_header(model_dir: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A ``model.safetensors`` with zero tensors of ``shapes`` (float32): a real header for the size estimate."""
    tensors = {name: np.zeros(shape, dtype=np.float32) for name, shape in shapes.items()}
    save_file(tensors, model_dir / "model.safetensors")


def disk_with_free_bytes(free: int):
    """A stand-in for ``shutil.disk_usage`` on a disk with ``free`` bytes left."""
    return lambda path: SimpleNamespace(total=10**12, used=10**12 - free, free=free)


TINY_WEIGHTS = {"model.embed_tokens.weight": (64, 128), "model.layers.0.mlp.down_proj.weight": (128, 256)}


@pytest.fixture
def workspace(tmp_path, no_model_loading):
    """A folder with a VLM folder of the right file names (``model``); model loading fails the test."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    config = {"model_type": "idefics3", "text_config": {"hidden_size": 576}, "vision_config": {}}
    (model_dir / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "preprocessor_config.json"):
        (model_dir / name).write_text("")
    write_weights_header(model_dir, TINY_WEIGHTS)
    return tmp_path


@pytest.fixture
def text_workspace(workspace):
    """``workspace`` whose model is a text-only Llama (no vision_config, no image processor)."""
    model_dir = workspace / "model"
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 128}))
    (model_dir / "preprocessor_config.json").unlink()
    return workspace


def run_and_check_nothing_written(root: Path, argv: list[str], capsys) -> str:
    """Run ``qig argv``; assert exit 2, no new or changed file or folder under ``root``, and a one-line error
    without a traceback; return stderr."""
    before = snapshot(root)
    capsys.readouterr()  # drop what the test's own setup printed
    assert main(argv) == 2
    assert snapshot(root) == before
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def quantize_args(root: Path, *extra: str) -> list[str]:
    return ["quantize", str(root / "model"), "--output", str(root / "out"), *extra]


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path


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


def test_explain_refuses_a_text_only_model(text_workspace, capsys):
    load_photo("astronaut").save(text_workspace / "photo.png")
    err = run_and_check_nothing_written(
        text_workspace,
        ["explain", str(text_workspace / "model"), "--image", str(text_workspace / "photo.png"), "--prompt", "Hi",
         "--output", str(text_workspace / "w.png")],
        capsys,
    )
    assert "text-only model" in err and "vision-language model" in err


def test_usage_error_exits_2(capsys):
    assert main(["quantize"]) == 2
    assert "the following arguments are required" in capsys.readouterr().err


# -- the output location: writable, with room, before the model is loaded -------------------------------------------


def test_output_location_that_cannot_be_created(workspace, capsys):
    argv = ["quantize", str(workspace / "model"), "--scheme", "W8A8", "--output", "/proc/forbidden/out"]
    err = run_and_check_nothing_written(workspace, argv, capsys)
    assert "--output /proc/forbidden/out cannot be written: creating the folder /proc/forbidden failed" in err
    assert "choose an --output in a folder you can write to" in err
    assert not Path("/proc/forbidden").exists()


def test_unwritable_output_folder_leaves_no_created_parent(workspace, capsys, monkeypatch):
    def disk_refuses(*_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", disk_refuses)
    argv = quantize_args(workspace, "--scheme", "W8A8")
    argv[argv.index("--output") + 1] = str(workspace / "new" / "deeper" / "out")
    err = run_and_check_nothing_written(workspace, argv, capsys)
    assert f"writing a file in {workspace / 'new' / 'deeper'} failed (Read-only file system)" in err
    assert not (workspace / "new").exists()


def test_output_parents_made_by_the_probe_are_gone_when_a_later_check_fails(workspace, capsys):
    (workspace / "data.jsonl").write_text("\n")  # found after the output location was probed
    argv = quantize_args(workspace, "--scheme", "W8A8", "--data", str(workspace / "data.jsonl"))
    argv[argv.index("--output") + 1] = str(workspace / "new" / "deeper" / "out")
    err = run_and_check_nothing_written(workspace, argv, capsys)
    assert "holds no calibration records" in err and not (workspace / "new").exists()


def test_output_without_room_for_the_checkpoint_names_both_sizes(workspace, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", disk_with_free_bytes(1000))
    err = run_and_check_nothing_written(workspace, quantize_args(workspace, "--scheme", "W8A8"), capsys)
    # 40960 parameters: the embedding at float32 and the 8-bit down_proj with a scale per row, plus 64 MiB of files
    assert "the checkpoint needs up to 67.2 MB (40,960 parameters at W8A8)" in err
    assert f"but {workspace} has only 1 KB free; free some space there or choose an --output on a disk" in err


def test_output_that_is_a_file(workspace, capsys):
    (workspace / "out").write_text("mine")
    err = run_and_check_nothing_written(workspace, quantize_args(workspace, "--scheme", "W8A8", "--overwrite"), capsys)
    assert "is a file; a checkpoint is a folder" in err


def test_output_that_is_the_model_folder(workspace, capsys):
    argv = quantize_args(workspace, "--scheme", "W8A8", "--overwrite")
    argv[argv.index("--output") + 1] = str(workspace / "model")
    err = run_and_check_nothing_written(workspace, argv, capsys)
    assert "is the model folder; choose another folder for the checkpoint" in err


def test_library_checks_the_output_location_before_calibrating(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize, "oneshot", must_not_run("calibration started"))
    model = load_tiny_llama(tiny_llama_dir)
    with pytest.raises(InputError, match=r"output_dir /proc/forbidden/out cannot be written"):
        quantize_to_checkpoint(model, tiny_tokenizer(), W8A8_RECIPE, random_token_dataset(2), "/proc/forbidden/out")
    monkeypatch.setattr(shutil, "disk_usage", disk_with_free_bytes(1000))
    with pytest.raises(InputError, match=r"the checkpoint needs up to .* \(\d[\d,]* parameters at 8-bit weights\)"):
        quantize_to_checkpoint(model, tiny_tokenizer(), W8A8_RECIPE, random_token_dataset(2), tmp_path / "a" / "out")
    assert list(tmp_path.iterdir()) == []


# -- counts and other arguments: bad usage, one line, before anything is imported or loaded ------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["quantize", "M", "--scheme", "W8A8", "--samples", "0", "--output", "o"],
         "--samples 0 is out of range: pass --samples with a value of at least 1"),
        (["quantize", "M", "--scheme", "W8A8", "--max-length", "4", "--output", "o"],
         "--max-length 4 is out of range: pass --max-length with a value of at least 16"),
        (["quantize", "M", "--scheme", "W8A8", "--seed", "-1", "--output", "o"],
         "--seed -1 is out of range: pass --seed with a value from 0 to 4294967295"),
        (["serve", "ckpt", "--port", "70000"],
         "--port 70000 is out of range: pass --port with a value from 1 to 65535"),
        (["generate", "ckpt", "--prompt", "Hi", "--max-tokens", "0"],
         "--max-tokens 0 is out of range: pass --max-tokens with a value of at least 1"),
        (["generate", "ckpt", "--prompt", " "], "--prompt is empty: pass the text of the user's turn"),
        (["explain", "M", "--image", "x.png", "--prompt", "Hi", "--layers", "0", "-2"],
         "--layers -2: pass decoder layer indices from 0 up"),
    ],
    ids=["samples", "max-length", "seed", "port", "max-tokens", "prompt", "layers"],
)
def test_out_of_range_arguments_are_bad_usage(workspace, argv, message, capsys):
    err = run_and_check_nothing_written(workspace, argv, capsys)
    assert err.startswith(f"qig {argv[0]}: error: {message}")


def test_bad_usage_imports_neither_torch_nor_llmcompressor(tmp_path):
    script = (
        "import sys\n"
        "from qig_plugin.cli import main\n"
        "code = main(['quantize', 'M', '--scheme', 'W8A8', '--samples', '0', '--output', 'out'])\n"
        "heavy = [name for name in ('torch', 'llmcompressor', 'transformers') if name in sys.modules]\n"
        "assert not heavy, heavy\n"
        "sys.exit(code)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr == (
        "qig quantize: error: --samples 0 is out of range: pass --samples with a value of at least 1 "
        "(the number of calibration samples)\n"
    )
    assert list(tmp_path.iterdir()) == []


# -- recipes -------------------------------------------------------------------------------------------------------


def test_misspelt_modifier_name_suggests_the_close_name(workspace, capsys):
    recipe = workspace / "typo.yaml"
    recipe.write_text("q_stage:\n  q_modifiers:\n    QIGGPTQModifer:\n      scheme: W8A8\n")
    err = run_and_check_nothing_written(workspace, quantize_args(workspace, "--recipe", str(recipe)), capsys)
    assert "no modifier is named 'QIGGPTQModifer'; did you mean 'QIGGPTQModifier'?" in err


def test_misspelt_shipped_recipe_name_suggests_the_shipped_recipe(workspace, capsys):
    err = run_and_check_nothing_written(workspace, quantize_args(workspace, "--recipe", "qig_gptq_w8a"), capsys)
    assert "recipe qig_gptq_w8a does not exist; did you mean the shipped recipe 'qig_gptq_w8a8'?" in err


def test_group_size_that_does_not_divide_the_model_width(workspace, capsys):
    write_weights_header(workspace / "model", {**TINY_WEIGHTS, "model.layers.0.mlp.gate_proj.weight": (8, 576)})
    argv = quantize_args(workspace, "--recipe", "gptq_w4a16_g128", "--allow-unservable")
    err = run_and_check_nothing_written(workspace, argv, capsys)
    assert ("recipe gptq_w4a16_g128.yaml: group_size 128 does not divide the input width of 1 quantized linears "
            "(e.g. model.layers.0.mlp.gate_proj: 576 columns); use group_size 64") in err


def test_library_checks_the_group_size_on_the_loaded_model_before_calibrating(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize, "oneshot", must_not_run("calibration started"))
    recipe = W8A8_RECIPE.read_text().replace("strategy: channel", "strategy: group, group_size: 96")
    with pytest.raises(InputError, match=r"the recipe: group_size 96 does not divide .* use group_size 128"):
        quantize_to_checkpoint(load_tiny_llama(tiny_llama_dir), tiny_tokenizer(), recipe, random_token_dataset(2),
                               tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# -- calibration data ----------------------------------------------------------------------------------------------


def test_missing_calibration_file(workspace, capsys):
    err = run_and_check_nothing_written(
        workspace, quantize_args(workspace, "--scheme", "W8A8", "--data", str(workspace / "nope.jsonl")), capsys
    )
    assert "calibration data" in err and "nope.jsonl does not exist" in err


def test_records_with_and_without_images(workspace, capsys):
    Image.new("RGB", (8, 8)).save(workspace / "photo.png")
    records = [{"image": "photo.png", "prompt": "What is it?", "answer": "Black."}, {"image": None, "prompt": "Hi"}]
    data = write_records(workspace / "data.json", records)
    err = run_and_check_nothing_written(workspace, quantize_args(workspace, "--scheme", "W8A8", "--data", str(data)),
                                        capsys)
    assert "has no image but record 0 has one; give every record an image, or none" in err


def test_text_only_model_refuses_records_with_images(text_workspace, capsys):
    Image.new("RGB", (8, 8)).save(text_workspace / "photo.png")
    data = write_records(text_workspace / "data.json", [{"image": "photo.png", "prompt": "What is it?"}])
    err = run_and_check_nothing_written(
        text_workspace, quantize_args(text_workspace, "--scheme", "W8A8", "--data", str(data)), capsys
    )
    assert "record 0 of" in err and "has an image, but the model is a text-only LLM" in err
    assert '"image": null' in err


def test_text_only_model_refuses_a_tokenized_set_with_images(text_workspace, capsys):
    rows = {"input_ids": [[5, 6]], "attention_mask": [[1, 1]], "pixel_values": [[[0.0]]]}
    Dataset.from_dict(rows).save_to_disk(str(text_workspace / "tokenized"))
    err = run_and_check_nothing_written(
        text_workspace, quantize_args(text_workspace, "--scheme", "W8A8", "--data", str(text_workspace / "tokenized")),
        capsys,
    )
    assert "has image columns (pixel_values), but the model is a text-only LLM" in err


def test_max_length_that_cuts_image_tokens_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    model_dir = build_tiny_vlm_folder(tmp_path / "model")
    monkeypatch.setattr(cli, "_load_model", must_not_run("the model was loaded"))
    Image.new("RGB", (32, 32)).save(tmp_path / "photo.png")
    data = write_records(tmp_path / "data.json", [{"image": "photo.png", "prompt": "Describe it.", "answer": "Dark."}])
    argv = ["quantize", str(model_dir), "--scheme", "W8A8", "--data", str(data), "--max-length", "16",
            "--output", str(tmp_path / "out")]
    err = run_and_check_nothing_written(tmp_path, argv, capsys)
    assert "calibration set" in err and "max_length=16 would cut its image tokens" in err


# -- serve and generate --------------------------------------------------------------------------------------------


def test_generate_refuses_an_image_for_a_text_only_checkpoint(text_workspace, capsys):
    Image.new("RGB", (8, 8)).save(text_workspace / "photo.png")
    argv = ["generate", str(text_workspace / "model"), "--prompt", "Hi", "--image", str(text_workspace / "photo.png")]
    err = run_and_check_nothing_written(text_workspace, argv, capsys)
    assert "is a text-only model, which takes no image; leave out --image" in err


def test_generate_refuses_an_undecodable_image(workspace, capsys):
    (workspace / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    argv = ["generate", str(workspace / "model"), "--prompt", "Hi", "--image", str(workspace / "broken.png")]
    err = run_and_check_nothing_written(workspace, argv, capsys)
    assert "--image: image" in err and "cannot be decoded" in err


def test_serve_refuses_a_checkpoint_without_weights(workspace, capsys):
    (workspace / "model" / "model.safetensors").unlink()
    err = run_and_check_nothing_written(workspace, ["serve", str(workspace / "model")], capsys)
    assert "has no safetensors weights; pass the --output of a finished `qig quantize`" in err


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
