"""Serving compressed-tensors checkpoints with vLLM on the CPU (qig_plugin.serving, run in the serve venv).

Runs in the quantize venv: tiny Llama checkpoints are quantized here with stock llm-compressor and then served by
one subprocess in the serve venv (``scripts/setup_envs.sh`` creates it; ``$QIG_SERVE_PYTHON`` overrides its path).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest

from qig_plugin.serve_env import ServeEnvMissingError, run_in_serve_env, serve_python
from qig_plugin.serving import SCHEMES, cpu_serving_support, fastest_servable_scheme

try:
    serve_python()
except ServeEnvMissingError as missing:
    pytest.skip(f"no serve venv: {missing}", allow_module_level=True)

pytestmark = pytest.mark.serve

VOCAB_SIZE = 1024
MAX_TOKENS = 8
PROMPT = "Describe the weather in one sentence."
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A picture of a cat sitting on a red chair near the window.",
    "Quantization maps floating point weights to small integers.",
    "The weather today is sunny with a light breeze from the west.",
    "Vision language models answer questions about images.",
    "Two dogs are playing with a ball in the green park.",
    "Describe the image in one short sentence, please.",
    "Large language models generate text one token at a time.",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# The linear kernel vLLM must pick for each scheme on the CPU: proof that the quantized path really ran.
EXPECTED_KERNELS = {
    "W8A8": {"CompressedTensorsW8A8Int8": "CPUInt8ScaledMMLinearKernel"},
    "W4A8": {"CompressedTensorsW4A8Int": "Dynamic4bitLinearKernel"},
    "W4A16": {"CompressedTensorsWNA16": "CPUWNA16LinearKernel"},
}


def _cpuinfo_flags() -> set[str]:
    """CPU flags read straight from /proc/cpuinfo, independently of the code under test."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _schemes_to_serve() -> list[str]:
    """The schemes of EXPECTED_KERNELS that this CPU can serve."""
    support = cpu_serving_support()
    return [scheme for scheme in EXPECTED_KERNELS if support[scheme] is None]


def _build_tokenizer(output_dir: Path):
    """A byte-level BPE tokenizer trained on SENTENCES, padded with added tokens to exactly VOCAB_SIZE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = ["<s>", "</s>", "<pad>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(SENTENCES, trainer)
    backend.add_tokens([f"<extra_{index}>" for index in range(VOCAB_SIZE - backend.get_vocab_size())])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    assert len(tokenizer) == VOCAB_SIZE
    tokenizer.save_pretrained(output_dir)
    return tokenizer


def _build_tiny_llama(output_dir: Path) -> None:
    """Save a random 2-layer Llama (hidden 128) in bf16 with its tokenizer to ``output_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = _build_tokenizer(output_dir)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(output_dir)


def _quantize(base_dir: Path, scheme: str, output_dir: Path) -> None:
    """GPTQ-quantize the checkpoint in ``base_dir`` with a stock preset and save it compressed."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype="bfloat16")
    encoded = [tokenizer(sentence) for sentence in SENTENCES]
    calibration = Dataset.from_dict(
        {
            "input_ids": [item["input_ids"] for item in encoded],
            "attention_mask": [item["attention_mask"] for item in encoded],
        }
    )
    oneshot(
        model=model,
        dataset=calibration,
        recipe=GPTQModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]),
        num_calibration_samples=len(SENTENCES),
        max_seq_length=64,
    )
    model.save_pretrained(output_dir, save_compressed=True)
    tokenizer.save_pretrained(output_dir)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict[str, dict]:
    """Quantize the tiny Llama with each servable scheme and serve them all from one serve-venv process.

    Returns ``{scheme: result dict of qig_plugin.serving.generate}`` (or ``{"error": ...}`` for a failed load).
    """
    pytest.importorskip("llmcompressor")
    root = tmp_path_factory.mktemp("tiny_llama")
    base_dir = root / "bf16"
    _build_tiny_llama(base_dir)
    checkpoints = {}
    for scheme in _schemes_to_serve():
        checkpoints[scheme] = root / scheme
        _quantize(base_dir, scheme, checkpoints[scheme])

    results_file = root / "results.json"
    completed = run_in_serve_env(
        [
            "generate",
            *map(str, checkpoints.values()),
            "--prompt",
            PROMPT,
            "--max-tokens",
            str(MAX_TOKENS),
            "--ignore-eos",
            "--json",
            str(results_file),
        ],
        timeout=600,
    )
    if not results_file.exists():
        pytest.fail(f"serving subprocess wrote no results (rc={completed.returncode}):\n{completed.stderr[-3000:]}")
    results = {Path(result["checkpoint"]).name: result for result in json.loads(results_file.read_text())}
    return {scheme: results[scheme] for scheme in checkpoints}


def test_cpu_serving_support_agrees_with_cpuinfo():
    support = cpu_serving_support()
    assert set(support) == set(SCHEMES)
    if platform.machine() != "x86_64":
        pytest.skip("the expectations below are for x86_64 CPUs")
    has_avx512 = "avx512f" in _cpuinfo_flags()
    assert (support["W4A16"] is None) == has_avx512
    if not has_avx512:
        assert "AVX-512" in support["W4A16"]
    assert support["W8A8"] is None
    assert support["W4A8"] is None
    assert support["W3A16"] is not None
    scheme, why = fastest_servable_scheme()
    assert scheme == ("W4A16" if has_avx512 else "W8A8")
    assert why


def test_missing_serve_env_says_how_to_create_it(monkeypatch, tmp_path):
    monkeypatch.setenv("QIG_SERVE_PYTHON", str(tmp_path / "no-such-venv" / "bin" / "python"))
    with pytest.raises(ServeEnvMissingError, match="scripts/setup_envs.sh"):
        run_in_serve_env(["support"])


def test_support_command_in_serve_env():
    completed = run_in_serve_env(["support"], timeout=120, check=True)
    for scheme, reason in cpu_serving_support().items():
        expected = "servable" if reason is None else f"NOT servable: {reason}"
        assert f"{scheme:6s} {expected}" in completed.stdout


def check_served(served: dict[str, dict], scheme: str, max_tokens: int) -> None:
    """Skip a scheme this CPU cannot serve; else its generation gave ``max_tokens`` tokens of text on its kernel."""
    reason = cpu_serving_support()[scheme]
    if reason is not None:
        pytest.skip(f"{scheme} cannot be served on this CPU: {reason}")
    result = served[scheme]
    assert "error" not in result, result.get("error")
    assert result["text"] != ""
    assert len(result["token_ids"]) == max_tokens
    assert result["linear_kernels"] == EXPECTED_KERNELS[scheme]


@pytest.mark.parametrize("scheme", list(EXPECTED_KERNELS))
def test_serve_quantized_tiny_llama(served, scheme):
    check_served(served, scheme, MAX_TOKENS)
