"""Checks of everything a user hands to ``qig``, run before any work starts.

Each check raises :class:`InputError` with a message that names the problem and the fix;
the command line turns it into exit code 2 with nothing written. The checks are cheap
(file names, JSON, YAML, image headers and pixels) so that a bad input fails in seconds,
before a model is loaded or calibrated.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from qig_plugin.data.calibration import CalibrationRecord

RECORD_KEYS = ("image", "prompt", "answer")
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class InputError(ValueError):
    """A bad input the user can fix; the message says what is wrong and how to fix it."""


class NonFiniteActivationError(InputError, FloatingPointError):
    """NaN or Inf in the activations of a decoder layer during calibration."""


def is_hub_id(reference: str) -> bool:
    """Whether ``reference`` is a hub id (``owner/name``) rather than a local folder."""
    return not Path(reference).expanduser().exists() and HUB_ID.match(reference) is not None


def read_config(model_dir: Path) -> dict:
    """The folder's ``config.json`` as a dict."""
    try:
        return json.loads((model_dir / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{model_dir / 'config.json'} is not valid JSON ({error}); re-save the model") from error


def check_model_folder(model_dir: Path, *, trust_remote_code: bool) -> None:
    """A local model folder holds a config, safetensors weights and its processor files.

    Refuses pickle-only weights (``pytorch_model.bin`` can run code when loaded) and a config that
    asks for custom model code (``auto_map``) unless ``trust_remote_code``.
    """
    if not model_dir.is_dir():
        raise InputError(
            f"model folder {model_dir} does not exist; pass a folder written by save_pretrained "
            "(build the default model with `python -m qig_plugin.models.default_model`)"
        )
    if not (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir} has no config.json, so it is not a saved model; pass the folder save_pretrained wrote")
    config = read_config(model_dir)
    if not any(model_dir.glob("*.safetensors")):
        pickles = sorted(path.name for path in model_dir.iterdir() if path.suffix in PICKLE_WEIGHT_SUFFIXES)
        found = f"only pickle weights ({', '.join(pickles)})" if pickles else "no weights"
        raise InputError(
            f"{model_dir} has {found}; qig reads only safetensors weights: re-save the model with "
            "`model.save_pretrained(folder, safe_serialization=True)`"
        )
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            f"{model_dir} has no tokenizer files ({' or '.join(TOKENIZER_FILES)}); "
            "save the processor beside the weights with `processor.save_pretrained(folder)`"
        )
    if "vision_config" in config and not any((model_dir / name).is_file() for name in IMAGE_PROCESSOR_FILES):
        raise InputError(
            f"{model_dir} is a vision-language model without image processor files "
            f"({' or '.join(IMAGE_PROCESSOR_FILES)}); save them with `processor.save_pretrained(folder)` "
            "and `processor.image_processor.save_pretrained(folder)`"
        )
    if "auto_map" in config and not trust_remote_code:
        raise InputError(
            f"{model_dir}/config.json asks for custom model code ({', '.join(config['auto_map'])}); "
            "qig runs code from a checkpoint only when you pass --trust-remote-code"
        )


def text_hidden_size(config: dict) -> int:
    """Width of the language model: ``text_config.hidden_size`` for VLMs, else ``hidden_size``."""
    hidden_size = config.get("text_config", {}).get("hidden_size", config.get("hidden_size"))
    if not isinstance(hidden_size, int):
        raise InputError("config.json has no hidden_size (nor text_config.hidden_size); pass --recipe instead of --scheme")
    return hidden_size


def check_output_folder(output_dir: Path, *, overwrite: bool) -> None:
    """Refuse an existing output folder unless ``overwrite``."""
    if output_dir.exists() and not overwrite:
        raise InputError(f"{output_dir} already exists; choose another --output or pass --overwrite to replace it")


def load_recipe_modifiers(recipe: Path) -> list:
    """The modifiers of a recipe YAML, refusing recipes llm-compressor would silently run as empty.

    Imports ``qig_plugin`` first, so recipes naming QIG modifiers parse. Without that import
    llm-compressor's own error applies (see ``qig_plugin_recipe_hint``).
    """
    import pydantic
    from llmcompressor.recipe import Recipe

    import qig_plugin  # noqa: F401  (registers the QIG modifiers)

    if not recipe.is_file():
        raise InputError(f"recipe {recipe} does not exist; pass a recipe YAML or a shipped recipe's name (qig_plugin/recipes/)")
    try:
        modifiers = Recipe.create_instance(str(recipe)).modifiers
    except pydantic.ValidationError as error:
        raise InputError(f"recipe {recipe}: {_describe_validation_error(error)}") from error
    except (ValueError, KeyError) as error:
        raise InputError(f"recipe {recipe}: {error}") from error
    if not modifiers:
        raise InputError(
            f"recipe {recipe} parses to no modifiers: llm-compressor reads only the nested form "
            "`<name>_stage:` / `<name>_modifiers:` / `ModifierName: {...}` and runs a flat YAML as an empty "
            "recipe; nest the modifiers as in qig_plugin/recipes/qig_gptq_w8a8.yaml"
        )
    return modifiers


def _describe_validation_error(error) -> str:
    """One sentence per field problem, with the nearest known field name for unknown ones."""
    from qig_plugin.upstream import modifier_class as find_modifier_class

    modifier_class = find_modifier_class(error.title)
    known = list(modifier_class.model_fields) if modifier_class is not None else []
    problems = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            near = difflib.get_close_matches(field, known, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else "; remove it"
            problems.append(f"{error.title} has no field '{field}'{hint}")
        else:
            problems.append(f"{error.title}.{field}: {problem['msg']}")
    return "; ".join(problems)


def recipe_scheme(modifiers: list) -> str:
    """The scheme name (``W4A16``, ``W8A8``, ...) a recipe quantizes the linears to.

    Read from the quantization config of its quantizing modifiers: ``W<weight bits>A<activation bits>``,
    ``A16`` when activations stay in 16 bits; float formats keep their preset name (e.g. ``FP8``).
    """
    names = set()
    for modifier in modifiers:
        if not hasattr(modifier, "resolve_quantization_config"):
            continue
        for scheme in modifier.resolve_quantization_config().config_groups.values():
            weights, activations = scheme.weights, scheme.input_activations
            if weights is None:
                continue
            if weights.type != "int" or (activations is not None and activations.type != "int"):
                names.add(f"FP{weights.num_bits}")
            else:
                names.add(f"W{weights.num_bits}A{activations.num_bits if activations is not None else 16}")
    if len(names) != 1:
        found = ", ".join(sorted(names)) or "none"
        raise InputError(
            f"the recipe must quantize the weights to exactly one scheme, found {found}; "
            "put one quantizing modifier (GPTQModifier, QIGGPTQModifier, ...) with one scheme in it"
        )
    return names.pop()


def check_servable(scheme: str, support: dict[str, str | None]) -> None:
    """Refuse a scheme this CPU's vLLM cannot serve (``support`` from ``cpu_serving_support()``)."""
    reason = support.get(scheme, f"qig knows vLLM's CPU support only for {', '.join(support)}")
    if reason is None:
        return
    servable = ", ".join(name for name, problem in support.items() if problem is None) or "none"
    raise InputError(
        f"vLLM on this CPU cannot serve {scheme}: {reason}. Quantize to a scheme it serves ({servable}), "
        "or pass --allow-unservable to quantize for another machine"
    )


def load_image(path: Path, where: str) -> Image.Image:
    """Open and fully decode an image file as RGB; ``where`` names the record or option in errors."""
    if not path.is_file():
        raise InputError(f"{where}: image {path} does not exist; fix the path")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise InputError(
            f"{where}: image {path} cannot be decoded ({error}); give a PNG or JPEG file"
        ) from error


def _record(raw: object, where: str, image_root: Path) -> CalibrationRecord:
    if not isinstance(raw, dict):
        raise InputError(f"{where} is a {type(raw).__name__}, expected an object with keys {', '.join(RECORD_KEYS)}")
    unknown = sorted(set(raw) - set(RECORD_KEYS))
    if unknown:
        raise InputError(f"{where} has unknown keys {unknown}; a record has only {', '.join(RECORD_KEYS)}")
    prompt, answer = raw.get("prompt"), raw.get("answer", "")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{where} has no prompt; give a non-empty string 'prompt'")
    if not isinstance(answer, str):
        raise InputError(f"{where}: 'answer' must be a string, got {type(answer).__name__}")
    image = raw.get("image")
    if isinstance(image, str):
        image = load_image(image_root / image, where)
    elif isinstance(image, Image.Image):
        image = image.convert("RGB")
    elif image is not None:
        raise InputError(f"{where}: 'image' must be a file path or null, got {type(image).__name__}")
    return CalibrationRecord(image, prompt, answer)


def _json_records(path: Path) -> list:
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON ({error}); fix the file") from error
    if not isinstance(records, list):
        raise InputError(f"{path} must hold a JSON list of records, got a {type(records).__name__}")
    return records


def load_calibration_source(path: Path):
    """Calibration data from a user's file or folder, validated.

    * ``.json`` (a list) or ``.jsonl`` (one per line) of ``{"image": path | null, "prompt": str, "answer": str}``
      records, image paths relative to the file -> ``list[CalibrationRecord]``;
    * a ``datasets`` folder (``save_to_disk``) with ``prompt``/``answer`` (and ``image``) columns ->
      ``list[CalibrationRecord]``, or already tokenized (an ``input_ids`` column) -> that ``Dataset``,
      checked by :func:`check_tokenized_dataset`.

    Every image is decoded here, so an unreadable one fails before the model is loaded.
    """
    if path.is_dir():
        from datasets import load_from_disk

        try:
            dataset = load_from_disk(str(path))
        except FileNotFoundError as error:
            raise InputError(
                f"{path} is not a saved datasets folder ({error}); save one with `Dataset.save_to_disk`, "
                "or pass a .json/.jsonl file of records"
            ) from error
        if "input_ids" in dataset.column_names:
            check_tokenized_dataset(dataset, str(path))
            return dataset
        raw_records = [dict(row) for row in dataset]
    elif path.suffix in (".json", ".jsonl") and path.is_file():
        raw_records = _json_records(path)
    else:
        raise InputError(
            f"calibration data {path} is neither a .json/.jsonl file nor a datasets folder; "
            "pass one of those, or leave out --data to use the shipped set"
        )
    if not raw_records:
        raise InputError(f"{path} holds no calibration records; give at least one image/prompt/answer record")
    return [_record(raw, f"record {index} of {path}", path.parent) for index, raw in enumerate(raw_records)]


def check_tokenized_dataset(dataset, source: str) -> None:
    """Every row has masks as long as its ``input_ids`` and at least one real token.

    A real token has ``attention_mask`` 1 and (where present) ``loss_mask`` non-zero; a row without one
    contributes nothing but padding to calibration.
    """
    if len(dataset) == 0:
        raise InputError(f"calibration set {source} is empty; give at least one sample")
    empty_rows = []
    for index, row in enumerate(dataset):
        length = len(row["input_ids"])
        masks = {name: row[name] for name in ("attention_mask", "loss_mask") if row.get(name) is not None}
        for name, mask in masks.items():
            if len(mask) != length:
                raise InputError(
                    f"row {index} of {source}: {name} has {len(mask)} entries but input_ids has {length} tokens; "
                    "every mask needs one entry per token"
                )
        real = torch.ones(length, dtype=torch.bool)
        for mask in masks.values():
            real &= torch.as_tensor(mask) != 0
        if not real.any():
            empty_rows.append(index)
    if empty_rows:
        shown = ", ".join(map(str, empty_rows[:10])) + (" ..." if len(empty_rows) > 10 else "")
        raise InputError(
            f"calibration set {source}: {len(empty_rows)} of {len(dataset)} rows are all padding (rows {shown}); "
            "their masks are all 0, so they calibrate nothing: drop them or fix their attention_mask/loss_mask"
        )


@contextmanager
def finite_activations(layers: torch.nn.ModuleList, layers_name: str) -> Iterator[None]:
    """Raise :class:`NonFiniteActivationError` as soon as a decoder layer's input or output holds NaN/Inf.

    Hooks every layer of ``layers`` (``[batch, seq, hidden]`` in and out); the check is one ``isfinite``
    per layer call. The hooks are removed on exit.
    """

    def check(index: int, where: str, value) -> None:
        tensor = value[0] if isinstance(value, tuple) else value
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NonFiniteActivationError(
                f"NaN/Inf in the {where} of decoder layer {layers_name}.{index} during calibration "
                f"({tensor.dtype}): the model's weights hold NaN/Inf or overflow in this dtype (fp16 "
                "overflows and underflows); load the model in float32 and check its weights"
            )

    def pre_hook(index, _module, args, kwargs):
        check(index, "input", args[0] if args else kwargs.get("hidden_states"))

    def post_hook(index, _module, _args, output):
        check(index, "output", output)

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda *a, i=index: pre_hook(i, *a), with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda *a, i=index: post_hook(i, *a)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
