"""Calibration wall time of QIG-GPTQ against stock GPTQ on the default model, same data, one run.

    python benchmarks/calibration_time.py [--samples 16] [--scheme w4a16]

Writes ``benchmarks/results/calibration_time.json`` and prints a table. The attribution
time (QIG's own forward/backward passes) is measured by timing the modifier's pre-hook.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from qig_plugin.data import build_calibration_dataset, shipped_records
from qig_plugin.models import build_default_model, load_model, load_processor
from qig_plugin.modifiers import QIGGPTQModifier
from qig_plugin.quantize import quantize_to_checkpoint
from qig_plugin.serve_env import REPO_ROOT

RESULTS = REPO_ROOT / "benchmarks" / "results" / "calibration_time.json"


def timed_attribution() -> list[float]:
    """Wrap QIGGPTQModifier's pre-hook so every call adds its duration to the returned list."""
    durations: list[float] = []
    attribute = QIGGPTQModifier._attribute_group

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        attribute(self, *args, **kwargs)
        durations.append(time.perf_counter() - start)

    QIGGPTQModifier._attribute_group = timed
    return durations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--scheme", default="w4a16", help="recipe suffix: w4a16, w4a8, w8a8, w3a16")
    args = parser.parse_args()

    model_dir = build_default_model()
    processor = load_processor(model_dir)
    dataset = build_calibration_dataset(shipped_records("calibration")[: args.samples], processor)
    tokens = sum(len(ids) for ids in dataset["input_ids"])
    attribution_durations = timed_attribution()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for method in ("gptq", "qig_gptq"):
            recipe = REPO_ROOT / "recipes" / f"{method}_{args.scheme}.yaml"
            report = quantize_to_checkpoint(
                load_model(model_dir), processor, recipe, dataset, Path(scratch) / method
            )
            rows.append({"method": method, "recipe": recipe.name, "oneshot_s": round(report.calibration_s, 1),
                         "attribution_s": round(sum(attribution_durations), 1)})
    stock, qig = rows
    result = {
        "model": "default (SmolLM2-135M-Instruct in SmolVLM, random vision tower)",
        "samples": args.samples,
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "rows": rows,
        "qig_over_stock": round(qig["oneshot_s"] / stock["oneshot_s"], 2),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.samples} samples, {tokens} tokens, {result['threads']} threads")
    print(f"| method | recipe | oneshot s | of which QIG attribution s |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['recipe']} | {row['oneshot_s']} | {row['attribution_s']} |")
    print(f"QIG-GPTQ / GPTQ wall time: {result['qig_over_stock']}x  ->  {RESULTS.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
