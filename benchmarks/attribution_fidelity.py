"""Fidelity and cost of the IG quadrature rules on real blocks of the default model.

    python benchmarks/attribution_fidelity.py [--samples 3] [--layers 0 10 20 29]

For the attention and MLP blocks of a few decoder layers, on real calibration inputs
(the full-precision model's own block inputs), QIG token scores from each rule and node
count are compared with a 256-node uniform reference: completeness error
(|sum IG - (F(x) - F(0))| / |F(x) - F(0)|) and Spearman rank correlation of the token
scores. Cost is the number of block evaluations per token (nodes). Writes
``benchmarks/results/attribution_fidelity.json`` and ``attribution_fidelity.png``.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from compressed_tensors.quantization import QuantizationArgs

from qig_plugin.attribution import discrepancy, fake_quantize_weight, integrated_gradients
from qig_plugin.data import batch_one_collator, build_calibration_dataset, shipped_records
from qig_plugin.models import build_default_model, load_model, load_processor
from qig_plugin.attribution import linear_weights

RESULTS = Path(__file__).resolve().parent / "results"
W4_GROUP64 = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64)
CANDIDATES = [("gauss_legendre", n) for n in (1, 2, 3, 4, 6, 8)] + [("uniform", n) for n in (8, 16, 32)]
ADAPTIVE_TOLERANCE = 0.01  # the modifiers' qig_completeness_tol default
LADDER = (2, 3, 4, 6)  # qig_min_steps 2, half again on failure, qig_steps 6
ADAPTIVE = "adaptive 2->3->4->6"


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [x.argsort().argsort().double() for x in (a.flatten(), b.flatten())]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def capture_block_inputs(model, batch, layers):
    """Run the FP model once; return {(layer, block): (args, kwargs)} of attention and MLP calls."""
    captured, handles = {}, []
    text_layers = model.model.text_model.layers
    for index in layers:
        for name in ("self_attn", "mlp"):
            def hook(module, args, kwargs, key=(index, name)):
                captured[key] = (tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs))
            handles.append(getattr(text_layers[index], name).register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(**batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return captured


def block_objective(block, weights, args, kwargs):
    """F(points) = sum_t mean_h |f_W - f_Q| for the block with the given linear weights."""
    uses_kwarg = not args
    def run(branch_weights, points):
        with linear_weights(branch_weights):
            out = block(**{**kwargs, "hidden_states": points}) if uses_kwarg else block(points, *args[1:], **kwargs)
        return out[0] if isinstance(out, tuple) else out
    fp, quantized = weights
    return lambda points: discrepancy(run(fp, points), run(quantized, points)).sum()


def adaptive_rows(rows: list[dict]) -> list[dict]:
    """The modifiers' default rule per block: Gauss-Legendre with 2, 3, 4 nodes, the first whose completeness
    error is within ``ADAPTIVE_TOLERANCE``, else 6; ``nodes`` counts every count tried plus the completeness
    check as half a node (2 forwards): the cost of a block's first batch (later batches start from the count
    that passed)."""
    by_block = {(r["sample"], r["layer"], r["block"], r["rule"], r["nodes"]): r for r in rows}
    adaptive = []
    for sample, layer, block in {(r["sample"], r["layer"], r["block"]) for r in rows}:
        cost = 0.5
        for nodes in LADDER:
            chosen = by_block[(sample, layer, block, "gauss_legendre", nodes)]
            cost += nodes
            if chosen["completeness_error"] <= ADAPTIVE_TOLERANCE:
                break
        adaptive.append({**chosen, "rule": ADAPTIVE, "nodes": cost, "nodes_kept": chosen["nodes"]})
    return adaptive


def summarize(rows: list[dict]) -> list[dict]:
    """Worst and mean completeness error and Spearman per (rule, nodes); the adaptive rule's mean nodes."""
    summary = []
    for rule, nodes in CANDIDATES + [(ADAPTIVE, None)]:
        selected = [r for r in rows if r["rule"] == rule and (nodes is None or r["nodes"] == nodes)]
        summary.append({
            "rule": rule, "nodes": nodes if nodes is not None else float(np.mean([r["nodes"] for r in selected])),
            "completeness_error_max": max(r["completeness_error"] for r in selected),
            "completeness_error_mean": float(np.mean([r["completeness_error"] for r in selected])),
            "spearman_min": min(r["spearman_vs_reference"] for r in selected),
            "spearman_mean": float(np.mean([r["spearman_vs_reference"] for r in selected])),
        })
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20, 29])
    args = parser.parse_args()

    model_dir = build_default_model()
    model = load_model(model_dir)
    model.config.text_config._attn_implementation = "eager"
    processor = load_processor(model_dir)
    records = shipped_records("calibration")[: args.samples]
    dataset = build_calibration_dataset(records, processor)
    rows = []
    for sample_index in range(len(dataset)):
        batch = batch_one_collator([dataset[sample_index]])
        batch.pop("loss_mask")
        for (layer, block_name), (block_args, block_kwargs) in capture_block_inputs(model, batch, args.layers).items():
            block = getattr(model.model.text_model.layers[layer], block_name)
            linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
            weights = ({m: m.weight.detach().float() for m in linears},
                       {m: fake_quantize_weight(m.weight, W4_GROUP64) for m in linears})
            x = (block_args[0] if block_args else block_kwargs["hidden_states"]).float()
            objective = block_objective(block, weights, block_args, block_kwargs)
            with torch.no_grad():
                total = (objective(x) - objective(torch.zeros_like(x))).item()
            reference = integrated_gradients(objective, x, steps=256, rule="uniform", points_per_pass=16)
            reference_scores = reference.abs().mean(-1)
            for rule, nodes in CANDIDATES:
                attributions = integrated_gradients(objective, x, steps=nodes, rule=rule)
                rows.append({
                    "sample": sample_index, "layer": layer, "block": block_name, "rule": rule, "nodes": nodes,
                    "completeness_error": abs(attributions.sum().item() - total) / abs(total),
                    "spearman_vs_reference": spearman(attributions.abs().mean(-1), reference_scores),
                })
            print(f"sample {sample_index} layer {layer:2d} {block_name:9s} done", flush=True)

    report(rows + adaptive_rows(rows), args.samples, args.layers)


def report(rows: list[dict], samples: int, layers: list[int]) -> None:
    """Write the JSON and the plot, print the table."""
    summary = summarize(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "attribution_fidelity.json").write_text(json.dumps({
        "reference": "uniform, 256 nodes", "quantizer": "int4 sym group 64 RTN",
        "samples": samples, "layers": layers, "summary": summary, "rows": rows}, indent=1) + "\n")

    print("\n| rule | nodes | completeness error max / mean | Spearman min / mean |\n|---|---|---|---|")
    for s in summary:
        print(f"| {s['rule']} | {s['nodes']:.3g} | {s['completeness_error_max']:.2e} / {s['completeness_error_mean']:.2e}"
              f" | {s['spearman_min']:.4f} / {s['spearman_mean']:.4f} |")

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for rule, marker in (("gauss_legendre", "o"), ("uniform", "s"), (ADAPTIVE, "*")):
        points = [s for s in summary if s["rule"] == rule]
        nodes = [s["nodes"] for s in points]
        left.semilogy(nodes, [s["completeness_error_max"] for s in points], marker=marker, label=rule)
        right.plot(nodes, [s["spearman_min"] for s in points], marker=marker, label=rule)
    left.axhline(0.01, color="grey", linestyle="--", label="1% target")
    right.axhline(0.99, color="grey", linestyle="--", label="0.99 target")
    left.set(xlabel="nodes (block evaluations per token)", ylabel="worst completeness error", title="Completeness")
    right.set(xlabel="nodes (block evaluations per token)", ylabel="worst Spearman vs 256-node reference",
              title="Token-score ranking")
    for axis in (left, right):
        axis.legend()
        axis.set_xscale("log", base=2)
    figure.suptitle("QIG attribution on the default model's attention and MLP blocks (W4 g64)")
    figure.tight_layout()
    figure.savefig(RESULTS / "attribution_fidelity.png", dpi=110)


if __name__ == "__main__":
    main()
