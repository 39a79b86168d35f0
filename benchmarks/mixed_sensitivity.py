"""How well each mixed-precision sensitivity predicts what quantizing a unit does to the model, and what its
allocations cost in end quality, on the default model with round-to-nearest weights (no GPTQ: only the choice of
widths differs).

    python benchmarks/mixed_sensitivity.py [--plan-samples 4] [--eval-records 4] [--budgets 3.0 3.5]

1. Sensitivities (``plan_mixed_precision``'s costs: ``qig``, its forward-only control ``discrepancy``, LUQ's
   ``entropy``) of every unit at 2, 3, 4 and 8 bits, on ``--plan-samples`` CALIBRATION records.
2. Ground truth: the KL of the full-precision model's next-token distribution to that of the model with only that
   unit rounded to 2 (and 3) bits, over every position of ``--eval-records`` VALIDATION records; each
   sensitivity's Spearman rank correlation with it, over all units and within each unit kind.
3. Allocations: for each budget and each candidate-width set, the allocation of every sensitivity, all its units
   rounded at once, scored by the same KL; beside uniform widths.

Writes ``benchmarks/results/mixed_sensitivity.{json,md,png}``; shows progress on stderr.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from compressed_tensors.quantization import QuantizationArgs
from scipy.stats import spearmanr

from qig_plugin.attribution import fake_quantize_weight
from qig_plugin.data import batch_one_collator, build_calibration_dataset
from qig_plugin.data.user_scale import vlm_records
from qig_plugin.mixed_precision import allocate_widths, average_bits, plan_mixed_precision, quant_units
from qig_plugin.models import build_default_model, load_model, load_processor

RESULTS = Path(__file__).resolve().parent / "results"
SENSITIVITIES = ("qig", "discrepancy", "entropy")
COST_WIDTHS = (2, 3, 4, 8)
TRUTH_WIDTHS = (2, 3)
WIDTH_SETS = ((2, 3, 4), (2, 3, 4, 8))
GROUP_SIZE = 64


def rows_of(split: str, count: int, processor) -> list[dict]:
    dataset = build_calibration_dataset(vlm_records(split, count, processor=processor), processor)
    return [{k: v for k, v in batch_one_collator([row]).items() if k != "loss_mask"} for row in dataset]


class RoundedModel:
    """The model with chosen units' linears rounded to chosen widths, scored by KL to the full-precision model."""

    def __init__(self, model, units, batches):
        self.model, self.units, self.batches = model, units, batches
        self.modules = dict(model.named_modules())
        self.original = {name: self.modules[name].weight.data.clone() for u in units for name in u.linears}
        self.reference = self.log_probs()

    def log_probs(self) -> list[torch.Tensor]:
        with torch.no_grad():
            return [torch.log_softmax(self.model(**b, use_cache=False).logits.float(), -1) for b in self.batches]

    def kl(self, widths: dict[str, int]) -> float:
        """Mean KL(full precision || rounded) over every position; ``widths``: unit name -> bits (others kept)."""
        for unit in self.units:
            bits = widths.get(unit.name, 16)
            for name in unit.linears:
                self.modules[name].weight.data = self.original[name] if bits == 16 else fake_quantize_weight(
                    self.original[name], QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group",
                                                          group_size=GROUP_SIZE))
        rounded = self.log_probs()
        for name, weight in self.original.items():
            self.modules[name].weight.data = weight
        return float(np.mean([(p.exp() * (p - q)).sum(-1).mean().item() for p, q in zip(self.reference, rounded)]))


def kind_of(unit_name: str) -> str:
    return unit_name.rsplit(".", 1)[1].split(",")[0].strip("{")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (scatter, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    truth = result["truth"]
    names = list(truth)
    for sensitivity, marker in zip(SENSITIVITIES, "o^s"):
        costs = np.array([result["costs"][sensitivity][n]["2"] for n in names])
        scatter.scatter([truth[n]["2"] for n in names], costs / costs.mean(), s=10, marker=marker,
                        label=f"{sensitivity} (Spearman {result['spearman'][sensitivity]['2']['all']:.2f})")
    scatter.set_xlabel("end KL, only this unit at 2 bits (validation)")
    scatter.set_ylabel("sensitivity at 2 bits / its mean")
    scatter.set_yscale("log")
    scatter.set_xscale("log")
    scatter.legend(fontsize=8)
    scatter.set_title("each unit: predicted against measured", fontsize=9)
    labels = list(result["allocations"])
    values = [result["allocations"][k]["kl"] for k in labels]
    bars.barh(range(len(labels)), values, color=["tab:gray" if k.startswith("uniform") else
                                                 "tab:blue" if k.startswith("qig") else "tab:orange" if
                                                 k.startswith("discrepancy") else "tab:green" for k in labels])
    bars.set_yticks(range(len(labels)), labels, fontsize=7)
    bars.set_xlabel("end KL (validation), all units rounded per allocation")
    bars.set_xscale("log")
    bars.set_title("allocations (round to nearest)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan-samples", type=int, default=4, help="calibration records the costs are measured on")
    parser.add_argument("--eval-records", type=int, default=4, help="validation records the KL is measured on")
    parser.add_argument("--budgets", type=float, nargs="+", default=[3.0, 3.5])
    args = parser.parse_args()
    model_dir = build_default_model()
    model, processor = load_model(model_dir).eval(), load_processor(model_dir)
    units, _ = quant_units(model)
    plan_rows = rows_of("calibration", args.plan_samples, processor)
    costs = {}
    for sensitivity in SENSITIVITIES:
        print(f"{sensitivity} costs on {len(plan_rows)} calibration records ...", file=sys.stderr, flush=True)
        plan = plan_mixed_precision(model, plan_rows, max(args.budgets), COST_WIDTHS, sensitivity, GROUP_SIZE)
        costs[sensitivity] = plan.costs
    rounded = RoundedModel(model, units, rows_of("validation", args.eval_records, processor))
    truth = {}
    for index, unit in enumerate(units, 1):
        truth[unit.name] = {bits: rounded.kl({unit.name: bits}) for bits in TRUTH_WIDTHS}
        print(f"\rground truth {index}/{len(units)} units", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    kinds = sorted({kind_of(u.name) for u in units})
    spearman = {}
    for sensitivity in SENSITIVITIES:
        spearman[sensitivity] = {}
        for bits in TRUTH_WIDTHS:
            def rho(names):
                return float(spearmanr([truth[n][bits] for n in names], [costs[sensitivity][n][bits] for n in names])[0])
            spearman[sensitivity][str(bits)] = {"all": rho([u.name for u in units]), **{
                kind: rho([u.name for u in units if kind_of(u.name) == kind]) for kind in kinds}}
    allocations = {f"uniform {bits}": {"bits": float(bits), "kl": rounded.kl(dict.fromkeys(truth, bits))}
                   for bits in (2, 3, 4)}
    for budget in args.budgets:
        for widths in WIDTH_SETS:
            for sensitivity in SENSITIVITIES:
                chosen = allocate_widths(units, {n: {b: costs[sensitivity][n][b] for b in widths} for n in truth},
                                         budget)
                key = f"{sensitivity} {budget} bits, widths {'/'.join(map(str, widths))}"
                allocations[key] = {"bits": average_bits(units, chosen), "kl": rounded.kl(chosen)}
                print(f"{key}: KL {allocations[key]['kl']:.4f}", file=sys.stderr, flush=True)
    result = {"plan_samples": args.plan_samples, "eval_records": args.eval_records, "group_size": GROUP_SIZE,
              "costs": {s: {n: {str(b): v for b, v in c.items()} for n, c in costs[s].items()} for s in SENSITIVITIES},
              "truth": {n: {str(b): v for b, v in t.items()} for n, t in truth.items()},
              "spearman": spearman, "allocations": allocations}
    lines = [f"Sensitivities on {args.plan_samples} calibration records; end KL on {args.eval_records} validation "
             "records; round to nearest, group 64.", "",
             "| sensitivity | bits | Spearman, all units | " + " | ".join(kinds) + " |",
             "|---|---|---|" + "---|" * len(kinds)]
    for sensitivity in SENSITIVITIES:
        for bits in TRUTH_WIDTHS:
            row = spearman[sensitivity][str(bits)]
            lines.append(f"| {sensitivity} | {bits} | {row['all']:.3f} | " + " | ".join(f"{row[k]:.2f}" for k in kinds)
                         + " |")
    lines += ["", "| allocation | average bits | end KL |", "|---|---|---|"]
    lines += [f"| {k} | {v['bits']:.3f} | {v['kl']:.4f} |" for k, v in allocations.items()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mixed_sensitivity.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "mixed_sensitivity.md").write_text("\n".join(lines) + "\n")
    plot(result, RESULTS / "mixed_sensitivity.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
