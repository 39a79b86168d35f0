"""Calibration cost of QIG-GPTQ and QIG-AWQ against stock GPTQ and AWQ on the default model, side by side.

    python benchmarks/speed.py [--sizes 16 64 256] [--exact-sizes 16 64] [--awq-sizes 16 64 256] [--awq-layers N]
                               [--repeats 1] [--flop-sizes 2 4] [--scheme w4a16] [--add]

Every (method, size) runs in its own process on the first ``size`` records of the user-scale calibration set
(``qig_plugin.data.user_scale.vlm_records("calibration")``, about 256 tokens each: 256 records are 64k+ tokens),
``--repeats`` times in interleaved order (stock, QIG, stock, QIG, ...), and reports the median and range of: the
whole ``oneshot`` wall time; the decoder-layer time (from the moment text layer 1 first runs to the end, so that
the unquantized vision tower, which runs in the first subgraph with layer 0, cannot hide QIG's cost); the time
inside QIG's attribution; and the process's peak resident memory. ``--awq-layers N`` runs AWQ's and QIG-AWQ's
scale search on text layers 1..N only (both twins on the same mappings; every layer is still quantized) and times
those layers (from layer 1's first call to layer N+1's): all text layers share one shape, so the QIG/stock ratio
is the whole model's, at a fraction of the time. QIG runs with the recipes' default attribution
(``qig_attribution: fast``); ``--exact-sizes`` adds ``qig_attribution: exact`` (the paper's integrated gradients
on every block). Seconds
per extra calibration token come from the slope between the smallest and largest size. ``--flop-sizes`` counts, in
separate untimed runs, the FLOPs of stock GPTQ's whole ``oneshot`` and of QIG-GPTQ's attribution (PyTorch's
FlopCounterMode: matmuls and attention) and from two sizes their cost per extra calibration token.
Writes ``benchmarks/results/speed.json`` and ``speed.png`` and prints tables; with ``--add`` the runs already in
``speed.json`` stay, except those of the (method, size) pairs this run measures again (the FLOP counts likewise).
"""

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from qig_plugin.recipes import shipped_recipe

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
# stock method -> its QIG twin (qig_plugin/recipes/{method}_{scheme}.yaml)
TWINS = {"gptq": "qig_gptq", "awq": "qig_awq"}
EXACT = {qig: f"{qig}@qig_attribution=exact" for qig in TWINS.values()}
AWQ_METHODS = ("awq", TWINS["awq"])  # what --awq-layers scopes
MEASURES = ("oneshot_s", "decoder_layers_s", "attribution_s", "peak_rss_gb")


def recipe_path(method: str, scheme: str, scratch: Path, awq_layers: int | None = None) -> Path:
    """``qig_plugin/recipes/{method}_{scheme}.yaml``; ``qig_gptq@field=value,...`` is that recipe with its QIG
    modifier's fields changed (e.g. ``qig_gptq@qig_attribution=exact``). With ``awq_layers`` (AWQ methods only), the
    recipe searches scales on text layers 1..``awq_layers`` only (both twins get the stock recipe's mappings,
    scoped to those layers); every layer is still quantized."""
    base, _, overrides = method.partition("@")
    path = shipped_recipe(f"{base}_{scheme}")
    if not overrides and not awq_layers:
        return path
    recipe = yaml.safe_load(path.read_text())
    modifiers = recipe["quant_stage"]["quant_modifiers"]
    if overrides:
        (qig_modifier,) = [name for name in modifiers if name.startswith("QIG")]
        for assignment in overrides.split(","):
            field, _, value = assignment.partition("=")
            modifiers[qig_modifier][field] = yaml.safe_load(value)
    if awq_layers:
        stock = yaml.safe_load(shipped_recipe(f"awq_{scheme}").read_text())["quant_stage"]["quant_modifiers"]
        layers = "(?:" + "|".join(str(i) for i in range(1, awq_layers + 1)) + ")"
        (awq_modifier,) = [name for name in modifiers if "AWQModifier" in name]
        modifiers[awq_modifier]["mappings"] = [
            {"smooth_layer": m["smooth_layer"].replace(r"\d+", layers),
             "balance_layers": [b.replace(r"\d+", layers) for b in m["balance_layers"]]}
            for m in stock["AWQModifier"]["mappings"]]
    patched = scratch / f"{base}_{abs(hash((overrides, awq_layers)))}.yaml"
    patched.write_text(yaml.safe_dump(recipe))
    return patched


def measure(method: str, size: int, scheme: str, count_flops: bool = False, awq_layers: int | None = None) -> dict:
    """One calibration run in this process; returns its timings and peak memory, or with
    ``count_flops`` its FLOPs (whole ``oneshot`` and inside QIG's attribution, in GFLOP). With ``awq_layers`` (AWQ
    methods only), the run searches scales on text layers 1..``awq_layers`` (:func:`recipe_path`) and its decoder-layer
    time ends where text layer ``awq_layers + 1`` first runs."""
    from torch.utils.flop_counter import FlopCounterMode

    from qig_plugin.data import build_calibration_dataset
    from qig_plugin.data.user_scale import vlm_records
    from qig_plugin.models import build_default_model, load_model, load_processor
    from qig_plugin.modifiers import QIGAWQModifier, QIGGPTQModifier
    from qig_plugin.quantize import quantize_to_checkpoint


    model_dir = build_default_model()
    processor = load_processor(model_dir)
    dataset = build_calibration_dataset(vlm_records("calibration", size, processor=processor), processor)
    model = load_model(model_dir)

    text_layers = model.model.text_model.layers
    last_timed = awq_layers or len(text_layers) - 1
    first_calls: dict[int, float] = {}  # text layer -> when it first ran

    def note_first_call(index: int) -> None:  # a pre-hook that returns None leaves the layer's arguments alone
        first_calls.setdefault(index, time.perf_counter())

    for index in {1, last_timed + 1} & set(range(len(text_layers))):
        text_layers[index].register_forward_pre_hook(lambda *_, index=index: note_first_call(index))
    attribution_s, attribution_flops = [0.0], [0]
    # where each QIG modifier computes its token weights
    for modifier, name in ((QIGGPTQModifier, "group_weights"), (QIGAWQModifier, "mapping_token_weights")):
        def timed(self, *args, attribute=getattr(modifier, name), **kwargs):
            start = time.perf_counter()
            with FlopCounterMode(display=False) if count_flops else nullcontext() as counter:
                result = attribute(self, *args, **kwargs)
            attribution_s[0] += time.perf_counter() - start
            attribution_flops[0] += counter.get_total_flops() if count_flops else 0
            return result

        setattr(modifier, name, timed)
    with tempfile.TemporaryDirectory() as scratch:
        recipe = recipe_path(method, scheme, Path(scratch), awq_layers)
        with FlopCounterMode(display=False) if count_flops else nullcontext() as counter:
            start = time.perf_counter()
            quantize_to_checkpoint(model, processor, recipe, dataset, Path(scratch) / "out")
            end = time.perf_counter()
    tokens = sum(len(ids) for ids in dataset["input_ids"])
    if count_flops:
        return {"method": method, "samples": size, "tokens": tokens,
                "oneshot_gflop": round(counter.get_total_flops() / 1e9, 1),
                "attribution_gflop": round(attribution_flops[0] / 1e9, 1)}
    return {
        "method": method,
        "samples": size,
        "tokens": tokens,
        "oneshot_s": round(end - start, 1),
        "decoder_layers_s": round(first_calls.get(last_timed + 1, end) - first_calls[1], 1),
        "timed_layers": f"1-{last_timed}",
        "attribution_s": round(attribution_s[0], 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def run_one(method: str, size: int, scheme: str, count_flops: bool = False, awq_layers: int | None = None) -> dict:
    """``measure`` in a fresh process (nothing cached from an earlier run)."""
    print(f"running {method} on {size} samples{' (counting FLOPs)' if count_flops else ''} ...", flush=True)
    completed = subprocess.run(
        [sys.executable, __file__, "--scheme", scheme, "--one", method, str(size), *(["--count-flops"] * count_flops),
         *(["--awq-layers", str(awq_layers)] if awq_layers else [])],
        capture_output=True, text=True,
    )
    if completed.returncode:
        raise RuntimeError(f"{method} on {size} samples failed:\n{completed.stderr[-3000:]}")
    (line,) = [l for l in completed.stdout.splitlines() if l.startswith("RESULT ")]
    row = json.loads(line.removeprefix("RESULT "))
    print(f"  {row}", flush=True)
    return row


def medians(runs: list[dict]) -> list[dict]:
    """One row per (method, samples): the median of each measure over the repeats, and the decoder-layer range."""
    keys = list(dict.fromkeys((r["method"], r["samples"]) for r in runs))
    rows = []
    for method, samples in keys:
        repeats = [r for r in runs if r["method"] == method and r["samples"] == samples]
        decoder = [r["decoder_layers_s"] for r in repeats]
        rows.append({"method": method, "samples": samples, "tokens": repeats[0]["tokens"], "repeats": len(repeats),
                     "timed_layers": repeats[0]["timed_layers"],
                     **{k: round(statistics.median(r[k] for r in repeats), 2) for k in MEASURES},
                     "decoder_layers_s_range": [min(decoder), max(decoder)]})
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Each QIG row against the stock row of its method and size (medians)."""
    stock_of = {qig: stock for stock, qig in TWINS.items()}
    out = []
    for qig in rows:
        stock_method = stock_of.get(qig["method"].partition("@")[0])
        stock = next((r for r in rows if r["method"] == stock_method and r["samples"] == qig["samples"]), None)
        if stock is None:
            continue
        out.append({"method": qig["method"], "samples": qig["samples"],
                    **{key: round(qig[f"{key}_s"] / stock[f"{key}_s"], 2) for key in ("oneshot", "decoder_layers")},
                    "peak_rss": round(qig["peak_rss_gb"] / stock["peak_rss_gb"], 2)})
    return out


def time_slopes(rows: list[dict]) -> list[dict]:
    """Decoder-layer seconds per extra calibration token of each method (smallest to largest size it ran at),
    and each QIG method's slope over its stock twin's: the ratio a large model on a fast device tends to."""
    slopes = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["tokens"])
        if len(points) > 1:
            first, last = points[0], points[-1]
            slopes[method] = {"method": method, "tokens": [first["tokens"], last["tokens"]],
                              "ms_per_token": round(1000 * (last["decoder_layers_s"] - first["decoder_layers_s"])
                                                    / (last["tokens"] - first["tokens"]), 3)}
    stock_of = {qig: stock for stock, qig in TWINS.items()}
    for method, slope in slopes.items():
        stock = slopes.get(stock_of.get(method.partition("@")[0]))
        if stock is not None:
            slope["over_stock"] = round(slope["ms_per_token"] / stock["ms_per_token"], 2)
    return list(slopes.values())


def flop_slopes(counts: list[dict]) -> dict:
    """FLOPs per extra calibration token between the smallest and largest counted size: stock GPTQ's whole
    ``oneshot`` and QIG-GPTQ's attribution, and the QIG/stock ratio they bound from below as tokens grow."""
    def slope(method, key):
        rows = sorted((r for r in counts if r["method"] == method), key=lambda r: r["tokens"])
        return (rows[-1][key] - rows[0][key]) / (rows[-1]["tokens"] - rows[0]["tokens"])

    stock, attribution = slope("gptq", "oneshot_gflop"), slope("qig_gptq", "attribution_gflop")
    return {"stock_gptq_gflop_per_token": round(stock, 3), "qig_attribution_gflop_per_token": round(attribution, 3),
            "qig_over_stock_per_token": round(1 + attribution / stock, 2)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method, marker in zip(dict.fromkeys(r["method"] for r in rows), "osD^v<>"):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["tokens"])
        tokens = [r["tokens"] for r in points]
        decoder = [r["decoder_layers_s"] for r in points]
        spread = [[d - r["decoder_layers_s_range"][0] for d, r in zip(decoder, points)],
                  [r["decoder_layers_s_range"][1] - d for d, r in zip(decoder, points)]]
        axis.errorbar(tokens, decoder, yerr=spread, marker=marker, capsize=3,
                      label=f"{method}: text layers {points[0]['timed_layers']}")
    axis.set(xlabel="calibration tokens", ylabel="seconds (2 CPU cores), median and range",
             title="Calibration time of the timed text layers, default model")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[16, 64, 256],
                        help="calibration samples (about 256 tokens each) of GPTQ and QIG-GPTQ")
    parser.add_argument("--exact-sizes", type=int, nargs="*", default=[16, 64],
                        help="sizes at which QIG-GPTQ also runs with qig_attribution: exact")
    parser.add_argument("--awq-sizes", type=int, nargs="*", default=[16, 64, 256], help="AWQ calibration samples")
    parser.add_argument("--awq-layers", type=int, default=None,
                        help="AWQ and QIG-AWQ search scales on text layers 1..N only, and are timed there (AWQ's "
                             "search on all 29 layers takes about 40 minutes per run at 256 samples on 2 cores)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each (method, size), interleaved")
    parser.add_argument("--flop-sizes", type=int, nargs="*", default=[2, 4],
                        help="count GPTQ and QIG-GPTQ FLOPs at these sizes (untimed runs, about 6x slower)")
    parser.add_argument("--scheme", default="w4a16", help="recipe suffix: w4a16, w4a8, w8a8, w3a16")
    parser.add_argument("--add", action="store_true",
                        help="keep the runs already in speed.json that this run does not measure again")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args.one[0], int(args.one[1]), args.scheme, args.count_flops,
                                             args.awq_layers)))
        return
    if len(args.flop_sizes) == 1:
        parser.error("--flop-sizes needs two sizes or more (the cost per token is a slope), or none")

    plan = [(size, method) for size in args.sizes for method in ("gptq", "qig_gptq")]
    plan += [(size, EXACT["qig_gptq"]) for size in args.exact_sizes]
    plan += [(size, method) for size in args.awq_sizes for method in AWQ_METHODS]
    counts = [run_one(method, size, args.scheme, count_flops=True)
              for size in args.flop_sizes for method in ("gptq", "qig_gptq")]
    runs = [{**run_one(method, size, args.scheme, awq_layers=args.awq_layers if method in AWQ_METHODS else None),
             "repeat": repeat}
            for repeat in range(args.repeats) for size, method in plan]
    if args.add:
        earlier = json.loads((RESULTS / "speed.json").read_text())
        if earlier["scheme"] != args.scheme:
            parser.error(f"--add: speed.json holds scheme {earlier['scheme']}, not {args.scheme}; run without --add")
        measured = {(method, size) for size, method in plan}
        runs = [r for r in earlier["runs"] if (r["method"], r["samples"]) not in measured] + runs
        counts = counts or earlier["flop_counts"] or []
    rows = medians(runs)
    qig_over_stock = ratios(rows)
    slopes = time_slopes(rows)
    flops = flop_slopes(counts) if counts else None
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps({
        "model": "default (SmolLM2-135M-Instruct in SmolVLM, easy-VQA vision tower)", "data": "vlm_records(\"calibration\")",
        "scheme": args.scheme, "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows, "qig_over_stock": qig_over_stock,
        "seconds_per_token": slopes,
        "flop_counts": counts, "flops_per_token": flops, "runs": runs}, indent=1) + "\n")
    plot(rows, RESULTS / "speed.png")

    print(f"\nmedians of {args.repeats} runs")
    print("| samples | tokens | method | oneshot s | timed text layers | their s (range) | QIG attribution s "
          "| peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        low, high = r["decoder_layers_s_range"]
        print(f"| {r['samples']} | {r['tokens']} | {r['method']} | {r['oneshot_s']} | {r['timed_layers']} "
              f"| {r['decoder_layers_s']} "
              f"({low}-{high}) | {r['attribution_s']} | {r['peak_rss_gb']} |")
    print("\n| QIG method | samples | QIG/stock oneshot | QIG/stock decoder layers | QIG/stock peak RSS |")
    print("|---|---|---|---|---|")
    for r in qig_over_stock:
        print(f"| {r['method']} | {r['samples']} | {r['oneshot']} | {r['decoder_layers']} | {r['peak_rss']} |")
    print("\n| method | tokens | decoder-layer ms per extra token | over stock |")
    print("|---|---|---|---|")
    for r in slopes:
        print(f"| {r['method']} | {r['tokens'][0]}-{r['tokens'][1]} | {r['ms_per_token']} | {r.get('over_stock', '-')} |")
    if flops:
        print(f"\nper extra calibration token: stock GPTQ oneshot {flops['stock_gptq_gflop_per_token']} GFLOP, "
              f"QIG attribution {flops['qig_attribution_gflop_per_token']} GFLOP: QIG-GPTQ/GPTQ tends to at "
              f"least {flops['qig_over_stock_per_token']}x as calibration tokens grow")


if __name__ == "__main__":
    main()
