"""Peak memory of QIG-GPTQ and stock GPTQ calibrating a model larger than a memory limit, offloaded to disk.

    python benchmarks/offload_memory.py [--layers 32 --hidden 1024 --intermediate 4096 --limit-gib 1.65]

1. Builds a text Llama from a ``LlamaConfig`` with seeded random weights (no hub), whose float32
   weights are larger than the limit, and saves it (20 MB safetensors shards) with the tokenizer of
   the project's real SmolLM2 text model (``build_text_model``).
2. A control process loads that model fully into memory (no limit), runs it on one sample and
   reports its peak RSS.
3. For QIG-GPTQ and stock GPTQ (``qig_plugin/recipes/{qig_,}gptq_w4a16_g128.yaml``), each in a fresh process:
   loads the model with every weight offloaded to disk
   (``compressed_tensors.offload.load_offloaded_model`` + ``from_pretrained(device_map={"": "disk"},
   offload_folder=...)``: every parameter stays a meta tensor backed by a safetensors file, and
   llm-compressor's sequential pipeline reads one decoder layer back at a time), sets the limit,
   runs the real ``oneshot`` through ``qig_plugin.quantize.calibrate`` on 4 samples x 64 tokens of real English
   text (``pydoc_data.topics``), then saves the compressed checkpoint to a temporary folder and
   renames it. Records the RSS before calibration, the peak RSS (``VmHWM``, reset before each
   phase) of calibration and of saving, the peak ``VmData``/``RssAnon``/``RssFile`` (sampled every
   20 ms) and the RSS right after each decoder layer ran.
4. A process without the limit loads each checkpoint back and runs a forward pass.

Writes ``benchmarks/results/offload_memory.json`` and prints a table.

What the limit is: ``RLIMIT_DATA``, the cap on the process's private writable virtual memory
(``VmData``: heap, anonymous ``mmap`` -- every torch CPU tensor -- and private file mappings),
counting the imports too. An allocation past it fails, so during calibration the process can never
hold more tensor bytes than the limit. It is virtual memory, so it over-counts: safetensors 0.8
hands out every tensor read from a file as a view of a private mapping of the *whole file*,
counted in full while the tensor lives (hence the small shards), and pyarrow reserves 1 GiB at
import with its default jemalloc pool (the children run with ``ARROW_DEFAULT_MEMORY_POOL=system``).
That over-count is why the limit is set only after loading: transformers' loader opens, and so
maps, every shard of the checkpoint at once, although a disk-offloaded load reads none of them
(its peak RSS is recorded). It then covers calibration and saving (``--no-limit-save`` lifts it
for saving). The children also fix glibc's mmap threshold at 1 MiB (``MALLOC_MMAP_THRESHOLD_``,
see ``MMAP_THRESHOLD``; ``--glibc-malloc-defaults`` leaves it alone).
"""

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
RECIPES = {"qig_gptq": "qig_gptq_w4a16_g128.yaml", "gptq": "gptq_w4a16_g128.yaml"}
# safetensors 0.8 returns every tensor read from a file as a view of a private mapping of the whole
# file, which VmData (and so RLIMIT_DATA) counts in full while the tensor lives: small shards keep
# that close to the tensor's own size
SHARD_SIZE = "20MB"
# glibc serves allocations below its mmap threshold from the heap, and raises that threshold (up to
# 32 MiB) each time a larger mapped block is freed; the freed 16 MiB temporaries then stay in the heap
# (compressing an offloaded 32-layer model for saving grew RSS to 3.2-3.4 GiB that malloc_trim gave
# back, no tensor alive). A fixed threshold gives every block of 1 MiB or more back when it is freed.
MMAP_THRESHOLD = 1024 * 1024
GIB = 1024**3
MIB = 1024**2


# ---------------------------------------------------------------- memory of this process
def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) * 1024


def rss() -> int:
    return _status_kb("VmRSS")


def peak_rss() -> int:
    return _status_kb("VmHWM")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def limit_memory(limit_bytes: int | None) -> None:
    """Cap this process's private writable virtual memory at ``limit_bytes`` (0: no cap)."""
    limit = limit_bytes or resource.RLIM_INFINITY
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))


class Sampler:
    """Largest ``VmData`` (what ``RLIMIT_DATA`` caps), ``RssAnon`` and ``RssFile`` seen by a thread polling
    ``/proc/self/status`` every 20 ms (``VmHWM`` gives the exact peak of their sum, ``VmRSS``)."""

    FIELDS = ("VmData", "RssAnon", "RssFile")

    def __init__(self):
        self.peak = {field: _status_kb(field) for field in self.FIELDS}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.wait(0.02):
            self._sample()

    def _sample(self):
        for field in self.FIELDS:
            self.peak[field] = max(self.peak[field], _status_kb(field))

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        self._sample()
        return {f"peak_{field}_sampled": value for field, value in self.peak.items()}


def log(message: str) -> None:
    print(f"[offload_memory {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- children
def build(args) -> dict:
    """Save the seeded random Llama and the SmolLM2 tokenizer to ``args.model_dir``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qig_plugin.models.default_model import build_text_model

    tokenizer = AutoTokenizer.from_pretrained(build_text_model())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=args.hidden // 128,
        head_dim=128,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    log(f"building {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}")
    model = LlamaForCausalLM(config).to(torch.float32)
    layer_bytes = [sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in model.model.layers]
    info = {
        "config": {k: getattr(config, k) for k in
                   ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")},
        "parameters": sum(p.numel() for p in model.parameters()),
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "decoder_layer_bytes": max(layer_bytes),
        "embedding_bytes": model.model.embed_tokens.weight.numel() * 4,
    }
    log(f"saving {info['weight_bytes'] / GIB:.2f} GiB of float32 weights to {args.model_dir}")
    model.save_pretrained(args.model_dir, max_shard_size=SHARD_SIZE)
    tokenizer.save_pretrained(args.model_dir)
    info["saved_bytes"] = sum(p.stat().st_size for p in Path(args.model_dir).glob("*.safetensors"))
    return info


def calibration_dataset(tokenizer, samples: int, seq: int):
    """``samples`` consecutive ``seq``-token windows of the Python docs' topics (real English text)."""
    from datasets import Dataset
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer(text[: 200 * samples * seq])["input_ids"]
    rows = [ids[i * seq:(i + 1) * seq] for i in range(samples)]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seq for _ in rows]})


def calibrate_offloaded(args) -> dict:
    """Load with every weight on disk, run oneshot under the limit, save the compressed checkpoint; record memory."""
    import torch
    from compressed_tensors.offload import load_offloaded_model
    from compressed_tensors.offload.cache import DiskCache, OffloadCache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qig_plugin.quantize import calibrate
    from qig_plugin.recipes import shipped_recipe

    result = {"rss_after_imports": rss()}
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    dataset = calibration_dataset(tokenizer, args.samples, args.seq)
    offload_dir = Path(args.work_dir) / f"offload_{args.method}"
    shutil.rmtree(offload_dir, ignore_errors=True)
    log(f"{args.method}: loading with every weight offloaded to {offload_dir}")
    with load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(
            args.model_dir, dtype=torch.float32, device_map={"": "disk"}, offload_folder=str(offload_dir)
        )
    with OffloadCache.disable_onloading():
        params = list(model.parameters())
        result["parameters_on_meta"] = sum(p.is_meta for p in params)
        result["parameters"] = len(params)
    result["disk_offloaded_modules"] = sum(isinstance(m._parameters, DiskCache) for m in model.modules())
    result["peak_rss_loading"] = peak_rss()
    result["vm_data_after_loading"] = _status_kb("VmData")
    limit_memory(args.limit_bytes)  # transformers maps every checkpoint shard while loading: see the docstring

    per_layer: dict[int, int] = {}  # decoder layer -> the largest RSS seen right after it ran
    per_layer_anon: dict[int, int] = {}  # ... and the largest anonymous RSS

    def after(index, _module, _args, _output):
        if index not in per_layer:
            log(f"{args.method}: layer {index} calibrating, RSS {rss() / GIB:.2f} GiB")
        per_layer[index] = max(per_layer.get(index, 0), rss())
        per_layer_anon[index] = max(per_layer_anon.get(index, 0), _status_kb("RssAnon"))

    for index, layer in enumerate(model.model.layers):
        layer.register_forward_hook(partial(after, index))

    result["rss_before_calibration"] = rss()
    sampler = Sampler()
    reset_peak_rss()
    log(f"{args.method}: calibrating (RSS {rss() / GIB:.2f} GiB, limit {args.limit_bytes / GIB:.2f} GiB)")
    start = time.perf_counter()
    calibrate(model, tokenizer, shipped_recipe(RECIPES[args.method]), dataset,
              sequential_targets=["LlamaDecoderLayer"])
    result["calibration_s"] = time.perf_counter() - start
    result["peak_rss_calibration"] = peak_rss()
    result["rss_after_each_layer"] = [per_layer[i] for i in sorted(per_layer)]
    result["anon_rss_after_each_layer"] = [per_layer_anon[i] for i in sorted(per_layer_anon)]
    result["calibration"] = sampler.stop()
    sampler = Sampler()

    output_dir = Path(args.work_dir) / f"checkpoint_{args.method}"
    shutil.rmtree(output_dir, ignore_errors=True)
    if not args.limit_save:
        limit_memory(0)
    result["save_under_limit"] = bool(args.limit_save and args.limit_bytes)
    reset_peak_rss()
    log(f"{args.method}: saving the compressed checkpoint")
    start = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".partial", dir=output_dir.parent))
    model.save_pretrained(staging, save_compressed=True, max_shard_size=SHARD_SIZE)
    tokenizer.save_pretrained(staging)
    staging.rename(output_dir)
    result["save_s"] = time.perf_counter() - start
    result["peak_rss_save"] = peak_rss()
    result["checkpoint_bytes"] = sum(p.stat().st_size for p in output_dir.rglob("*") if p.is_file())
    result["offload_folder_files"] = len(list(offload_dir.iterdir()))
    result["peak_rss"] = max(result["peak_rss_calibration"], result["peak_rss_save"])
    result["save"] = sampler.stop()
    return result


def load_in_memory(args) -> dict:
    """Control: load the same model fully into memory (no limit), run it on one sample, report the peak RSS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log("control: the whole model in memory (no limit), one forward pass")
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    sample = calibration_dataset(AutoTokenizer.from_pretrained(args.model_dir), 1, args.seq)[0]
    with torch.no_grad():
        model(torch.tensor([sample["input_ids"]]))
    return {"peak_rss": peak_rss(), "rss_anon": _status_kb("RssAnon"), "rss_file": _status_kb("RssFile"),
            "parameters": sum(p.numel() for p in model.parameters())}


def load_back(args) -> dict:
    """Load a checkpoint written by an offloaded run (no limit) and run one forward pass."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = Path(args.work_dir) / f"checkpoint_{args.method}"
    log(f"{args.method}: loading the checkpoint back from {checkpoint}")
    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    names = {name for name, _ in model.named_parameters()}
    return {
        "format": config.get("format"),
        "num_bits": config["config_groups"]["group_0"]["weights"]["num_bits"],
        "logits_finite": bool(torch.isfinite(logits).all()),
        "quantized_linears": sum(
            getattr(m, "quantization_scheme", None) is not None for m in model.modules()
        ),
        "has_weight_scales": any(name.endswith("weight_scale") for name in names),
    }


CHILDREN = {"build": build, "calibrate": calibrate_offloaded, "control": load_in_memory, "load_back": load_back}


def run_child(step: str, args, method: str = "", limit_bytes: int = 0) -> dict:
    """Run one step in a fresh process; return its JSON result plus the kernel's ru_maxrss for it."""
    result_file = Path(args.work_dir) / f"{step}_{method or 'model'}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", step, "--method", method,
               "--limit-bytes", str(limit_bytes), "--work-dir", str(args.work_dir),
               "--result-file", str(result_file), "--limit-save" if args.limit_save else "--no-limit-save",
               *[f"--{k}={getattr(args, k)}" for k in ("layers", "hidden", "intermediate", "samples", "seq")]]
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system", "PYTHONPATH": str(REPO_ROOT)}
    if not args.glibc_malloc_defaults:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=REPO_ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    result.update(returncode=process.returncode, wall_s=wall, ru_maxrss=usage.ru_maxrss * 1024)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--limit-gib", type=float, default=1.65,
                        help="RLIMIT_DATA of the calibration processes (0: no limit)")
    parser.add_argument("--limit-save", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the limit while saving the checkpoint (default) or lift it")
    parser.add_argument("--glibc-malloc-defaults", action="store_true",
                        help=f"do not fix glibc's mmap threshold at {MMAP_THRESHOLD} bytes in the children")
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--output", type=Path, default=RESULTS / "offload_memory.json")
    parser.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--method", default="", help=argparse.SUPPRESS)
    parser.add_argument("--limit-bytes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        args.model_dir = str(Path(args.work_dir) / "model")
        result = CHILDREN[args.child](args)
        args.result_file.write_text(json.dumps(result))
        return

    owns_work_dir = args.work_dir is None
    args.work_dir_given = not owns_work_dir
    args.work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="qig_offload_memory_"))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    limit = int(args.limit_gib * GIB)
    started = time.perf_counter()
    try:
        log(f"scratch folder {args.work_dir}")
        built = args.work_dir / "model_info.json"
        if args.work_dir_given and built.exists() and (args.work_dir / "model" / "config.json").exists():
            model = json.loads(built.read_text())  # reuse the model of an earlier run in --work-dir
            log(f"reusing the model in {args.work_dir / 'model'}")
        else:
            model = run_child("build", args)
            built.write_text(json.dumps(model))
        if model["returncode"] != 0:
            raise SystemExit("building the model failed")
        if limit and model["weight_bytes"] <= limit:
            raise SystemExit(f"the model ({model['weight_bytes'] / GIB:.2f} GiB) is not larger than the limit")
        control = run_child("control", args)
        log(f"control (whole model in memory): peak RSS {control.get('peak_rss', 0) / GIB:.2f} GiB")
        runs = {}
        for method in args.methods:
            runs[method] = run_child("calibrate", args, method, limit_bytes=limit)
            if runs[method]["returncode"] != 0:
                log(f"{method}: calibration process failed (rc {runs[method]['returncode']})")
                continue
            runs[method]["load_back"] = run_child("load_back", args, method)
    finally:
        if owns_work_dir:
            shutil.rmtree(args.work_dir, ignore_errors=True)

    layer = model["decoder_layer_bytes"]
    for run in runs.values():
        if "peak_rss" in run:
            run["peak_rss_over_model_bytes"] = run["peak_rss"] / model["weight_bytes"]
            run["peak_rss_calibration_minus_baseline_in_layers"] = (
                run["peak_rss_calibration"] - run["rss_before_calibration"]) / layer
            run["peak_rss_save_minus_baseline_in_layers"] = (run["peak_rss_save"] - run["rss_before_calibration"]) / layer
    import torch

    report = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "calibration": {"samples": args.samples, "tokens_per_sample": args.seq, "scheme": "W4A16 int4 sym group 128",
                        "text": "pydoc_data.topics", "pipeline": "sequential, LlamaDecoderLayer"},
        "allocator": "glibc defaults" if args.glibc_malloc_defaults else f"glibc, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}",
        "limit": {"kind": "RLIMIT_DATA (private writable virtual memory, VmData)", "bytes": limit,
                  "covers": "set after loading; calibration" + (" and saving" if args.limit_save else " (lifted for saving)")},
        "notes": [
            "rss_* and peak_rss_* are bytes from /proc/self/status (VmRSS, VmHWM reset before each phase); "
            "ru_maxrss of a calibrate child is therefore the peak of its last phase (saving)",
            "peak_*_sampled: largest value polled every 20 ms; RssFile counts file-backed pages of the "
            "safetensors mappings (clean, reclaimable), RssAnon everything else",
            "decoder_layer_bytes: float32 parameters of one decoder layer",
        ],
        "wall_s": time.perf_counter() - started,
        "model": model,
        "control_in_memory_load": control,
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")

    print()
    print(f"model: {model['parameters'] / 1e6:.0f}M parameters, float32 weights {model['weight_bytes'] / GIB:.2f} GiB; "
          f"decoder layer {layer / MIB:.0f} MiB; embedding {model['embedding_bytes'] / MIB:.0f} MiB")
    print(f"limit: RLIMIT_DATA {limit / GIB:.2f} GiB during calibration; the whole model loaded in memory "
          f"(control, no limit): peak RSS {control.get('peak_rss', 0) / GIB:.2f} GiB")
    header = ("method", "rc", "calib s", "base GiB", "peak RSS calib", "peak VmData calib", "peak RSS save",
              "peak/model", "(calib-base)/layer", "checkpoint", "loads back")
    print(" | ".join(header))
    for method, run in runs.items():
        if "peak_rss" not in run:
            print(f"{method} | {run['returncode']} | failed")
            continue
        back = run.get("load_back", {})
        print(" | ".join([
            method, str(run["returncode"]), f"{run['calibration_s']:.0f}",
            f"{run['rss_before_calibration'] / GIB:.2f}", f"{run['peak_rss_calibration'] / GIB:.2f}",
            f"{run['calibration']['peak_VmData_sampled'] / GIB:.2f}", f"{run['peak_rss_save'] / GIB:.2f}", f"{run['peak_rss_over_model_bytes']:.2f}",
            f"{run['peak_rss_calibration_minus_baseline_in_layers']:.2f}",
            f"{run['checkpoint_bytes'] / MIB:.0f} MiB",
            "yes" if back.get("returncode") == 0 and back.get("logits_finite") else "NO",
        ]))
        print(f"  RSS after each layer (GiB): {[round(v / GIB, 2) for v in run['rss_after_each_layer']]}")
        print(f"  anonymous RSS after each layer (GiB): {[round(v / GIB, 2) for v in run['anon_rss_after_each_layer']]}")
    print(f"whole benchmark {report['wall_s'] / 60:.1f} min; wrote {args.output}")


if __name__ == "__main__":
    main()
