"""qig: quantize a vision-language model or a text-only LLM with QIG, picture its token weights, plan per-layer
widths under a bits budget, measure how close the result stays to the original, serve it.

Exit codes: 0 done; 1 the work failed (see the message); 2 bad usage or bad input, nothing written.
Inputs are checked before any model is loaded or any file is written.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasets import Dataset

    from qig_plugin.data import CalibrationRecord

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2

SCHEMES = ("W4A16", "W3A16", "W4A8", "W8A8")
METHODS = {"qig-gptq": "qig_gptq", "gptq": "gptq"}
QUANTIZING_MODIFIERS = {"qig-gptq": "QIGGPTQModifier", "gptq": "GPTQModifier"}
DEFAULT_SAMPLES = 16
LOAD_DTYPE_BYTES = 4  # models are loaded, calibrated and saved in float32
QUANTIZE_LOG = "qig-quantize.log"  # llm-compressor's log lines of the run, in the checkpoint folder
SERVE_KV_CACHE_GIB = "2"  # `qig serve`'s VLLM_CPU_KVCACHE_SPACE unless the environment sets it

QUANTIZE_EXAMPLES = """examples:
  qig quantize ~/.cache/qig-plugin/smolvlm-smollm2-135m-easy-vqa --scheme W8A8 --output out/w8a8
  qig quantize ~/.cache/qig-plugin/smollm2-135m-instruct --scheme W8A8 --output out/text-w8a8   # a text-only LLM
  qig quantize MODEL --scheme W4A16 --method gptq --samples 32 --output out/gptq-w4a16
  qig quantize MODEL --recipe qig_gptq_w4a8 --data my_records.jsonl --output out/w4a8
  qig quantize MODEL --recipe my_recipe.yaml --output out/custom
  qig quantize MODEL --scheme W3A16 --allow-unservable --output out/w3a16   # for a GPU server

--scheme picks the shipped recipe <method>_<scheme>, the group-128 (_g128) variant when the
model's width is a multiple of 128. --recipe takes a YAML file or a shipped recipe's name
(qig_plugin/recipes/). --data takes a .json list or .jsonl of
{"image": "photo.jpg" | null, "prompt": "...", "answer": "..."} records (image paths relative to
the file), or a datasets folder (save_to_disk) of such columns or of tokenized rows. A text-only LLM
(a config without vision_config: Llama, Qwen2/3, Qwen3-MoE, ...) takes records without images and is
calibrated on the shipped text records when --data is not given.

Before the model is loaded, every input is checked and the --output location is proven writable, with
room on its disk for the checkpoint (estimated from the parameter count and the scheme).
"""

EXPLAIN_EXAMPLES = """examples:
  qig explain MODEL --image photo.jpg --prompt "What is in this picture?" --output weights.png
  qig explain MODEL --image photo.jpg --prompt "Caption it." --answer "A cat." --layers 0 29 --scheme W8A8

The picture shows, per chosen layer, the weights of the attention (q/k/v) and MLP (gate/up) groups
over the image patches and the text tokens, and for every layer how the weight mass splits between
vision, prompt and answer tokens.
"""

SERVE_EXAMPLES = """examples:
  qig serve out/w8a8                          # http://127.0.0.1:8000/v1 (OpenAI-compatible)
  qig serve out/w8a8 --port 9000 -- --max-model-len 2048   # after --: options for vLLM's api_server

Runs in the serve environment ($QIG_SERVE_PYTHON, default .venvs/serve/bin/python).
"""

EVAL_EXAMPLES = """examples:
  qig eval out/w8a8 --reference MODEL                  # the shipped held-out records and text
  qig eval out/w8a8 --reference MODEL --data my_records.jsonl notes.txt --output eval/w8a8.json
  qig eval out/text-w8a8 --reference ~/.cache/qig-plugin/smollm2-135m-instruct --max-samples 8

Scores the checkpoint against its full-precision parent on held-out data, one sample at a time through
both models: KL(ref || q) of the next-token distributions, top-1 agreement, perplexity on text, and on
records with answers the KL over the answer and the exact match of the greedy answer (task accuracy,
beside the reference's), each with a bootstrap 95% interval over samples. --data takes .txt files (text
for perplexity, cut into 256-token passages), .json/.jsonl records as for `qig quantize --data`, or a
datasets folder; without it: the shipped held-out records and 16 documentation passages no shipped
record uses. Writes the table to the console, the numbers to --output (.json) and a plot beside it (.png).
Both models are held in memory, in float32.
"""

PLAN_BITS_EXAMPLES = """examples:
  qig plan-bits MODEL --bits 3.5 --output mixed.yaml                 # QIG sensitivity, widths 2 3 4
  qig plan-bits MODEL --bits 3 --sensitivity entropy --output luq.yaml   # LUQ's activation-entropy criterion
  qig plan-bits MODEL --bits 8 --widths 4 16 --output cpu.yaml       # int4 or unquantized: a CPU's vLLM serves it
  qig quantize MODEL --recipe mixed.yaml --allow-unservable --output out/mixed

Splits the language model's linears into units that share a width (q/k/v and gate/up, which vLLM fuses;
o_proj and down_proj alone), measures each unit's sensitivity at every width on the calibration samples
(--data as for `qig quantize`), and gives the least sensitive units the fewest bits until the average
weight bits per weight is at most --bits (scales not counted). Width 16 keeps a unit unquantized. Writes a
recipe (one config group per width) for `qig quantize --recipe` or llm-compressor's oneshot.
"""

GENERATE_EXAMPLES = """examples:
  qig generate out/w8a8 --image photo.jpg --prompt "Describe this image." --max-tokens 32
  qig generate out/w8a8 --prompt "What is the capital of France?"
  qig generate out/text-w8a8 --prompt "What is the capital of France?"   # a text-only checkpoint: no --image
"""


def _model_reference(reference: str, trust_remote_code: bool) -> Path:
    """A checked local model folder: ``reference`` itself, or for a hub id (``ORG/NAME``, no such local path) its
    folder in the Hugging Face cache, downloaded there if needed (as ``from_pretrained`` does)."""
    from qig_plugin.validation import check_model_folder, is_hub_id, resolve_hub_model

    if is_hub_id(reference):
        model_dir = resolve_hub_model(reference, trust_remote_code=trust_remote_code)
    else:
        model_dir = Path(reference).expanduser()
    check_model_folder(model_dir, trust_remote_code=trust_remote_code)
    return model_dir


def _shown(argument: str, folder: Path) -> str:
    """How a model is named in messages: as given, with its cache folder for a hub id."""
    return argument if Path(argument).expanduser() == folder else f"{argument} ({folder})"


def _model_config(model: Path, trust_remote_code: bool) -> dict:
    from qig_plugin.validation import read_config

    return read_config(model)


def _recipe_path(args: argparse.Namespace, config: dict) -> Path:
    """``--recipe`` (a YAML file or a shipped recipe's name), or the shipped recipe for ``--scheme`` and
    ``--method`` at the model's width."""
    from qig_plugin.validation import resolve_recipe, text_hidden_size

    if args.recipe is not None:
        return resolve_recipe(args.recipe)
    from qig_plugin.recipes import shipped_recipe

    suffix = "_g128" if args.scheme != "W8A8" and text_hidden_size(config) % 128 == 0 else ""
    return shipped_recipe(f"{METHODS[args.method]}_{args.scheme.lower()}{suffix}")


def _load_processor(model: Path, config: dict, trust_remote_code: bool):
    """The model's processor: a VLM's (image processor and tokenizer), or a text-only LLM's tokenizer."""
    from qig_plugin.loading import auto_processor

    return auto_processor(model, config, trust_remote_code=trust_remote_code)


def _load_model(model: str | Path, config: dict, trust_remote_code: bool):
    """The model in float32, in eval mode: a VLM as ImageTextToText, a text-only LLM as CausalLM.

    Only safetensors weights are read.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from qig_plugin.validation import is_vision_language

    model_class = AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM
    loaded = model_class.from_pretrained(
        model, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return loaded.eval()


def _load_model_and_processor(model: str | Path, config: dict, trust_remote_code: bool):
    """The model in float32 and its processor (see :func:`_load_model` and :func:`_load_processor`)."""
    return _load_model(model, config, trust_remote_code), _load_processor(model, config, trust_remote_code)


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


@dataclass
class QuantizeInputs:
    """Everything ``qig quantize`` checked before loading the model."""

    model: Path  # a checked local folder (a hub id's in the Hugging Face cache)
    config: dict  # its config.json
    recipe: Path
    scheme: str  # e.g. "W8A8"
    calibration: list[CalibrationRecord] | Dataset  # records to tokenize, or tokenized rows (all, before --samples)
    data_name: str  # where the calibration data comes from, for messages


def check_quantize_inputs(args: argparse.Namespace) -> QuantizeInputs:
    """The validation pass of ``qig quantize``: every input, before any model is loaded or any file written.

    The model folder (a hub id's in the Hugging Face cache, downloaded there if needed), the recipe (parsed; its
    weight groups divide the linears' widths read from the safetensors headers), the scheme's servability, the
    output location (writable, not the model folder, room on its disk for the checkpoint) and the calibration data
    (images decoded, fitting the model: no images for a text-only LLM).
    """
    from qig_plugin.serving import cpu_serving_support
    from qig_plugin.validation import (
        InputError,
        check_checkpoint_output,
        check_free_space,
        check_group_divisibility,
        check_servable,
        checkpoint_size,
        is_vision_language,
        load_recipe_modifiers,
        recipe_quantized_weights,
        recipe_scheme,
        safetensors_shapes,
    )

    model = _model_reference(args.model, args.trust_remote_code)
    config = _model_config(model, args.trust_remote_code)
    vision_language = is_vision_language(config)
    recipe = _recipe_path(args, config)
    modifiers = load_recipe_modifiers(recipe)
    scheme = recipe_scheme(modifiers)
    if not args.allow_unservable:
        check_servable(scheme, cpu_serving_support())
    if args.output.resolve() == model.resolve():
        raise InputError(f"--output {args.output} is the model folder; choose another folder for the checkpoint")
    check_checkpoint_output(args.output, overwrite=args.overwrite)
    shapes, weights = safetensors_shapes(model), recipe_quantized_weights(modifiers)
    check_group_divisibility(shapes, weights, f"recipe {recipe.name}")
    check_free_space(args.output, checkpoint_size(shapes, weights, LOAD_DTYPE_BYTES), scheme)

    calibration, data_name = _calibration_source(args, vision_language)
    return QuantizeInputs(model, config, recipe, scheme, calibration, data_name)


def _calibration_source(args: argparse.Namespace, vision_language: bool) -> tuple[list[CalibrationRecord] | Dataset, str]:
    """The calibration records or tokenized rows of ``--data`` (default: the shipped set), checked against the
    model's kind, and their name for messages."""
    from qig_plugin.validation import check_records_fit_model, check_tokenized_fits_model, load_calibration_source

    data_name = str(args.data) if args.data is not None else "the shipped set"
    if args.data is not None:
        calibration = load_calibration_source(args.data)
    else:
        from qig_plugin.data import shipped_records, shipped_text_records

        calibration = (shipped_records if vision_language else shipped_text_records)("calibration")
    if isinstance(calibration, list):
        check_records_fit_model(calibration, data_name, vision_language=vision_language)
    else:
        check_tokenized_fits_model(calibration, data_name, vision_language=vision_language)
    return calibration, data_name


def _calibration_dataset(source: list[CalibrationRecord] | Dataset, data_name: str, processor,
                         args: argparse.Namespace) -> Dataset:
    """The first ``--samples`` calibration samples, tokenized (records up to ``--max-length`` tokens) and checked."""
    from qig_plugin.data import build_calibration_dataset
    from qig_plugin.validation import InputError, check_tokenized_dataset

    if isinstance(source, list):
        print(f"[qig] calibration: {min(args.samples, len(source))} of {len(source)} records from {data_name}",
              flush=True)
        try:
            dataset = build_calibration_dataset(source[: args.samples], processor, max_length=args.max_length)
        except ValueError as error:
            raise InputError(f"calibration set {data_name}: {error}") from error
    else:
        dataset = source.select(range(min(args.samples, len(source))))
    check_tokenized_dataset(dataset, data_name)
    return dataset


def quantize_command(args: argparse.Namespace) -> int:
    """:func:`_quantize` with llm-compressor's log lines in a log (see ``qig_plugin.console``) that ends up in the
    checkpoint as ``QUANTIZE_LOG``. A run that fails after the model load (not for bad input) keeps the log in the
    temporary folder and names it."""
    from qig_plugin.console import captured_logs
    from qig_plugin.validation import InputError

    with captured_logs("qig-quantize", verbose=args.verbose) as log:
        try:
            return _quantize(args, log)
        except InputError:
            raise
        except BaseException:
            if log.work_started and log.path is not None:
                log.keep = True
                print(f"[qig] the run's log: {log.path}", file=sys.stderr)
            raise


def _quantize(args: argparse.Namespace, log) -> int:
    """Check every input, load the tokenizer or processor and tokenize, load the model, calibrate, write the
    checkpoint with ``log`` in it, print a summary."""
    with log.imports():  # validation imports llm-compressor (to parse the recipe)
        inputs = check_quantize_inputs(args)
        from transformers import set_seed

        from qig_plugin.quantize import quantize_to_checkpoint

    model, recipe, scheme = inputs.model, inputs.recipe, inputs.scheme
    print(f"[qig] model {_shown(args.model, model)}\n[qig] recipe {recipe} ({scheme})", flush=True)
    start = time.perf_counter()
    processor = _load_processor(model, inputs.config, args.trust_remote_code)
    dataset = _calibration_dataset(inputs.calibration, inputs.data_name, processor, args)
    log.work_started = True
    loaded = _load_model(model, inputs.config, args.trust_remote_code)

    set_seed(args.seed)
    report = quantize_to_checkpoint(loaded, processor, recipe, dataset, args.output, overwrite=args.overwrite,
                                    extra_files={QUANTIZE_LOG: log.text})
    size_before = f"{_folder_bytes(model) / 1e6:.0f} MB"
    (report.output_dir / QUANTIZE_LOG).write_text(log.text())  # with the lines logged after the save
    print(
        f"\n[qig] wrote {report.output_dir}\n"
        f"  scheme       {scheme} ({recipe.name})\n"
        f"  samples      {len(dataset)}\n"
        f"  weights      {size_before} -> {_folder_bytes(report.output_dir) / 1e6:.0f} MB\n"
        f"  time         {time.perf_counter() - start:.1f} s (calibration {report.calibration_s:.1f} s, "
        f"save {report.save_s:.1f} s)\n"
        f"  log          {report.output_dir / QUANTIZE_LOG} ({log.describe()}; --verbose prints it)\n"
        f"  serve it     qig serve {report.output_dir}"
    )
    return EXIT_OK


def explain_command(args: argparse.Namespace) -> int:
    """Check the inputs, compute one sample's QIG token weights, write the PNG."""
    from qig_plugin.validation import (
        InputError,
        check_output_folder,
        is_vision_language,
        load_image,
        load_recipe_modifiers,
    )

    model = _model_reference(args.model, args.trust_remote_code)
    config = _model_config(model, args.trust_remote_code)
    if not is_vision_language(config):
        raise InputError(
            f"{args.model} is a text-only model, and qig explain pictures the weights of an image and its text; "
            "pass a vision-language model (its config.json has a vision_config)"
        )
    modifiers = load_recipe_modifiers(_recipe_path(args, config))
    image = load_image(args.image, "--image")
    if args.output.suffix.lower() != ".png":
        raise InputError(f"--output {args.output} must end in .png")
    check_output_folder(args.output, overwrite=args.overwrite)

    from qig_plugin.data import CalibrationRecord
    from qig_plugin.explain import explain_sample, plot_explanation, recipe_quantization
    from qig_plugin.modifiers.language_model import decoder_layers

    try:
        quantization, _ = recipe_quantization(modifiers)
    except ValueError as error:
        raise InputError(f"--recipe: {error}") from error
    weight_bits = next(s.weights.num_bits for s in quantization.config_groups.values() if s.weights is not None)

    loaded, processor = _load_model_and_processor(model, config, args.trust_remote_code)
    num_layers = len(decoder_layers(loaded)[1])
    layers = args.layers if args.layers is not None else sorted({0, num_layers // 2, num_layers - 1})
    bad_layers = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad_layers:
        raise InputError(f"--layers {bad_layers} out of range: the model has decoder layers 0..{num_layers - 1}")

    start = time.perf_counter()
    explanation = explain_sample(loaded, processor, CalibrationRecord(image, args.prompt, args.answer), modifiers)
    title = f"QIG token weights, {Path(args.model).name}, W{weight_bits} grid: {args.prompt!r}"
    plot_explanation(explanation, layers, args.output, title)
    print(f"[qig] wrote {args.output} ({len(explanation.tokens)} tokens, {num_layers} layers, "
          f"{time.perf_counter() - start:.1f} s)")
    for layer in layers:
        for group_name in ("attention", "mlp"):
            if (layer, group_name) not in explanation.weights:
                continue
            mass = explanation.mass_by_role(layer, group_name)
            print(f"  layer {layer:3d} {group_name:9s} " + "  ".join(f"{role} {share:5.1%}" for role, share in mass.items()))
    return EXIT_OK


@dataclass
class EvalInputs:
    """Everything ``qig eval`` checked before loading the models."""

    checkpoint: Path
    checkpoint_config: dict
    reference: Path  # a checked local folder (a hub id's in the Hugging Face cache)
    reference_config: dict
    sources: list[tuple[Path, object]]  # --data: (path, text | records | tokenized Dataset)
    plot: Path


def check_eval_inputs(args: argparse.Namespace) -> EvalInputs:
    """The validation pass of ``qig eval``, before any model is loaded or any file written: a quantized checkpoint,
    an unquantized reference of the same architecture and vocabulary size, readable data that fits the model,
    writable --output (.json) and plot (.png) paths."""
    from qig_plugin.validation import (
        InputError,
        check_checkpoint_folder,
        check_eval_pair,
        check_output_folder,
        check_records_fit_model,
        check_tokenized_fits_model,
        is_vision_language,
        load_eval_source,
    )

    checkpoint = args.checkpoint
    checkpoint_config = check_checkpoint_folder(checkpoint)
    reference = _model_reference(args.reference, args.trust_remote_code)
    reference_config = _model_config(reference, args.trust_remote_code)
    check_eval_pair(checkpoint, checkpoint_config, reference, reference_config)
    if args.output.suffix.lower() != ".json":
        raise InputError(f"--output {args.output} must end in .json (the plot goes beside it, as .png)")
    plot = args.output.with_suffix(".png")
    check_output_folder(args.output, overwrite=args.overwrite)
    check_output_folder(plot, overwrite=args.overwrite)
    vision_language = is_vision_language(reference_config)
    sources = []
    for path in args.data or []:
        source = load_eval_source(path)
        if isinstance(source, list):
            check_records_fit_model(source, str(path), vision_language=vision_language)
        elif not isinstance(source, str):
            check_tokenized_fits_model(source, str(path), vision_language=vision_language)
        sources.append((path, source))
    return EvalInputs(checkpoint, checkpoint_config, reference, reference_config, sources, plot)


def _eval_sets(inputs: EvalInputs, processor, max_samples: int | None) -> list:
    """The evaluation sets: each --data source, or the shipped held-out records and documentation passages."""
    from qig_plugin.evaluation import heldout_text_passages, records_set, text_passages, text_set, tokenized_set
    from qig_plugin.validation import InputError, check_token_ids_fit, is_vision_language, vocab_size

    tokenizer = getattr(processor, "tokenizer", processor)
    limit = slice(0, max_samples)
    if not inputs.sources:
        from qig_plugin.data import shipped_records, shipped_text_records

        vision_language = is_vision_language(inputs.reference_config)
        records = (shipped_records if vision_language else shipped_text_records)("heldout")[limit]
        return [records_set("held-out records", records, processor),
                text_set("held-out text", heldout_text_passages(tokenizer)[limit])]
    sets = []
    for path, source in inputs.sources:
        if isinstance(source, str):
            sets.append(text_set(path.name, text_passages(source, tokenizer)[limit]))
        elif isinstance(source, list):
            try:
                sets.append(records_set(path.name, source[limit], processor))
            except ValueError as error:
                raise InputError(f"--data {path}: {error}") from error
        else:
            dataset = source.select(range(min(len(source), max_samples or len(source))))
            check_token_ids_fit(dataset, str(path), vocab_size(inputs.reference_config))
            sets.append(tokenized_set(path.name, dataset))
    return sets


def eval_command(args: argparse.Namespace) -> int:
    """Check the inputs, score the checkpoint against its reference on held-out data, print the table, write the
    JSON and the plot."""
    inputs = check_eval_inputs(args)

    from transformers import AutoTokenizer

    from qig_plugin.evaluation import evaluate, format_table, plot_summary, summarize, to_json
    from qig_plugin.validation import TOKENIZER_FILES, check_same_tokenizer, checkpoint_scheme

    checkpoint, reference = inputs.checkpoint, inputs.reference
    scheme = checkpoint_scheme(inputs.checkpoint_config)
    print(f"[qig] checkpoint {checkpoint} ({scheme})\n[qig] reference  {_shown(args.reference, reference)}", flush=True)
    start = time.perf_counter()
    processor = _load_processor(reference, inputs.reference_config, args.trust_remote_code)
    if any((checkpoint / name).is_file() for name in TOKENIZER_FILES):
        check_same_tokenizer(AutoTokenizer.from_pretrained(checkpoint), getattr(processor, "tokenizer", processor),
                             checkpoint, reference)
    sets = _eval_sets(inputs, processor, args.max_samples)
    reference_model = _load_model(reference, inputs.reference_config, args.trust_remote_code)
    quantized_model = _load_model(checkpoint, inputs.checkpoint_config, args.trust_remote_code)
    per_sample = evaluate(reference_model, quantized_model, sets, progress=True)
    kinds = {eval_set.name: eval_set.kind for eval_set in sets}
    summaries = {name: summarize(values, kinds[name]) for name, values in per_sample.items()}
    header = {"checkpoint": str(checkpoint), "reference": args.reference, "scheme": scheme}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(to_json(header, per_sample, summaries, kinds))
    plot_summary(per_sample, summaries, f"{checkpoint.name} ({scheme}) vs {Path(args.reference).name}", inputs.plot)
    print(f"\n{format_table(summaries, kinds)}\n\n[qig] wrote {args.output} and {inputs.plot} "
          f"({time.perf_counter() - start:.1f} s)")
    return EXIT_OK


def serve_command(args: argparse.Namespace) -> int:
    """vLLM's OpenAI-compatible server in the serve environment, in the foreground; its exit code is returned.

    Started as ``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` console script of
    vllm-cpu fails (it looks up the distribution ``vllm``, which vllm-cpu is not named). vLLM-CPU's KV cache
    takes ``VLLM_CPU_KVCACHE_SPACE`` GiB: ``SERVE_KV_CACHE_GIB`` unless the environment sets it (vLLM's own
    default reserves more memory than a small machine has).
    """
    import os
    import subprocess

    from qig_plugin.serve_env import serve_python
    from qig_plugin.validation import check_checkpoint_folder

    checkpoint = args.checkpoint
    check_checkpoint_folder(checkpoint)
    command = [str(serve_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
               "--host", args.host, "--port", str(args.port), *args.vllm_args]
    environment = {"VLLM_CPU_KVCACHE_SPACE": SERVE_KV_CACHE_GIB, **os.environ}
    print(f"[qig] serving {checkpoint} at http://{args.host}:{args.port}/v1 (Ctrl-C stops; KV cache "
          f"{environment['VLLM_CPU_KVCACHE_SPACE']} GiB, VLLM_CPU_KVCACHE_SPACE)", flush=True)
    return EXIT_OK if subprocess.call(command, env=environment) == 0 else EXIT_FAILURE


def generate_command(args: argparse.Namespace) -> int:
    """Offline greedy generation with vLLM in the serve environment (with ``--image`` only for a VLM checkpoint)."""
    from qig_plugin.serve_env import run_in_serve_env
    from qig_plugin.validation import InputError, check_checkpoint_folder, is_vision_language, load_image

    checkpoint = args.checkpoint
    config = check_checkpoint_folder(checkpoint)
    command = ["generate", str(checkpoint), "--prompt", args.prompt, "--max-tokens", str(args.max_tokens)]
    if args.image is not None:  # fail here, not after vLLM has loaded
        if not is_vision_language(config):
            raise InputError(f"--image: {checkpoint} is a text-only model, which takes no image; leave out --image")
        load_image(args.image, "--image")
        command += ["--image", str(args.image)]
    completed = run_in_serve_env(command)
    sys.stdout.write(completed.stdout)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr[-4000:])
        return EXIT_FAILURE
    return EXIT_OK


def plan_bits_command(args: argparse.Namespace) -> int:
    """Check the inputs, measure every unit's sensitivity on the calibration samples, write the recipe."""
    import math

    from qig_plugin.data import batch_one_collator
    from qig_plugin.mixed_precision import check_budget, plan_mixed_precision
    from qig_plugin.validation import InputError, check_output_folder

    widths = sorted(set(args.widths))
    bad = [bits for bits in widths if not (1 <= bits <= 8 or bits == 16)]
    if bad:
        raise InputError(f"--widths {' '.join(map(str, bad))}: pass weight widths from 1 to 8 bits, or 16 (unquantized)")
    try:
        check_budget(args.bits, widths)
    except ValueError as error:
        raise InputError(f"--bits: {error}") from error
    if not math.isfinite(args.bits):
        raise InputError(f"--bits {args.bits}: pass a number of bits per weight, e.g. --bits 3.5")
    if args.output.is_dir():
        raise InputError(f"--output {args.output} is a folder; the recipe is a file: pass a path ending in .yaml")
    check_output_folder(args.output, overwrite=args.overwrite)
    from qig_plugin.validation import is_vision_language

    model_dir = _model_reference(args.model, args.trust_remote_code)
    config = _model_config(model_dir, args.trust_remote_code)
    calibration, data_name = _calibration_source(args, is_vision_language(config))
    processor = _load_processor(model_dir, config, args.trust_remote_code)
    dataset = _calibration_dataset(calibration, data_name, processor, args)
    model = _load_model(model_dir, config, args.trust_remote_code)
    batches = [batch_one_collator([row]) for row in dataset]
    start = time.perf_counter()
    plan = plan_mixed_precision(
        model, batches, args.bits, widths, args.sensitivity, args.group_size,
        progress=lambda done, total: print(f"[qig] sensitivity: sample {done}/{total}", flush=True),
    )
    staging = args.output.with_name(f".{args.output.name}.tmp")
    staging.write_text(plan.recipe(QUANTIZING_MODIFIERS[args.method]))
    staging.replace(args.output)
    counts = {bits: sum(plan.widths[unit.name] == bits for unit in plan.units) for bits in widths}
    print(
        f"\n[qig] wrote {args.output}\n"
        f"  sensitivity  {args.sensitivity} on {len(batches)} samples ({time.perf_counter() - start:.1f} s)\n"
        f"  widths       " + ", ".join(f"{count} units at {bits} bits" for bits, count in counts.items()) + "\n"
        f"  average      {plan.average_bits:.3f} bits per weight (budget {args.bits})\n"
        f"  quantize it  qig quantize {args.model} --recipe {args.output} --output <folder>"
    )
    return EXIT_OK


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local model folder (safetensors + processor files) or a hub id")
    recipe = parser.add_mutually_exclusive_group()
    recipe.add_argument("--recipe", type=Path,
                        help="recipe YAML (nested *_stage/*_modifiers form) or a shipped recipe's name")
    recipe.add_argument("--scheme", choices=SCHEMES, type=str.upper, help="use the shipped recipe of this scheme")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def build_parser() -> argparse.ArgumentParser:
    """The ``qig`` argument parser with its six commands."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="qig", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
                                     formatter_class=formatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    quantize = commands.add_parser("quantize", help="QIG-GPTQ (or GPTQ) a model into a vLLM checkpoint",
                                   epilog=QUANTIZE_EXAMPLES, formatter_class=formatter)
    _add_model_options(quantize)
    quantize.add_argument("--method", choices=tuple(METHODS), default="qig-gptq", help="with --scheme (default qig-gptq)")
    quantize.add_argument("--output", type=Path, required=True, help="checkpoint folder to create")
    quantize.add_argument("--data", type=Path, help="calibration records (.json/.jsonl/datasets folder); default: shipped set")
    quantize.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help=f"calibration samples (default {DEFAULT_SAMPLES})")
    quantize.add_argument("--max-length", type=int, default=512, help="tokens per sample (default 512)")
    quantize.add_argument("--seed", type=int, default=0, help="seed of the sample order (default 0)")
    quantize.add_argument("--allow-unservable", action="store_true",
                          help="quantize even if vLLM on this CPU cannot serve the scheme")
    quantize.add_argument("--verbose", action="store_true",
                          help=f"print llm-compressor's log lines too (they always go to <output>/{QUANTIZE_LOG})")
    quantize.set_defaults(run=quantize_command)

    explain = commands.add_parser("explain", help="picture QIG token weights of one sample as a PNG",
                                  epilog=EXPLAIN_EXAMPLES, formatter_class=formatter)
    _add_model_options(explain)
    explain.set_defaults(scheme="W4A16", method="qig-gptq")
    explain.add_argument("--image", type=Path, required=True, help="image file")
    explain.add_argument("--prompt", required=True, help="the user's prompt")
    explain.add_argument("--answer", default="", help="the assistant's answer (weighted too)")
    explain.add_argument("--layers", type=int, nargs="+", help="decoder layers to draw (default first, middle, last)")
    explain.add_argument("--output", type=Path, default=Path("qig-explain.png"), help="PNG to write")
    explain.set_defaults(run=explain_command)

    serve = commands.add_parser("serve", help="vLLM's OpenAI-compatible server for a checkpoint",
                                epilog=SERVE_EXAMPLES, formatter_class=formatter)
    serve.add_argument("checkpoint", type=Path, help="checkpoint folder from `qig quantize`")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(run=serve_command)

    evaluate = commands.add_parser("eval", help="fidelity of a quantized checkpoint to its full-precision parent",
                                   epilog=EVAL_EXAMPLES, formatter_class=formatter)
    evaluate.add_argument("checkpoint", type=Path, help="checkpoint folder from `qig quantize`")
    evaluate.add_argument("--reference", required=True, help="the full-precision model: a local folder or a hub id")
    evaluate.add_argument("--data", type=Path, nargs="+",
                          help=".txt, .json/.jsonl records or datasets folders; default: the shipped held-out set")
    evaluate.add_argument("--max-samples", type=int, help="score at most this many samples per set (default all)")
    evaluate.add_argument("--output", type=Path, default=Path("qig-eval.json"),
                          help="JSON to write (the plot goes beside it as .png)")
    evaluate.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --output and plot")
    evaluate.set_defaults(run=eval_command)

    plan_bits = commands.add_parser("plan-bits", help="a mixed-precision recipe: fewer bits where QIG says they hurt least",
                                     epilog=PLAN_BITS_EXAMPLES, formatter_class=formatter)
    plan_bits.add_argument("model", help="local model folder (safetensors + processor files) or a hub id")
    plan_bits.add_argument("--bits", type=float, required=True, help="average weight bits per weight, e.g. 3.5")
    plan_bits.add_argument("--widths", type=int, nargs="+", default=[2, 3, 4],
                           help="candidate widths (default 2 3 4; add 8 or 16 (unquantized) for wider units)")
    plan_bits.add_argument("--sensitivity", choices=("qig", "discrepancy", "entropy", "uniform"),
                           default="qig", help="qig (default), discrepancy (qig's forward-only control), entropy (LUQ) "
                                               "or uniform (one width)")
    plan_bits.add_argument("--method", choices=tuple(QUANTIZING_MODIFIERS), default="qig-gptq",
                           help="the recipe's modifier (default qig-gptq)")
    plan_bits.add_argument("--group-size", type=int, default=64, help="quantization group of every width (default 64)")
    plan_bits.add_argument("--output", type=Path, required=True, help="recipe YAML to write")
    plan_bits.add_argument("--data", type=Path, help="calibration records as for `qig quantize`; default: shipped set")
    plan_bits.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help=f"samples (default {DEFAULT_SAMPLES})")
    plan_bits.add_argument("--max-length", type=int, default=512, help="tokens per sample (default 512)")
    plan_bits.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint")
    plan_bits.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    plan_bits.set_defaults(run=plan_bits_command)

    generate = commands.add_parser("generate", help="greedy generation with vLLM from a checkpoint",
                                   epilog=GENERATE_EXAMPLES, formatter_class=formatter)
    generate.add_argument("checkpoint", type=Path, help="checkpoint folder from `qig quantize`")
    generate.add_argument("--image", type=Path, help="image file to attach")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-tokens", type=int, default=32)
    generate.set_defaults(run=generate_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``qig``; returns the exit code (0 ok, 1 failure, 2 bad usage or input)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    own_args, passthrough = argv[:split], argv[split + 1 :]  # `qig serve DIR -- <vLLM api_server options>`
    try:
        args = parser.parse_args(own_args)
        if passthrough and args.command != "serve":
            parser.error(f"only `qig serve` passes options after --, got {' '.join(passthrough)}")
        args.vllm_args = passthrough
    except SystemExit as exit_:  # --help (0) or a usage error (2, message already printed)
        return int(exit_.code or 0)

    from qig_plugin.serve_env import ServeEnvMissingError
    from qig_plugin.validation import InputError, check_arguments

    try:
        check_arguments(args)
        return args.run(args)
    except (InputError, FloatingPointError) as error:
        print(f"qig {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ServeEnvMissingError as error:
        print(f"qig {args.command}: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"qig {args.command}: interrupted; no output was left behind", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as error:  # noqa: BLE001 - any other failure: traceback, then one line
        traceback.print_exc()
        print(f"qig {args.command}: failed: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
