#!/usr/bin/env python
"""GPU smoke check: QIG-GPTQ and QIG-AWQ on a tiny VLM through llm-compressor's ``oneshot``, on CUDA and on
the CPU, and the two checkpoints compared. Runs offline in a few minutes from a checkout, in the quantize
environment (llm-compressor 0.14, torch with CUDA)::

    python scripts/gpu_smoke.py                 # CUDA run vs CPU reference
    python scripts/gpu_smoke.py --device cpu    # CPU vs CPU: checks this script; must match bit for bit

Prints one detail line per method and a last line ``gpu_smoke PASS|FAIL: ...`` with the timings.
Exit code 0 PASS, 1 FAIL, 2 cannot run (e.g. no CUDA).

What runs: a tiny Idefics3 (``tests/tiny_vlm_folder.py``: Llama text model, hidden 128, 2 layers; 32 px vision
tower) saved to a folder, then for each method the shipped recipe (``qig_gptq_w4a16``: int4 symmetric group 64;
``qig_awq_w4a16``: QIGAWQModifier + QuantizationModifier, int4 asymmetric group 64) through the real ``oneshot``
with ``pipeline="sequential"`` over the decoder layers, the shipped calibration records, ``batch_one_collator``,
and ``save_pretrained(save_compressed=True)``. The QIG node count is fixed (``qig_min_steps = qig_steps = 3``) so
that both devices integrate with the same quadrature; the adaptive ladder's accept/retake decision is a threshold
that float noise may tip either way.

Devices: llm-compressor 0.14 has no argument for the device the sequential pipeline onloads layers to: it is
``llmcompressor.utils.dev.get_main_device()``, the first accelerator if torch sees one, else the CPU
(``sequential_offload_device``, set to ``"cpu"`` here, is where the activations between layers wait). So each
device runs in its own subprocess: the CPU one with ``CUDA_VISIBLE_DEVICES=""``, the CUDA one as it is. Hooks on
the decoder layers record the device of every input they get; a run whose layers did not all run on the
requested device fails. TF32 is turned off on CUDA (matmul and cuDNN; the vision tower's patch embedding is a
convolution), so both devices compute in full float32.

Comparison of the two checkpoints (``model.safetensors``):
  * the same tensor names, shapes and dtypes, and the same ``quantization_config``: always required;
  * the decoder layers of each run got their inputs on that run's device only;
  * ``--device cpu``: every tensor bit-identical, every AWQ search the same loss and scales;
  * ``--device cuda``: an element *mismatches* when an int4 code differs (packed weights and zero points are
    unpacked, 8 codes per int32) or a float differs by more than ``atol + rtol * |cpu|`` (rtol 1e-3, atol 1e-6).
    Allowed: at most 3 % mismatching elements over the checkpoint and 10 % in any one tensor
    (``--max-mismatch``, ``--max-tensor-mismatch``). Each AWQ search's best loss must agree within 1e-3
    relative; where the two devices chose different scales at equal loss (a near tie in the grid that float
    noise decided), that mapping's smoothed module and balance layers are left out of the element counts.

  Why these bounds. Weights are the same bits on both devices and elementwise fake quantization rounds the same
  way; only the order of float32 sums differs, so activations, Hessians, QIG scores and AWQ losses agree to
  about 1e-6 relative. That flips a code only where a value lies within that of a rounding boundary, but GPTQ
  feeds each rounding error into the rest of its row and the sequential pipeline feeds layer 0's quantized
  outputs into layer 1, so one flip drags others. Measured on the CPU with this model and 4 samples, by
  scaling the embeddings, norms and vision tower (not the quantized Linears) by 1 + 1e-6 or 1e-5 noise:
  QIG-GPTQ 0.78 % of elements mismatch (worst tensor 3.5 %: one flip in layer 0 spreading through layer 1;
  stock GPTQ: 0.002 %); QIG-AWQ 0 % at 1e-6, and at 1e-5 one AWQ mapping (layer 0 up -> down) tied at best
  losses 4e-6 apart and chose another grid point (its two layers 17-99 % different, the rest 0.01 %). A run that
  quantizes differently is far outside: stock GPTQ against QIG-GPTQ mismatches 15.7 % overall and 12-33 % in
  every packed tensor. The summary prints the measured fractions, so the first GPU runs can tighten the bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
METHODS = {"qig_gptq": "qig_gptq_w4a16", "qig_awq": "qig_awq_w4a16"}
QIG_MODIFIERS = ("QIGGPTQModifier", "QIGAWQModifier")
QIG_NODES = 3
SAMPLES = 4
RTOL, ATOL = 1e-3, 1e-6
MAX_MISMATCH, MAX_TENSOR_MISMATCH = 0.03, 0.10
AWQ_LOSS_RTOL = 1e-3
WORKER_TIMEOUT_S = 300
EXIT_PASS, EXIT_FAIL, EXIT_CANNOT_RUN = 0, 1, 2


# --------------------------------------------------------------------------------------------------------------
# worker: one device, every method, in its own process
# --------------------------------------------------------------------------------------------------------------


def smoke_recipe(name: str) -> str:
    """The shipped recipe ``name`` as YAML, with the QIG node count fixed to ``QIG_NODES``."""
    import yaml

    from qig_plugin.recipes import shipped_recipe

    recipe = yaml.safe_load(shipped_recipe(name).read_text())
    for stage in recipe.values():
        for modifiers in stage.values():
            for modifier_name, modifier_args in modifiers.items():
                if modifier_name in QIG_MODIFIERS:
                    modifier_args.update(qig_steps=QIG_NODES, qig_min_steps=QIG_NODES)
    return yaml.safe_dump(recipe, sort_keys=False)


def record_layer_input_devices(model) -> tuple[str, set[str]]:
    """Pre-forward hooks on the decoder layers that collect the device types of their hidden-state inputs."""
    import torch

    devices: set[str] = set()
    layers = [module for module in model.modules() if type(module).__name__.endswith("DecoderLayer")]
    if not layers:
        raise RuntimeError(f"no decoder layers found in {type(model).__name__}")

    def hook(_module, args, kwargs):
        hidden = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
        devices.add(hidden.device.type if isinstance(hidden, torch.Tensor) else "none")

    for layer in layers:
        layer.register_forward_pre_hook(hook, with_kwargs=True)
    return type(layers[0]).__name__, devices


def record_awq_searches():
    """Wrap stock AWQ's grid search (QIG-AWQ goes through it) to keep each mapping's best loss and scales."""
    from llmcompressor.modifiers.transform.awq import AWQModifier

    searches: list[dict] = []
    real = AWQModifier._compute_best_scale

    def compute_best_scale(self, mapping, *args, **kwargs):
        scales = real(self, mapping, *args, **kwargs)
        best = self._error_metrics[-1]["best_error"] if getattr(self, "_error_metrics", None) else None
        searches.append({"mapping": mapping.smooth_name, "balance": list(mapping.balance_names),
                         "best_error": best, "scales": scales.flatten().tolist()})
        return scales

    AWQModifier._compute_best_scale = compute_best_scale
    return searches


def worker(args: argparse.Namespace) -> int:
    import torch

    if args.device == "cuda":  # full float32 on both devices (the legacy switches exist in every torch >= 2.10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
    if not torch.accelerator.is_available():
        # stock llm-compressor 0.14.0.1 pins cached activations unconditionally, which CPU-only torch refuses
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    from llmcompressor import oneshot
    from llmcompressor.utils.dev import get_main_device
    from transformers import AutoModelForImageTextToText

    import qig_plugin  # noqa: F401  (registers the QIG modifiers)
    from qig_plugin.data import batch_one_collator, build_calibration_dataset, shipped_records
    from qig_plugin.models import load_processor

    main_device = get_main_device().type
    if args.build_model:  # the tiny VLM folder, built here to spare the driver importing transformers
        from tests.tiny_vlm_folder import build_tiny_vlm_folder

        built = build_tiny_vlm_folder(args.model.parent)
        assert built == args.model, (built, args.model)
    if main_device != args.device:
        print(f"llm-compressor would onload layers to {main_device}, not {args.device}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    args.output.mkdir(parents=True, exist_ok=True)
    processor = load_processor(args.model)
    dataset = build_calibration_dataset(shipped_records("calibration")[: args.samples], processor, max_length=256)
    awq_searches = record_awq_searches()
    report = {"device": args.device, "main_device": main_device, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "methods": {}}
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    for method in args.methods:
        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
        layer_class, devices = record_layer_input_devices(model)
        awq_searches.clear()
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        start = time.perf_counter()
        oneshot(
            model=model,
            processor=processor,
            dataset=dataset,
            recipe=smoke_recipe(METHODS[method]),
            num_calibration_samples=len(dataset),
            data_collator=batch_one_collator,
            sequential_targets=[layer_class],
            pipeline="sequential",
            sequential_offload_device="cpu",
        )
        calibration_s = time.perf_counter() - start
        output = args.output / method
        model.save_pretrained(output, save_compressed=True)
        report["methods"][method] = {
            "checkpoint": str(output),
            "calibration_s": round(calibration_s, 2),
            "layer_input_devices": sorted(devices),
            "awq_searches": list(awq_searches),
            "peak_cuda_bytes": torch.cuda.max_memory_allocated() if args.device == "cuda" else None,
        }
        del model
    (args.output / "report.json").write_text(json.dumps(report, indent=2))
    return EXIT_PASS


# --------------------------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------------------------


def load_tensors(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def int4_codes(packed):
    """The 8 unsigned 4-bit codes of each int32 (compressed-tensors' pack-quantized layout)."""
    import torch

    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF


def mismatching(name: str, reference, candidate, exact: bool) -> tuple[int, int]:
    """(mismatching elements, elements) of one tensor; int4-packed tensors count codes."""
    import torch

    if exact:
        if torch.equal(reference, candidate):
            return 0, reference.numel()
        if reference.dtype == torch.int32 and name.endswith(("weight_packed", "zero_point")):
            return int((int4_codes(reference) != int4_codes(candidate)).sum()), reference.numel() * 8
        return int((reference != candidate).sum()), reference.numel()
    if reference.dtype == torch.int32 and name.endswith(("weight_packed", "zero_point")):
        codes_a, codes_b = int4_codes(reference), int4_codes(candidate)
        return int((codes_a != codes_b).sum()), codes_a.numel()
    if not reference.is_floating_point():
        return int((reference != candidate).sum()), reference.numel()
    reference, candidate = reference.double(), candidate.double()
    close = (reference - candidate).abs() <= ATOL + RTOL * reference.abs()
    return int((~close).sum()), reference.numel()


def compare(reference_dir: Path, candidate_dir: Path, exact: bool, max_mismatch: float,
            max_tensor_mismatch: float, exempt: tuple[str, ...] = ()) -> dict:
    """Compare two checkpoints; returns problems (empty: pass) and the measured mismatch fractions.

    :param exempt: module names whose tensors are left out of the element counts (AWQ ties, see ``awq_ties``)
    """
    problems: list[str] = []
    config_a = json.loads((reference_dir / "config.json").read_text()).get("quantization_config")
    config_b = json.loads((candidate_dir / "config.json").read_text()).get("quantization_config")
    if config_a is None or config_a != config_b:
        problems.append("quantization_config missing or different")
    reference, candidate = load_tensors(reference_dir), load_tensors(candidate_dir)
    if reference.keys() != candidate.keys():
        only = sorted(reference.keys() ^ candidate.keys())
        problems.append(f"tensor names differ: {only[:5]}{'...' if len(only) > 5 else ''}")
    total_bad = total = 0
    worst_name, worst = None, 0.0
    for name in sorted(reference.keys() & candidate.keys()):
        a, b = reference[name], candidate[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
            continue
        if name.startswith(tuple(f"{module}." for module in exempt)):
            continue
        bad, count = mismatching(name, a, b, exact)
        total_bad += bad
        total += count
        if count and bad / count > worst:
            worst_name, worst = name, bad / count
    fraction = total_bad / total if total else 0.0
    if exact and total_bad:
        problems.append(f"{total_bad} elements differ (worst {worst_name}: {worst:.2%}); the same device must match "
                        "exactly")
    elif not exact and fraction > max_mismatch:
        problems.append(f"{fraction:.2%} of elements mismatch (at most {max_mismatch:.0%})")
    elif not exact and worst > max_tensor_mismatch:
        problems.append(f"{worst_name}: {worst:.2%} of elements mismatch (at most {max_tensor_mismatch:.0%})")
    packed = sum(name.endswith("weight_packed") for name in reference)
    if not packed:
        problems.append("no packed int4 weights: the checkpoint is not quantized")
    return {"problems": problems, "fraction": fraction, "worst": worst, "worst_name": worst_name,
            "tensors": len(reference), "packed": packed}


def awq_ties(reference: list[dict], candidate: list[dict], exact: bool) -> tuple[list[str], list[str], float]:
    """Check AWQ's grid searches of two runs: (problems, modules of tied searches, worst relative loss difference).

    Each mapping's best loss must agree within ``AWQ_LOSS_RTOL``. Where the two runs chose different scales with
    losses that agree, the grid held a near tie that float noise decided: the smoothed module and its balance
    layers then legitimately differ and are left out of the element comparison. With ``exact``, nothing may differ.
    """
    import torch

    problems: list[str] = []
    tied: list[str] = []
    if [search["mapping"] for search in reference] != [search["mapping"] for search in candidate]:
        return ["AWQ searched different mappings"], tied, float("inf")
    worst = 0.0
    for ours, theirs in zip(reference, candidate):
        loss_a, loss_b = ours["best_error"], theirs["best_error"]
        relative = abs(loss_a - loss_b) / max(abs(loss_a), 1e-30)
        worst = max(worst, relative)
        if relative > (0.0 if exact else AWQ_LOSS_RTOL):
            problems.append(f"AWQ best loss of {ours['mapping']}: {loss_b:.6e} vs cpu {loss_a:.6e}")
            continue
        scales_a, scales_b = torch.tensor(ours["scales"]), torch.tensor(theirs["scales"])
        if not torch.allclose(scales_a, scales_b, rtol=0.0 if exact else RTOL, atol=0.0 if exact else ATOL):
            if exact:
                problems.append(f"AWQ scales of {ours['mapping']} differ")
            else:
                tied.extend([ours["mapping"], *ours["balance"]])
    return problems, tied, worst


# --------------------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------------------


def run_worker(device: str, hide_accelerators: bool, model_dir: Path, output: Path, args,
               build_model: bool) -> tuple[dict | None, str]:
    env = dict(os.environ)
    if hide_accelerators:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), env.get("PYTHONPATH")]))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--device", device, "--model", str(model_dir),
               "--output", str(output), "--samples", str(args.samples), "--methods", *args.methods,
               *(["--build-model"] if build_model else [])]
    start = time.perf_counter()
    try:
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"{device} run timed out after {WORKER_TIMEOUT_S} s"
    if completed.returncode != 0:
        return None, (f"{device} run exited {completed.returncode}:\n" + completed.stderr[-4000:])
    report = json.loads((output / "report.json").read_text())
    report["wall_s"] = round(time.perf_counter() - start, 1)
    return report, ""


def drive(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(f"gpu_smoke CANNOT RUN: torch {torch.__version__} sees no CUDA device (use --device cpu to check "
                  f"the script itself)")
            return EXIT_CANNOT_RUN
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="qig-gpu-smoke-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = workdir / "model" / "tiny-idefics3"  # tests/tiny_vlm_folder.py's name
        reports = {}
        for label, device, hide in (("reference", "cpu", True), ("candidate", args.device, args.device == "cpu")):
            report, error = run_worker(device, hide, model_dir, workdir / label, args,
                                       build_model=label == "reference")
            if report is None:
                print(error, file=sys.stderr)
                print(f"gpu_smoke FAIL: the {label} run on {device} failed ({time.perf_counter() - start:.0f} s)")
                return EXIT_FAIL
            reports[label] = report
        return summarize(args, reports, time.perf_counter() - start)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def summarize(args: argparse.Namespace, reports: dict, elapsed: float) -> int:
    exact = args.device == "cpu"
    reference, candidate = reports["reference"], reports["candidate"]
    failed = False
    parts = []
    for method in args.methods:
        ref, cand = reference["methods"][method], candidate["methods"][method]
        problems, tied, awq_note = [], [], ""
        if ref["awq_searches"] or cand["awq_searches"]:
            problems, tied, worst_loss = awq_ties(ref["awq_searches"], cand["awq_searches"], exact)
            awq_note = f", AWQ best losses within {worst_loss:.1e} rel over {len(ref['awq_searches'])} searches"
            if tied:
                awq_note += f" (near ties, not compared: {', '.join(tied)})"
        result = compare(Path(ref["checkpoint"]), Path(cand["checkpoint"]), exact, args.max_mismatch,
                         args.max_tensor_mismatch, tuple(tied))
        problems += result["problems"]
        for label, run in (("reference", ref), ("candidate", cand)):
            device = reports[label]["device"]
            if run["layer_input_devices"] != [device]:
                problems.append(f"{label} decoder layers got inputs on {run['layer_input_devices']}, not [{device}]")
        peak = f", peak {cand['peak_cuda_bytes'] / 2**20:.0f} MiB" if cand.get("peak_cuda_bytes") else ""
        print(f"[{method}] {result['tensors']} tensors ({result['packed']} packed): mismatch {result['fraction']:.3%} "
              f"(worst {result['worst']:.3%} {result['worst_name'] or ''}){awq_note}; calibration "
              f"{args.device} {cand['calibration_s']:.1f} s{peak} vs cpu {ref['calibration_s']:.1f} s"
              + "".join(f"\n  PROBLEM {problem}" for problem in problems))
        failed |= bool(problems)
        parts.append(f"{method} {args.device} {cand['calibration_s']:.1f}s vs cpu {ref['calibration_s']:.1f}s, "
                     f"{result['fraction']:.2%} mismatch")
    where = candidate.get("gpu", args.device)
    verdict = "FAIL" if failed else "PASS"
    print(f"gpu_smoke {verdict}: {where} vs cpu ({'exact' if exact else 'tolerant'}); " + "; ".join(parts)
          + f"; total {elapsed:.0f}s")
    return EXIT_FAIL if failed else EXIT_PASS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="device of the checked run; the reference always runs on the CPU (default cuda)")
    parser.add_argument("--samples", type=int, default=SAMPLES, help=f"calibration samples (default {SAMPLES})")
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
    parser.add_argument("--max-mismatch", type=float, default=MAX_MISMATCH,
                        help=f"allowed fraction of mismatching elements over a checkpoint (default {MAX_MISMATCH})")
    parser.add_argument("--max-tensor-mismatch", type=float, default=MAX_TENSOR_MISMATCH,
                        help=f"allowed fraction in any one tensor (default {MAX_TENSOR_MISMATCH})")
    parser.add_argument("--workdir", help="keep the model and checkpoints here (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--build-model", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return worker(args) if args.worker else drive(args)


if __name__ == "__main__":
    sys.exit(main())
