"""Calibration cost of QIG-GPTQ and QIG-AWQ against stock GPTQ and AWQ on the default model, side by side.

    python benchmarks/speed.py [--sizes 4 8 16] [--awq-sizes 4 8] [--scheme w4a16]

Every (method, size) runs in its own process, on the same first ``size`` records of the
shipped calibration set, and reports: the whole ``oneshot`` wall time; the decoder-layer
time (from the moment text layer 1 first runs to the end, so that the unquantized vision
tower, which runs in the first subgraph with layer 0, cannot hide QIG's cost); the time
inside QIG's attribution pre-hooks; and the process's peak resident memory. Writes
``benchmarks/results/speed.json`` and ``speed.png`` and prints a table.
"""

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
# stock method -> its QIG twin (recipes/{method}_{scheme}.yaml)
TWINS = {"gptq": "qig_gptq", "awq": "qig_awq"}


def measure(method: str, size: int, scheme: str) -> dict:
    """One calibration run in this process; returns its timings and peak memory."""
    from qig_plugin.data import build_calibration_dataset, shipped_records
    from qig_plugin.models import build_default_model, load_model, load_processor
    from qig_plugin.modifiers import QIGAWQModifier, QIGGPTQModifier
    from qig_plugin.quantize import quantize_to_checkpoint

    if method == "awq" and not torch.accelerator.is_available():  # stock AWQ 0.14.0.1 pins its cache: fails on CPU
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None

    model_dir = build_default_model()
    processor = load_processor(model_dir)
    dataset = build_calibration_dataset(shipped_records("calibration")[:size], processor)
    model = load_model(model_dir)

    layer_one_start: list[float] = []
    model.model.text_model.layers[1].register_forward_pre_hook(
        lambda *_: layer_one_start.append(time.perf_counter()) if not layer_one_start else None
    )
    attribution_s = [0.0]
    # where each QIG modifier computes its token weights
    for modifier, name in ((QIGGPTQModifier, "_attribute_group"), (QIGAWQModifier, "_mapping_token_weights")):
        def timed(self, *args, attribute=getattr(modifier, name), **kwargs):
            start = time.perf_counter()
            result = attribute(self, *args, **kwargs)
            attribution_s[0] += time.perf_counter() - start
            return result

        setattr(modifier, name, timed)
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        quantize_to_checkpoint(
            model, processor, REPO_ROOT / "recipes" / f"{method}_{scheme}.yaml", dataset, Path(scratch) / "out"
        )
        end = time.perf_counter()
    return {
        "method": method,
        "samples": size,
        "tokens": sum(len(ids) for ids in dataset["input_ids"]),
        "oneshot_s": round(end - start, 1),
        "decoder_layers_s": round(end - layer_one_start[0], 1),
        "attribution_s": round(attribution_s[0], 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for method, marker in zip(sorted({r["method"] for r in rows}), "osD^"):
        points = [r for r in rows if r["method"] == method]
        axis.plot([r["tokens"] for r in points], [r["decoder_layers_s"] for r in points], marker=marker,
                  label=f"{method}: decoder layers")
        axis.plot([r["tokens"] for r in points], [r["oneshot_s"] for r in points], marker=marker, linestyle=":",
                  label=f"{method}: whole oneshot")
    axis.set(xlabel="calibration tokens", ylabel="seconds (2 CPU cores)", title="Calibration time, default model")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16], help="GPTQ calibration samples")
    parser.add_argument("--awq-sizes", type=int, nargs="*", default=[4, 8], help="AWQ calibration samples")
    parser.add_argument("--scheme", default="w4a16", help="recipe suffix: w4a16, w4a8, w8a8, w3a16")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args.one[0], int(args.one[1]), args.scheme)))
        return

    runs = [(size, method) for stock, sizes in (("gptq", args.sizes), ("awq", args.awq_sizes))
            for size in sizes for method in (stock, TWINS[stock])]
    rows = []
    for size, method in runs:
        print(f"running {method} on {size} samples ...", flush=True)
        completed = subprocess.run(
            [sys.executable, __file__, "--scheme", args.scheme, "--one", method, str(size)],
            capture_output=True, text=True, check=True,
        )
        (line,) = [l for l in completed.stdout.splitlines() if l.startswith("RESULT ")]
        rows.append(json.loads(line.removeprefix("RESULT ")))
        print(f"  {rows[-1]}", flush=True)
    ratios = []
    for size, method in runs[::2]:
        stock, qig = (next(r for r in rows if r["samples"] == size and r["method"] == m)
                      for m in (method, TWINS[method]))
        ratios.append({
            "method": TWINS[method],
            "samples": size,
            "oneshot": round(qig["oneshot_s"] / stock["oneshot_s"], 2),
            "decoder_layers": round(qig["decoder_layers_s"] / stock["decoder_layers_s"], 2),
            "peak_rss": round(qig["peak_rss_gb"] / stock["peak_rss_gb"], 2),
        })
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps({
        "model": "default (SmolLM2-135M-Instruct in SmolVLM, random 2-layer vision tower)",
        "scheme": args.scheme, "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "rows": rows, "qig_over_stock": ratios}, indent=1) + "\n")
    plot(rows, RESULTS / "speed.png")

    print("\n| samples | tokens | method | oneshot s | decoder layers s | QIG attribution s | peak RSS GB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['samples']} | {r['tokens']} | {r['method']} | {r['oneshot_s']} | {r['decoder_layers_s']} "
              f"| {r['attribution_s']} | {r['peak_rss_gb']} |")
    print("\n| QIG method | samples | QIG/stock oneshot | QIG/stock decoder layers | QIG/stock peak RSS |")
    print("|---|---|---|---|---|")
    for r in ratios:
        print(f"| {r['method']} | {r['samples']} | {r['oneshot']} | {r['decoder_layers']} | {r['peak_rss']} |")


if __name__ == "__main__":
    main()
