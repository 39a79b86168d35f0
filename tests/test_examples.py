"""Every script in examples/ runs, on tiny models with 2 calibration samples (the scripts' MODEL_ID,
NUM_CALIBRATION_SAMPLES and SAVE_DIR from the environment), and writes a checkpoint vLLM-style loaders accept;
the distributed one under torchrun (2 CPU processes, gloo); the serving ones in the serve environment on the text
example's W8A8 checkpoint (skipped without that environment)."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from qig_plugin.serve_env import ServeEnvMissingError, serve_python
from tests.tiny_models import tiny_text_llm
from tests.tiny_text_folder import build_tiny_text_folder
from tests.tiny_vlm_folder import build_tiny_vlm_folder

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
SAMPLES = "2"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny model folders: an Idefics3 VLM, a Llama with a chat template, a Qwen3-MoE."""
    root = tmp_path_factory.mktemp("example_models")
    tiny_text_llm(root, "qwen3_moe")
    return {"vlm": build_tiny_vlm_folder(root), "text": build_tiny_text_folder(root), "moe": root / "tiny-qwen3_moe"}


def run_example(script: str, model: Path, save_dir: Path, monkeypatch, capsys, **env: str) -> str:
    """Run ``examples/<script>`` in this process as ``python examples/<script>`` would; its stdout."""
    for name, value in {"MODEL_ID": str(model), "NUM_CALIBRATION_SAMPLES": SAMPLES, "SAVE_DIR": str(save_dir),
                        **env}.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    return capsys.readouterr().out


def quantization(checkpoint: Path) -> dict:
    """The checkpoint's ``quantization_config``: its first config group and the ignore list."""
    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    return {**next(iter(config["config_groups"].values())), "ignore": config["ignore"], "format": config["format"]}


@pytest.fixture(scope="module")
def text_checkpoint(tiny, tmp_path_factory):
    """The text example's W8A8 checkpoint of the tiny Llama (also served by the serving examples)."""
    checkpoint = tmp_path_factory.mktemp("text_example") / "w8a8"
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, value in {"MODEL_ID": str(tiny["text"]), "NUM_CALIBRATION_SAMPLES": SAMPLES,
                            "SAVE_DIR": str(checkpoint)}.items():
            monkeypatch.setenv(name, value)
        runpy.run_path(str(EXAMPLES / "qig_gptq_text_llm_w8a8.py"), run_name="__main__")
    return checkpoint


@pytest.mark.parametrize(
    ("script", "bits", "activations"),
    [("qig_gptq_vlm_w4a16.py", 4, None), ("qig_awq_vlm_w3a16.py", 3, None),
     ("qig_smoothquant_gptq_vlm_w8a8.py", 8, 8)],
)
def test_vlm_examples(script, bits, activations, tiny, tmp_path, monkeypatch, capsys):
    out = run_example(script, tiny["vlm"], tmp_path / "out", monkeypatch, capsys)
    assert "SAMPLE GENERATION" in out and f"saved {tmp_path / 'out'}" in out
    quantized = quantization(tmp_path / "out")
    assert quantized["weights"]["num_bits"] == bits
    assert (quantized["input_activations"] or {}).get("num_bits") == activations
    assert any("vision_model" in name for name in quantized["ignore"])  # the vision tower stays full precision
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()


def test_text_llm_example(text_checkpoint):
    quantized = quantization(text_checkpoint)
    assert quantized["weights"]["num_bits"] == 8 and quantized["input_activations"]["num_bits"] == 8
    assert (text_checkpoint / "tokenizer.json").is_file()


def test_moe_example(tiny, tmp_path, monkeypatch, capsys):
    out = run_example("qig_gptq_moe_w4a16.py", tiny["moe"], tmp_path / "out", monkeypatch, capsys)
    assert "SAMPLE GENERATION" in out
    quantized = quantization(tmp_path / "out")
    assert quantized["weights"]["num_bits"] == 4 and quantized["weights"]["group_size"] == 64
    assert any(name.endswith("mlp.gate") for name in quantized["ignore"])  # routers stay full precision


def test_offloading_example(tiny, tmp_path, monkeypatch, capsys):
    offload = tmp_path / "offload"
    out = run_example("offloading_larger_than_memory.py", tiny["text"], tmp_path / "out", monkeypatch, capsys,
                      MAX_CPU_MEMORY="1KB", OFFLOAD_FOLDER=str(offload))
    assert "SAMPLE GENERATION" in out and any(offload.iterdir())  # the weights went to disk
    assert quantization(tmp_path / "out")["format"] == "pack-quantized"


def test_distributed_example_under_torchrun(tiny, text_checkpoint, tmp_path):
    """2 CPU ranks, one sample each: rank 0's checkpoint is complete, and its first layer (whose inputs are the
    embeddings on every rank) is the single-process text example's on the same 2 samples."""
    env = {**os.environ, "MODEL_ID": str(tiny["text"]), "NUM_CALIBRATION_SAMPLES": SAMPLES,
           "SAVE_DIR": str(tmp_path / "out"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(EXAMPLES / "distributed_calibration.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert completed.stdout.count("SAMPLE GENERATION") == 1  # rank 0 only
    distributed = load_file(tmp_path / "out" / "model.safetensors")
    single = load_file(text_checkpoint / "model.safetensors")
    assert distributed.keys() == single.keys()
    first_layer = [name for name in single if name.startswith("model.layers.0.") and "proj.weight" in name]
    assert len(first_layer) == 14  # 7 linears: int8 weight and scale
    for name in first_layer:  # the same Hessians up to float rounding (other thread counts): one int8 step at most
        difference = (distributed[name].float() - single[name].float()).abs().max().item()
        assert difference <= (1 if name.endswith(".weight") else 1e-6 * single[name].abs().max().item()), name


def _serve_python() -> Path:
    try:
        return serve_python()
    except ServeEnvMissingError as error:
        pytest.skip(f"no serve environment: {error}")


@pytest.mark.serve
def test_vllm_offline_example(text_checkpoint):
    python = _serve_python()
    completed = subprocess.run([str(python), str(EXAMPLES / "vllm_offline.py")], capture_output=True, text=True,
                               env={**os.environ, "CHECKPOINT": str(text_checkpoint), "MAX_TOKENS": "8",
                                    "MAX_MODEL_LEN": "512"},
                               timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "What is the capital of France? ->" in completed.stdout


@pytest.mark.serve
def test_vllm_openai_server_example(text_checkpoint):
    python = _serve_python()
    completed = subprocess.run(["bash", str(EXAMPLES / "vllm_openai_server.sh"), str(text_checkpoint)],
                               capture_output=True, text=True, timeout=600,
                               env={**os.environ, "QIG_SERVE_PYTHON": str(python), "PORT": "8199", "MAX_TOKENS": "8",
                                    "MAX_MODEL_LEN": "512"})
    assert completed.returncode == 0, completed.stderr[-4000:]
    response = json.loads(completed.stdout.strip().splitlines()[-1])
    assert response["object"] == "chat.completion" and response["choices"][0]["message"]["content"] is not None
