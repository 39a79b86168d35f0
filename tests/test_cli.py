"""``qig`` commands on a tiny Idefics3 (hidden 128, 2 layers): quantize end to end, determinism,
help texts, and the serve/generate wrappers' checks and commands."""

import json
import os
import subprocess

import pytest
from safetensors import safe_open

from qig_plugin.cli import main
from tests.tiny_vlm_folder import build_tiny_vlm_folder


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory):
    return build_tiny_vlm_folder(tmp_path_factory.mktemp("tiny_vlm"))


def quantize(model_dir, output, seed=0):
    return main(["quantize", str(model_dir), "--scheme", "W8A8", "--samples", "2", "--seed", str(seed),
                 "--output", str(output)])


@pytest.mark.parametrize("command", ["quantize", "eval", "explain", "serve", "generate"])
def test_every_command_has_help_with_examples(command, capsys):
    assert main([command, "--help"]) == 0
    assert f"qig {command}" in capsys.readouterr().out.split("examples:")[1]


def test_quantize_writes_a_servable_checkpoint_and_a_summary(tiny_vlm_dir, tmp_path, capfd):
    assert quantize(tiny_vlm_dir, tmp_path / "w8a8") == 0
    out, err = capfd.readouterr()
    assert "scheme       W8A8 (qig_gptq_w8a8.yaml)" in out and "samples      2" in out
    # a quiet console: llm-compressor's progress bars, no log lines; those are in the checkpoint's log
    assert "Calibrating: 100%" in err and "Propagating" in err
    assert not [line for line in (out + err).splitlines() if " | INFO - " in line or " | METRIC - " in line
                or " | WARNING - " in line or "Warning:" in line]
    log = (tmp_path / "w8a8" / "qig-quantize.log").read_text()
    assert "| compress_module_list | INFO - Quantizing 1 module(s)" in log and "| METRIC - error" in log
    assert f"log          {tmp_path / 'w8a8' / 'qig-quantize.log'} (" in out
    checkpoint = tmp_path / "w8a8"
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    for name in ("tokenizer.json", "preprocessor_config.json", "model.safetensors", "recipe.yaml"):
        assert (checkpoint / name).is_file(), name
    assert "QIGGPTQModifier" in (checkpoint / "recipe.yaml").read_text()
    assert [path.name for path in tmp_path.iterdir()] == ["w8a8"]  # no partial sibling left behind


def test_same_inputs_and_seed_give_a_bit_identical_checkpoint(tiny_vlm_dir, tmp_path):
    assert quantize(tiny_vlm_dir, tmp_path / "first") == 0
    assert quantize(tiny_vlm_dir, tmp_path / "second") == 0
    first = (tmp_path / "first" / "model.safetensors").read_bytes()
    assert first == (tmp_path / "second" / "model.safetensors").read_bytes()
    with safe_open(tmp_path / "first" / "model.safetensors", "pt") as tensors:
        assert any(name.endswith("weight_scale") for name in tensors.keys())  # it is really quantized


def test_overwrite_replaces_an_existing_checkpoint(tiny_vlm_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    assert main(["quantize", str(tiny_vlm_dir), "--scheme", "W8A8", "--samples", "1", "--overwrite",
                 "--output", str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out" / "stale.txt").exists() and (tmp_path / "out" / "model.safetensors").is_file()


def test_quantize_verbose_prints_the_log_lines(tiny_vlm_dir, tmp_path, capfd):
    assert main(["quantize", str(tiny_vlm_dir), "--scheme", "W8A8", "--samples", "1", "--verbose",
                 "--output", str(tmp_path / "out")]) == 0
    out = capfd.readouterr().out
    assert "| compress_module_list | INFO - Quantizing 1 module(s)" in out and "| METRIC - error" in out
    assert "| METRIC - error" in (tmp_path / "out" / "qig-quantize.log").read_text()


def test_a_failed_quantize_keeps_its_log_outside_the_output(tiny_vlm_dir, tmp_path, capsys, monkeypatch):
    import qig_plugin.quantize

    def fail(*args, **kwargs):
        from loguru import logger

        logger.info("calibration starts")
        raise RuntimeError("calibration broke")

    monkeypatch.setattr(qig_plugin.quantize, "calibrate", fail)
    assert quantize(tiny_vlm_dir, tmp_path / "out") == 1
    err = capsys.readouterr().err
    log = err.split("[qig] the run's log: ")[1].split()[0]
    assert "calibration starts" in open(log).read() and not (tmp_path / "out").exists()
    os.unlink(log)


def test_serve_starts_vllm_on_loopback(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda command, env: calls.append((command, env)) or 0)
    monkeypatch.setenv("QIG_SERVE_PYTHON", str(tmp_path / "config.json"))  # any existing file
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert main(["serve", str(tmp_path), "--port", "9000", "--", "--max-model-len", "2048"]) == 0
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "5")
    assert main(["serve", str(tmp_path)]) == 0
    (command, env), (_, env_set) = calls
    assert command[1:] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path),
                           "--host", "127.0.0.1", "--port", "9000", "--max-model-len", "2048"]
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["QIG_SERVE_PYTHON"] == str(tmp_path / "config.json")
    assert env_set["VLLM_CPU_KVCACHE_SPACE"] == "5"  # the environment's own setting wins


def test_serve_and_generate_refuse_a_folder_that_is_no_checkpoint(tmp_path, capsys):
    assert main(["serve", str(tmp_path)]) == 2
    assert main(["generate", str(tmp_path), "--prompt", "Hi"]) == 2
    assert capsys.readouterr().err.count("is not a checkpoint folder (no config.json)") == 2
