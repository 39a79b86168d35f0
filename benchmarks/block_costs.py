"""Where QIG's attribution time goes: each block of one decoder layer of the default model, attributed exactly and
fast (also under CPU bfloat16 autocast), against one plain forward of the block.

    python benchmarks/block_costs.py [--seq 256] [--layer 10] [--repeats 5] [--threads 1]

The blocks' real inputs come from a forward of the language model on ``--seq`` tokens of a user-scale
calibration record; ``Q(W)`` is W4 group 64 (the W4A16 recipe's grid). Each attribution runs once to settle
(probe, node counts, ``Q(W)`` cache) and is then timed ``--repeats`` times through
:func:`~qig_plugin.attribution.attribute_block`, the function the modifiers call. The bfloat16 row also gives the
rank agreement (Spearman) of its token scores with float32's, and the JSON the CPU's bf16 units. Writes
``benchmarks/results/block_costs.json`` and ``block_costs.png`` and prints a table.
"""

import argparse
import json
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from attribution_fidelity import W4_GROUP64, spearman  # benchmarks/, on the path when run as a script

from qig_plugin.attribution import AttributionCache, QIGSettings, attribute_block

RESULTS = Path(__file__).resolve().parent / "results"
# mode -> (settings, autocast dtype or None): "fast, bf16" is the fast default run under CPU bfloat16 autocast,
# the "attribution in bfloat16" lever (measured here, not shipped: it pays only where the CPU has bf16 units)
MODES = {"exact": (QIGSettings(qig_attribution="exact"), None), "fast": (QIGSettings(), None),
         "fast, bf16": (QIGSettings(), torch.bfloat16)}


def block_calls(seq: int, layer_index: int) -> dict:
    """The attention, MLP, o_proj and down_proj of one text layer, with their input linears and real call arguments."""
    from qig_plugin.data.user_scale import vlm_records
    from qig_plugin.models import build_default_model, load_model, load_processor

    model_dir = build_default_model()
    model, processor = load_model(model_dir).float().eval(), load_processor(model_dir)
    text = " ".join(f"{r.prompt} {r.answer}" for r in vlm_records("calibration", 8, processor=processor))
    ids = processor.tokenizer(text, return_tensors="pt")["input_ids"][:, :seq]
    layer = model.model.text_model.layers[layer_index]
    attention, mlp = layer.self_attn, layer.mlp
    blocks = {"attention": (attention, [attention.q_proj, attention.k_proj, attention.v_proj]),
              "mlp": (mlp, [mlp.gate_proj, mlp.up_proj]),
              "o_proj": (attention.o_proj, [attention.o_proj]),
              "down_proj": (mlp.down_proj, [mlp.down_proj])}
    calls = {}
    handles = [block.register_forward_pre_hook(
        lambda _m, args, kwargs, name=name: calls.__setitem__(name, (args, kwargs)), with_kwargs=True)
        for name, (block, _) in blocks.items()]
    with torch.no_grad():
        model.model.text_model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: (block, linears, *calls[name]) for name, (block, linears) in blocks.items()}


def attributed(dtype: torch.dtype | None, *args, **kwargs):
    """:func:`attribute_block` under CPU autocast to ``dtype`` (None: as it is)."""
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        return attribute_block(*args, **kwargs)


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 2)


def cpu_bf16_units() -> list[str]:
    """The CPU's bfloat16 instruction sets (Linux ``/proc/cpuinfo``): AVX512_BF16 and AMX make bf16 matmuls fast."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    return sorted(flags & {"avx512_bf16", "amx_bf16"})


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    names = [r["block"] for r in rows]
    series = ["forward", *MODES]
    width = 0.8 / len(series)
    for i, key in enumerate(series):
        axis.bar([j + (i - len(series) / 2 + 0.5) * width for j in range(len(rows))], [r[key] for r in rows], width,
                 label=key if key == "forward" else f"attribution, {key}")
    axis.set_xticks(range(len(rows)), names)
    axis.set_ylabel("milliseconds (median)")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=256, help="tokens in the batch of one")
    parser.add_argument("--layer", type=int, default=10, help="text decoder layer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, (block, input_linears, call_args, call_kwargs) in block_calls(args.seq, args.layer).items():
        weight_args = {m: W4_GROUP64 for m in block.modules() if isinstance(m, torch.nn.Linear)}
        with torch.no_grad():
            row = {"block": name, "forward": median_ms(partial(block, *call_args, **call_kwargs), args.repeats)}
        scores = {}
        for mode, (settings, dtype) in MODES.items():
            attribute = partial(attributed, dtype, block, call_args, call_kwargs, weight_args, settings,
                                input_linears=input_linears, cache=AttributionCache())
            result = attribute()  # settles the probe, the node count and Q(W)
            row[f"{mode} nodes"], scores[mode] = result.nodes, result.scores.float()
            row[mode] = median_ms(attribute, args.repeats)
        row["bf16 rank agreement"] = round(spearman(scores["fast"], scores["fast, bf16"]), 4)
        rows.append(row)
        print(row, flush=True)
    total = {key: round(sum(r[key] for r in rows), 2) for key in ("forward", *MODES)}
    title = (f"layer {args.layer} of the default model, {args.seq} tokens, W4 g64, {args.threads} thread(s): "
             f"attribution / forward = " + ", ".join(f"{m} {total[m] / total['forward']:.1f}x" for m in MODES))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "block_costs.json").write_text(json.dumps({
        "seq": args.seq, "layer": args.layer, "threads": args.threads, "repeats": args.repeats,
        "cpu": platform.processor() or platform.machine(), "cpu_bf16_units": cpu_bf16_units(),
        "rows": rows, "total_ms": total}, indent=1) + "\n")
    plot(rows, RESULTS / "block_costs.png", title)
    print("\n| block | forward ms | " + " | ".join(f"attribution {m} ms (nodes)" for m in MODES)
          + " | bf16 rank agreement |")
    print("|---|---|" + "---|" * (len(MODES) + 1))
    for r in rows:
        print(f"| {r['block']} | {r['forward']} | " + " | ".join(f"{r[m]} ({r[m + ' nodes']})" for m in MODES)
              + f" | {r['bf16 rank agreement']} |")
    print(f"| the four | {total['forward']} | " + " | ".join(str(total[m]) for m in MODES) + " | |")
    print(title)


if __name__ == "__main__":
    main()
