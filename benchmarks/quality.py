"""Does QIG preserve the model better than stock GPTQ, AWQ, SmoothQuant and MBQ? Fidelity to the FP parent.

    python benchmarks/quality.py --quick      # VLM, W3A16, RTN/GPTQ/QIG-GPTQ + the norm control, 8 samples
    python benchmarks/quality.py              # every scheme x method on both models, then the ablation
    python benchmarks/quality.py --models vlm --schemes w3a16 --methods gptq qig_gptq

Models: ``vlm``, the default model (real SmolLM2-135M-Instruct in SmolVLM, docs/model-card.md), and ``text``,
its language model alone. Both calibrate on the shipped calibration records (the text model on their text
without the photos) and are scored on data calibration never sees: the held-out records (held-out photos,
prompts and documentation passages) and held-out ``pydoc_data.topics`` text. Metrics against the
full-precision parent: mean KL(FP || Q) of next-token distributions over all positions and over answer
positions, top-1 agreement, and perplexity on the held-out text, each with a bootstrap 95% interval over
samples; QIG/stock KL ratios use paired resamples. The metrics, intervals and held-out text are
``qig_plugin.evaluation``'s, the implementation ``qig eval`` runs on a saved checkpoint.

Every cell (model, scheme, method) runs in its own process on the same records with the same seed and
saves its per-sample metrics under ``benchmarks/results/quality_cells/`` (reused on later runs unless
``--fresh``); the summary of every saved cell with the same sample count goes to
``benchmarks/results/quality.json``, ``quality.md`` and ``quality.png``. ``--quick`` keeps no cells and writes
``quality_quick.*`` instead.
Cell wall times are the ``oneshot`` calibration alone (same data, one run each).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from qig_plugin.evaluation import (
    bootstrap_interval,
    heldout_text_passages,
    next_token_log_probs,
    paired_ratio,
    perplexity_interval,
    records_set,
    replace_images,
    text_set,
)
from qig_plugin.evaluation import sample_metrics as evaluation_sample_metrics
from qig_plugin.recipes import shipped_recipe

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES = shipped_recipe("gptq_w8a8").parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
CELLS = RESULTS / "quality_cells"
SEED = 0
TEXT_PASSAGES = 16
TEXT_TOKENS = 256
CHILD_TIMEOUT_S = 1800

# method -> (recipe file stem with {scheme}, modifier class swaps, field overrides, schemes it applies to)
METHODS = {
    "rtn": ("gptq_{scheme}", {"GPTQModifier": "QuantizationModifier"}, {}, ("w3a16", "w4a16", "w4a8", "w8a8")),
    "gptq": ("gptq_{scheme}", {}, {}, ("w3a16", "w4a16", "w4a8", "w8a8")),
    "qig_gptq": ("qig_gptq_{scheme}", {}, {}, ("w3a16", "w4a16", "w4a8", "w8a8")),
    "norm_gptq": ("qig_gptq_{scheme}", {"QIGGPTQModifier": "NormWeightedGPTQModifier"}, {},
                  ("w3a16", "w4a16", "w4a8", "w8a8")),
    "sink_gptq": ("qig_gptq_{scheme}", {"QIGGPTQModifier": "SinkMaskedGPTQModifier"}, {},
                  ("w3a16", "w4a16", "w4a8", "w8a8")),
    "awq": ("awq_{scheme}", {}, {}, ("w3a16", "w4a16", "w4a8")),
    "qig_awq": ("qig_awq_{scheme}", {}, {}, ("w3a16", "w4a16", "w4a8")),
    "mbq_awq": ("qig_awq_{scheme}", {"QIGAWQModifier": "MBQModifier"}, {}, ("w3a16", "w4a16", "w4a8")),
    "sq_gptq": ("sq_gptq_{scheme}", {}, {}, ("w4a8", "w8a8")),
    "qig_sq_gptq": ("qig_sq_gptq_{scheme}", {}, {}, ("w4a8", "w8a8")),
    "qig_sq_qig_gptq": ("qig_sq_gptq_{scheme}", {"GPTQModifier": "QIGGPTQModifier"}, {}, ("w4a8", "w8a8")),
    # ablation of QIG-GPTQ's own knobs
    "qig_gptq_quantized_baseline": ("qig_gptq_{scheme}", {}, {"qig_baseline": "quantized"}, ("w4a8", "w8a8")),
    "qig_gptq_no_iqr_clip": ("qig_gptq_{scheme}", {}, {"qig_iqr_clip": False}, ("w3a16", "w4a8")),
    "qig_gptq_6_nodes": ("qig_gptq_{scheme}", {}, {"qig_min_steps": 6}, ("w3a16", "w4a8")),
    "qig_gptq_uniform_32": ("qig_gptq_{scheme}", {}, {"qig_rule": "uniform", "qig_steps": 32, "qig_min_steps": 32},
                            ("w3a16", "w4a8")),
    "qig_gptq_prompt_masked": ("qig_gptq_{scheme}", {}, {}, ("w3a16", "w4a8")),
    "gptq_prompt_masked": ("qig_gptq_{scheme}", {"QIGGPTQModifier": "UniformWeightedGPTQModifier"}, {},
                           ("w3a16", "w4a8")),
    "qig_gptq_split_attention": ("qig_gptq_{scheme}", {"QIGGPTQModifier": "SplitAttentionQIGGPTQModifier"}, {},
                                 ("w3a16", "w4a8")),
}
# methods calibrated with the chat template's system turn masked (loss_mask 0, honored by the QIG modifiers)
PROMPT_MASKED = ("qig_gptq_prompt_masked", "gptq_prompt_masked")
STOCK = ("rtn", "gptq", "awq", "sq_gptq")
QIG = ("qig_gptq", "qig_awq", "qig_sq_gptq", "qig_sq_qig_gptq")
CONTROLS = ("norm_gptq", "sink_gptq", "mbq_awq")
ABLATION = tuple(m for m in METHODS if m.startswith("qig_gptq_")) + ("gptq_prompt_masked",)
MAIN_METHODS = STOCK + QIG + CONTROLS
# each non-stock method's stock counterpart (the ablation's qig_gptq_* and gptq_* cells: gptq)
STOCK_TWIN = {"qig_gptq": "gptq", "norm_gptq": "gptq", "sink_gptq": "gptq", "qig_awq": "awq",
              "mbq_awq": "awq", "qig_sq_gptq": "sq_gptq", "qig_sq_qig_gptq": "sq_gptq"}
IMAGE_ONLY = ("mbq_awq",)  # MBQ weights tokens by modality: the text model has no image tokens
SCHEMES = ("w3a16", "w4a16", "w4a8", "w8a8")


# ---------------------------------------------------------------- controls (benchmark-only modifiers)


def control_modifiers():
    """The cheap controls of the GPTQ cells, as QIG-GPTQ with other token scores (same weighting path)."""
    from qig_plugin.modifiers import QIGGPTQModifier
    from qig_plugin.attribution import block_input

    class NormWeightedGPTQModifier(QIGGPTQModifier):
        """Control: token scores ``||x_t||`` of the block input, normalized and IQR-clipped as QIG's."""

        def qig_scores(self, block, weight_args, args, kwargs, baseline_args=None, input_linears=()):
            return block_input(args, kwargs)[1].detach().float().norm(dim=-1)

    class SinkMaskedGPTQModifier(QIGGPTQModifier):
        """Control: stock GPTQ with the first token (the attention sink) weighted 0, all others equal."""

        qig_iqr_clip: bool = False

        def qig_scores(self, block, weight_args, args, kwargs, baseline_args=None, input_linears=()):
            scores = torch.ones(block_input(args, kwargs)[1].shape[:2])
            scores[:, 0] = 0.0
            return scores

    class UniformWeightedGPTQModifier(QIGGPTQModifier):
        """Control: stock GPTQ over the kept tokens only (weight 1 each, 0 where the loss mask is 0)."""

        qig_iqr_clip: bool = False

        def qig_scores(self, block, weight_args, args, kwargs, baseline_args=None, input_linears=()):
            return torch.ones(block_input(args, kwargs)[1].shape[:2])

    class SplitAttentionQIGGPTQModifier(QIGGPTQModifier):
        """Experiment: q_proj weighted by the attribution of quantizing q alone, k/v by quantizing k and v
        alone (an error in q_t reaches only output t, one in k_t/v_t every later output that attends to t)."""

        def group_weights(self, group, args, kwargs):
            if not group.block_name.endswith("self_attn"):
                return super().group_weights(group, args, kwargs)
            _, block_in = block_input(args, kwargs)
            keep = self.token_mask(block_in, kwargs)
            weights = {}
            for linears in (group.linears[:1], group.linears[1:]):  # q alone, then k and v
                scores = self.qig_scores(group.block, {m: group.weight_args[m] for m in linears}, args, kwargs)
                weights.update(dict.fromkeys(linears, self.qig_weights(scores, keep)))
            return weights

    return {cls.__name__: cls for cls in (NormWeightedGPTQModifier, SinkMaskedGPTQModifier,
                                          UniformWeightedGPTQModifier, SplitAttentionQIGGPTQModifier)}


def build_modifiers(method: str, scheme: str) -> list:
    """The method's modifiers for ``scheme``: the shipped recipe, with class swaps and field overrides."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    from qig_plugin.modifiers import MBQModifier, QIGAWQModifier, QIGGPTQModifier, QIGSmoothQuantModifier

    classes = {cls.__name__: cls for cls in (GPTQModifier, QuantizationModifier, AWQModifier, SmoothQuantModifier,
                                             MBQModifier, QIGAWQModifier, QIGGPTQModifier, QIGSmoothQuantModifier)}
    classes.update(control_modifiers())
    recipe, swaps, overrides, _ = METHODS[method]
    stages = yaml.safe_load((RECIPES / f"{recipe.format(scheme=scheme)}.yaml").read_text())
    modifiers = []
    for stage in stages.values():
        for group in stage.values():
            for name, fields in group.items():
                cls = classes[swaps.get(name, name)]
                fields = {**fields, **overrides}
                modifiers.append(cls(**{k: v for k, v in fields.items() if k in cls.model_fields}))
    return modifiers


# ---------------------------------------------------------------- data


def heldout_text_ids(tokenizer) -> list[list[int]]:
    """``TEXT_PASSAGES`` real documentation passages the calibration records never use: ``TEXT_TOKENS`` ids each.

    Only the VLM records' topics are excluded (what both models calibrate on here), so the choice stays that of the
    saved cells (``qig eval`` also excludes the text-only records' topics).
    """
    from qig_plugin.data.records import PASSAGE_TASKS

    used = {topic for topic, *_ in PASSAGE_TASKS}
    return heldout_text_passages(tokenizer, TEXT_PASSAGES, TEXT_TOKENS, exclude=used)


def load_subject(model_kind: str, samples: int, mask_prompt: bool):
    """Model, processor, calibration dataset and the held-out sets (records, text) for ``"vlm"`` or ``"text"``."""
    from qig_plugin.data import build_calibration_dataset, shipped_records
    from qig_plugin.models import build_default_model, build_text_model, load_model, load_processor

    calibration, heldout = shipped_records("calibration"), shipped_records("heldout")
    if model_kind == "vlm":
        model_dir = build_default_model()
        processor, model = load_processor(model_dir), load_model(model_dir)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = build_text_model()
        processor = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        calibration, heldout = replace_images(calibration), replace_images(heldout)
    order = np.random.default_rng(SEED).permutation(len(calibration))[:samples]
    dataset = build_calibration_dataset([calibration[i] for i in sorted(order)], processor,
                                        mask_system_prompt=mask_prompt)
    tokenizer = getattr(processor, "tokenizer", processor)
    heldout_sets = (records_set("records", heldout, processor), text_set("text", heldout_text_ids(tokenizer)))
    return model, processor, dataset, heldout_sets


# ---------------------------------------------------------------- metrics (qig_plugin.evaluation's)


def log_probs(model, heldout_sets) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Next-token log-probabilities ``[1, seq, vocab]`` for each held-out record, then for each text passage."""
    return tuple([next_token_log_probs(model, row) for row in eval_set.rows] for eval_set in heldout_sets)


def sample_metrics(reference, quantized, heldout_sets) -> dict[str, list[float]]:
    """Per-sample metrics (one value per held-out record or text passage).

    ``kl_answer`` averages the positions from the one predicting the answer's first token to the end.
    """
    records, texts = heldout_sets
    metrics = {"kl_all": [], "kl_answer": [], "top1": [], "text_kl": [], "text_nll": [], "text_nll_fp": []}
    for ref, quant, row, span in zip(reference[0], quantized[0], records.rows, records.answer_spans):
        scores = evaluation_sample_metrics(ref, quant, torch.as_tensor(row["input_ids"])[None], answer_spans=[span])
        metrics["kl_all"].append(float(scores["kl"][0]))
        metrics["kl_answer"].append(float(scores["kl_answer"][0]))
        metrics["top1"].append(float(scores["top1"][0]))
    for ref, quant, row in zip(reference[1], quantized[1], texts.rows):
        scores = evaluation_sample_metrics(ref, quant, torch.as_tensor(row["input_ids"])[None])
        metrics["text_kl"].append(float(scores["kl"][0]))
        metrics["text_nll"].append(float(scores["nll"][0]))
        metrics["text_nll_fp"].append(float(scores["nll_reference"][0]))
    return metrics


# ---------------------------------------------------------------- one cell


def save_reference(model_kind: str, path: Path) -> None:
    """The FP parent's held-out log-probabilities, computed once per run and read by every cell."""
    model, _, _, heldout_sets = load_subject(model_kind, samples=1, mask_prompt=False)
    torch.save(log_probs(model.eval(), heldout_sets), path)


def run_cell(model_kind: str, scheme: str, method: str, samples: int, reference_path: Path) -> dict:
    """Calibrate one (model, scheme, method) and score it against the FP parent; per-sample metrics."""
    from qig_plugin.quantize import calibrate

    torch.manual_seed(SEED)
    mask_prompt = method in PROMPT_MASKED
    model, processor, dataset, heldout_sets = load_subject(model_kind, samples, mask_prompt)
    seconds = calibrate(model, processor, build_modifiers(method, scheme), dataset, use_loss_mask=mask_prompt)
    quantized = log_probs(model.eval(), heldout_sets)
    reference = torch.load(reference_path)
    return {
        "model": model_kind, "scheme": scheme, "method": method, "samples": samples,
        "calibration_tokens": int(sum(len(ids) for ids in dataset["input_ids"])),
        "calibration_s": round(seconds, 1),
        "per_sample": sample_metrics(reference, quantized, heldout_sets),
    }


# ---------------------------------------------------------------- summary


def summarize(cell: dict) -> dict:
    per_sample = {k: np.array(v) for k, v in cell["per_sample"].items()}
    text_tokens = np.full(len(per_sample["text_nll"]), TEXT_TOKENS - 1)  # every passage scores TEXT_TOKENS - 1 tokens
    return {
        "kl_all": bootstrap_interval(per_sample["kl_all"]),
        "kl_answer": bootstrap_interval(per_sample["kl_answer"]),
        "top1": bootstrap_interval(per_sample["top1"]),
        "text_kl": bootstrap_interval(per_sample["text_kl"]),
        "text_ppl": perplexity_interval(per_sample["text_nll"], text_tokens),
        "text_ppl_fp": perplexity_interval(per_sample["text_nll_fp"], text_tokens)[0],
        "calibration_s": cell["calibration_s"],
    }


def ratios_to_best_stock(cells: dict) -> list[dict]:
    """Per (model, scheme): each non-stock method's KL over the best stock method's (not RTN), paired bootstrap."""
    rows = []
    for model_kind, scheme in sorted({(m, s) for m, s, _ in cells}):
        present = {k: cell["per_sample"] for (m, s, k), cell in cells.items() if (m, s) == (model_kind, scheme)}
        stock = [k for k in present if k in STOCK and k != "rtn"]
        if not stock:
            continue
        best = min(stock, key=lambda k: np.mean(present[k]["kl_all"]))
        for method, metrics in present.items():
            if method in STOCK:
                continue
            row = {"model": model_kind, "scheme": scheme, "method": method, "best_stock": best}
            for metric in ("kl_all", "kl_answer", "text_kl"):
                row[metric] = paired_ratio(np.array(metrics[metric]), np.array(present[best][metric]))
            twin = "gptq" if method in ABLATION else STOCK_TWIN.get(method)
            if twin in present:
                row["twin"] = twin
                row["kl_all_twin"] = paired_ratio(np.array(metrics["kl_all"]), np.array(present[twin]["kl_all"]))
            row["text_ppl_ratio"] = float(np.exp(np.mean(metrics["text_nll"]) - np.mean(present[best]["text_nll"])))
            rows.append(row)
    return rows


def fmt(interval: list[float], digits: int = 3) -> str:
    return f"{interval[0]:.{digits}f} [{interval[1]:.{digits}f}, {interval[2]:.{digits}f}]"


def markdown(summaries: dict, ratios: list[dict]) -> str:
    lines = ["| model | scheme | method | KL all | KL answer | top-1 | text PPL (FP) | calib s |",
             "|---|---|---|---|---|---|---|---|"]
    for (model_kind, scheme, method), s in sorted(summaries.items(), key=lambda kv: (
            kv[0][0], SCHEMES.index(kv[0][1]), list(METHODS).index(kv[0][2]))):
        lines.append(f"| {model_kind} | {scheme} | {method} | {fmt(s['kl_all'])} | {fmt(s['kl_answer'])} "
                     f"| {s['top1'][0]:.3f} | {s['text_ppl'][0]:.2f} ({s['text_ppl_fp']:.2f}) | {s['calibration_s']} |")
    lines += ["", "| model | scheme | method | best stock | KL ratio all | KL ratio answer | text KL ratio | PPL ratio "
              "| KL ratio to stock twin |", "|---|---|---|---|---|---|---|---|---|"]
    for r in ratios:
        twin = f"{fmt(r['kl_all_twin'])} ({r['twin']})" if "twin" in r else "-"
        lines.append(f"| {r['model']} | {r['scheme']} | {r['method']} | {r['best_stock']} | {fmt(r['kl_all'])} "
                     f"| {fmt(r['kl_answer'])} | {fmt(r['text_kl'])} | {r['text_ppl_ratio']:.3f} | {twin} |")
    return "\n".join(lines) + "\n"


def plot(summaries: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({m for m, _, _ in summaries})
    colors = dict(zip(METHODS, plt.get_cmap("tab20").colors))  # one color per method in every panel
    figure, axes = plt.subplots(len(models), 1, figsize=(13, 3.8 * len(models)), squeeze=False)
    for axis, model_kind in zip(axes[:, 0], models):
        schemes = [s for s in SCHEMES if any((model_kind, s, m) in summaries for m in METHODS)]
        methods = [m for m in METHODS if any((model_kind, s, m) in summaries for s in schemes)]
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            xs, ys, errors = [], [], []
            for j, scheme in enumerate(schemes):
                if (model_kind, scheme, method) in summaries:
                    mean, low, high = summaries[(model_kind, scheme, method)]["kl_all"]
                    xs.append(j + (i - len(methods) / 2 + 0.5) * width)
                    ys.append(mean)
                    errors.append((mean - low, high - mean))
            hatch = "//" if method in QIG else ("." if method in CONTROLS + ABLATION else None)
            axis.bar(xs, ys, width, yerr=np.array(errors).T, label=method, hatch=hatch, capsize=2,
                     color=colors[method])
        axis.set_xticks(range(len(schemes)), [s.upper() for s in schemes])
        axis.set_yscale("log")
        axis.set_ylabel("held-out KL(FP || Q)")
        axis.set_title(f"{model_kind}: lower is better (95% bootstrap intervals)")
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# ---------------------------------------------------------------- driver


def run_child(arguments: list[str]) -> str:
    """Run this script with ``arguments`` in a fresh process (a clean llm-compressor session); its stdout.

    A child past ``CHILD_TIMEOUT_S`` is killed and run once more (a grid run once stalled in a child's futex wait
    while other jobs shared the cores; the rerun of the same cell finished normally)."""
    for attempt in (1, 2):
        try:
            completed = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True,
                                       timeout=CHILD_TIMEOUT_S)
            break
        except subprocess.TimeoutExpired:
            print(f"    {' '.join(arguments[:4])}: no result after {CHILD_TIMEOUT_S} s, attempt {attempt} killed",
                  flush=True)
    else:
        raise SystemExit(f"{' '.join(arguments[:4])} timed out twice")
    if completed.returncode != 0:
        print(completed.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{' '.join(arguments[:4])} failed (exit {completed.returncode})")
    return completed.stdout


def plan(args) -> list[tuple[str, str, str]]:
    methods = args.methods or (MAIN_METHODS + ABLATION)
    return [(model_kind, scheme, method) for model_kind in args.models for scheme in args.schemes
            for method in methods if scheme in METHODS[method][3]
            and not (model_kind == "text" and method in ABLATION + IMAGE_ONLY)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="VLM, W3A16, GPTQ family, 8 samples")
    parser.add_argument("--models", nargs="+", choices=("vlm", "text"), default=["vlm", "text"])
    parser.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS))
    parser.add_argument("--samples", type=int, default=16, help="calibration records (of 52)")
    parser.add_argument("--fresh", action="store_true", help="recompute cells already saved")
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)  # MODEL SCHEME METHOD SAMPLES REFERENCE
    parser.add_argument("--reference", nargs=2, help=argparse.SUPPRESS)  # MODEL PATH
    args = parser.parse_args()
    if args.reference:
        save_reference(args.reference[0], Path(args.reference[1]))
        return
    if args.one:
        model_kind, scheme, method, samples, reference = args.one
        print("RESULT " + json.dumps(run_cell(model_kind, scheme, method, int(samples), Path(reference))))
        return
    if args.quick:
        args.models, args.schemes, args.samples = ["vlm"], ["w3a16"], 8
        args.methods = args.methods or ["rtn", "gptq", "qig_gptq", "norm_gptq"]
    with tempfile.TemporaryDirectory() as scratch:
        # --quick computes every cell afresh, keeps none, and writes quality_quick.*
        cells_dir = Path(scratch) / "cells" if args.quick else CELLS
        run_grid(args, cells_dir, Path(scratch), "quality_quick" if args.quick else "quality")


def run_grid(args, cells_dir: Path, scratch: Path, stem: str) -> None:
    """Run the planned cells not saved in ``cells_dir`` yet; summarize every saved cell of this sample count."""
    started = time.perf_counter()
    cells = {}
    todo = plan(args)
    cells_dir.mkdir(parents=True, exist_ok=True)
    references = {}
    for index, (model_kind, scheme, method) in enumerate(todo, 1):
        saved = cells_dir / f"{model_kind}_{scheme}_{method}_{args.samples}.json"
        if saved.exists() and not args.fresh:
            cells[(model_kind, scheme, method)] = json.loads(saved.read_text())
            print(f"[{index}/{len(todo)}] {model_kind} {scheme} {method}: saved result", flush=True)
            continue
        if model_kind not in references:
            references[model_kind] = scratch / f"{model_kind}_reference.pt"
            print(f"FP reference of {model_kind} ...", flush=True)
            run_child(["--reference", model_kind, str(references[model_kind])])
        print(f"[{index}/{len(todo)}] {model_kind} {scheme} {method} on {args.samples} samples "
              f"({time.perf_counter() - started:.0f} s so far) ...", flush=True)
        output = run_child(["--one", model_kind, scheme, method, str(args.samples), str(references[model_kind])])
        cell = json.loads(next(l for l in output.splitlines() if l.startswith("RESULT ")).removeprefix("RESULT "))
        saved.write_text(json.dumps(cell) + "\n")
        cells[(model_kind, scheme, method)] = cell
        print(f"    KL {np.mean(cell['per_sample']['kl_all']):.4f}, calibration {cell['calibration_s']} s", flush=True)

    for saved in sorted(cells_dir.glob(f"*_{args.samples}.json")):  # this run's cells and every earlier one
        cell = json.loads(saved.read_text())
        cells.setdefault((cell["model"], cell["scheme"], cell["method"]), cell)
    summaries = {key: summarize(cell) for key, cell in cells.items()}
    ratios = ratios_to_best_stock(cells)
    table = markdown(summaries, ratios)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({
        "samples": args.samples, "seed": SEED, "text_passages": TEXT_PASSAGES, "text_tokens": TEXT_TOKENS,
        "cells": [{"model": m, "scheme": s, "method": k, **v} for (m, s, k), v in summaries.items()],
        "ratios_to_best_stock": ratios,
    }, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(table)
    plot(summaries, RESULTS / f"{stem}.png")
    print("\n" + table)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
