"""Checks of everything a user hands to ``qig``, run before any work starts.

Each check raises :class:`InputError` with a message that names the problem and the fix;
the command line turns it into exit code 2 with nothing written. The checks are cheap
(numbers, file names, JSON, YAML, safetensors headers, image headers and pixels, one probe
file) so that a bad input fails in seconds, before a model is loaded or calibrated.

Importing this module loads neither torch nor llm-compressor (the checks that need them import
them), so the argument checks of a mistyped command line stay as fast as ``qig --help``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from qig_plugin.data.calibration import CalibrationRecord

RECORD_KEYS = ("image", "prompt", "answer")
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MIN_MAX_LENGTH = 16  # tokens: below this a chat template's own framing leaves no room for the sample

# option -> (its name on the parsed arguments, smallest value, largest value or None, what the value is)
ARGUMENT_RANGES = {
    "--samples": ("samples", 1, None, "the number of calibration samples"),
    "--max-length": ("max_length", MIN_MAX_LENGTH, None, "the tokens kept per calibration sample"),
    "--seed": ("seed", 0, 2**32 - 1, "the seed of the sample order"),
    "--port": ("port", 1, 65535, "the TCP port to listen on"),
    "--max-tokens": ("max_tokens", 1, None, "the number of tokens to generate"),
    "--max-samples": ("max_samples", 1, None, "the samples scored per evaluation set"),
}


class InputError(ValueError):
    """A bad input the user can fix; the message says what is wrong and how to fix it."""


class NonFiniteActivationError(InputError, FloatingPointError):
    """NaN or Inf in the activations of a decoder layer during calibration."""


def check_arguments(args: argparse.Namespace) -> None:
    """The numbers and texts of any ``qig`` command line, each within its range (see :data:`ARGUMENT_RANGES`).

    Runs first, before the command: a count out of range, a negative ``--layers`` index or an empty
    ``--prompt`` is bad usage, told in one line that says what to pass.
    """
    for option, (name, smallest, largest, meaning) in ARGUMENT_RANGES.items():
        value = getattr(args, name, None)
        if value is None or (smallest <= value and (largest is None or value <= largest)):
            continue
        allowed = f"from {smallest} to {largest}" if largest is not None else f"of at least {smallest}"
        raise InputError(f"{option} {value} is out of range: pass {option} with a value {allowed} ({meaning})")
    negative = [layer for layer in getattr(args, "layers", None) or [] if layer < 0]
    if negative:
        raise InputError(f"--layers {' '.join(map(str, negative))}: pass decoder layer indices from 0 up")
    prompt = getattr(args, "prompt", None)
    if prompt is not None and not prompt.strip():
        raise InputError("--prompt is empty: pass the text of the user's turn, e.g. --prompt \"Describe this image.\"")


def is_hub_id(reference: str) -> bool:
    """Whether ``reference`` is a hub id (``owner/name``) rather than a local folder."""
    return not Path(reference).expanduser().exists() and HUB_ID.match(reference) is not None


HUB_FILE_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "tokenizer*")


def resolve_hub_model(repo_id: str, *, trust_remote_code: bool) -> Path:
    """The local folder of hub model ``repo_id`` (``ORG/NAME``) in the Hugging Face cache, downloaded there first
    if it is not cached yet, as ``from_pretrained`` does (``$HF_HOME``/``$HF_HUB_CACHE``, ``$HF_TOKEN``;
    ``HF_HUB_OFFLINE=1`` reads the cache only).

    Fetches what ``qig`` reads: configs, safetensors weights, tokenizer and processor files (and model code with
    ``trust_remote_code``), never pickle weights.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = [*HUB_FILE_PATTERNS, *(["*.py"] if trust_remote_code else [])]
    cache = constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError as error:
        if constants.HF_HUB_OFFLINE:
            raise InputError(
                f"{repo_id} is no local folder, and the hub model {repo_id} is not in the Hugging Face cache "
                f"({cache}) while HF_HUB_OFFLINE=1 forbids downloading it; download it once where the hub can be "
                f"reached (`hf download {repo_id}`, same HF_HOME), or pass a local model folder"
            ) from error
        raise InputError(
            f"{repo_id} is no local folder, the hub cannot be reached ({_first_line(error)}) and the model is not "
            f"in the Hugging Face cache ({cache}); connect to the hub or pass a local model folder"
        ) from error
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as error:
        raise InputError(
            f"{repo_id} is no local folder and no model on the hub that this account can read "
            f"({type(error).__name__}); check the id, log in for a private or gated model (`hf auth login` or "
            "HF_TOKEN), or pass a local model folder"
        ) from error
    except (HfHubHTTPError, OSError) as error:
        raise InputError(f"{repo_id}: downloading it from the hub failed ({_first_line(error)}); "
                         "try again or pass a local model folder") from error


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


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


def is_vision_language(config: dict) -> bool:
    """Whether a ``config.json`` describes a vision-language model (it has a ``vision_config``)."""
    return "vision_config" in config


def check_output_folder(output: Path, *, overwrite: bool, option: str = "--output") -> None:
    """Refuse an existing ``output`` (folder or file) unless ``overwrite``, then prove its folder writable.

    The proof (:func:`check_writable_parent`) leaves nothing behind. ``option`` names the output in messages.
    """
    if output.exists() and not overwrite:
        overwrite_option = "--overwrite" if option.startswith("--") else "overwrite=True"
        raise InputError(f"{output} already exists; choose another {option} or pass {overwrite_option} to replace it")
    check_writable_parent(output, option)


def check_checkpoint_output(output: Path, *, overwrite: bool, option: str = "--output") -> None:
    """:func:`check_output_folder` for a checkpoint folder, which also must not be an existing file."""
    if output.is_file():
        raise InputError(f"{option} {output} is a file; a checkpoint is a folder: choose a folder path for {option}")
    check_output_folder(output, overwrite=overwrite, option=option)


def check_writable_parent(output: Path, option: str = "--output") -> None:
    """Create the folder ``output`` goes in, write and remove a probe file there, then remove what was created.

    Proves before any work that the output can be written (a missing parent can be created, the disk and its
    permissions take a file) while writing nothing: folders this check creates are removed again, also
    when it fails.
    """
    folder = output.absolute().parent
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    created: list[Path] = []
    try:
        for path in reversed(missing):  # outermost first
            try:
                path.mkdir()
            except OSError as error:
                raise InputError(
                    f"{option} {output} cannot be written: creating the folder {path} failed "
                    f"({error.strerror or error}); choose an {option} in a folder you can write to"
                ) from error
            created.append(path)
        try:
            descriptor, probe = tempfile.mkstemp(prefix=".qig-write-probe-", dir=folder)
            try:
                os.write(descriptor, b"qig")
            finally:
                os.close(descriptor)
                os.unlink(probe)
        except OSError as error:
            raise InputError(
                f"{option} {output} cannot be written: writing a file in {folder} failed "
                f"({error.strerror or error}); choose an {option} in a folder you can write to"
            ) from error
    finally:
        for path in reversed(created):  # innermost first
            path.rmdir()


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its nearest ancestor that exists."""
    return next(candidate for candidate in (path, *path.parents) if candidate.exists())


def _human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit in ("B", "KB") else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _human_count(count: int) -> str:
    if count >= 10**9:
        return f"{count / 1e9:.1f}B"
    return f"{count / 1e6:.0f}M" if count >= 10**6 else f"{count:,}"


@dataclass(frozen=True)
class QuantizedWeights:
    """How a recipe stores the weights it quantizes (the most bits and most scales of its config groups).

    ``group_size`` None means one scale per output channel (or per tensor); ``targets`` and ``ignore`` are
    compressed-tensors module patterns (class names such as ``Linear``, exact module names, ``re:`` regexes).
    """

    num_bits: int
    group_size: int | None
    symmetric: bool
    targets: tuple[str, ...]
    ignore: tuple[str, ...]


def recipe_quantized_weights(modifiers: list) -> QuantizedWeights | None:
    """The weight format of a recipe's quantizing modifiers for the size estimate; None when nothing is quantized.

    Several config groups are merged into an upper bound: the most bits, the smallest group, zero points if any
    group is asymmetric, every group's targets and every modifier's ignore patterns.
    """
    groups, ignore = [], []
    for modifier in modifiers:
        if not hasattr(modifier, "resolve_quantization_config"):
            continue
        config = modifier.resolve_quantization_config()
        ignore += config.ignore or []
        groups += [scheme for scheme in config.config_groups.values() if scheme.weights is not None]
    if not groups:
        return None
    group_sizes = [scheme.weights.group_size for scheme in groups if scheme.weights.group_size]
    return QuantizedWeights(
        num_bits=max(scheme.weights.num_bits for scheme in groups),
        group_size=min(group_sizes) if group_sizes else None,
        symmetric=all(scheme.weights.symmetric for scheme in groups),
        targets=tuple(dict.fromkeys(target for scheme in groups for target in scheme.targets)),
        ignore=tuple(dict.fromkeys(ignore)),
    )


def _matches(module_name: str, patterns: Sequence[str]) -> bool:
    """Whether a module name matches a compressed-tensors pattern: ``re:<regex>`` (from the start) or the name."""
    return any(
        re.match(pattern[3:], module_name) if pattern.startswith("re:") else pattern == module_name
        for pattern in patterns
    )


def _is_quantized_linear(name: str, shape: Sequence[int], weights: QuantizedWeights) -> bool:
    """Whether the tensor ``name`` of ``shape`` is a linear weight ``weights`` quantizes.

    That is a 2-D ``*.weight`` [out, in], not an embedding (no ``embed``/``wte``/``wpe`` in its name), whose module
    is targeted (``Linear`` targets every such tensor, other targets match by name) and not ignored.
    """
    module_name = name.removesuffix(".weight")
    return (
        name.endswith(".weight")
        and len(shape) == 2
        and not any(part in name for part in ("embed", "wte", "wpe"))
        and ("Linear" in weights.targets or _matches(module_name, weights.targets))
        and not _matches(module_name, weights.ignore)
    )


GROUP_SIZES = (128, 64, 32, 16)


def check_group_divisibility(
    shapes: Mapping[str, Sequence[int]], weights: QuantizedWeights | None, recipe: str
) -> None:
    """Refuse a recipe whose weight group size does not divide the input width of a linear it quantizes.

    ``recipe`` names the recipe in the message (e.g. ``"recipe gptq_w4a16_g128.yaml"``).

    llm-compressor refuses such a recipe only when calibration initializes, after the model is loaded
    (and ``bypass_divisibility_checks`` only moves the failure into the observer). ``shapes`` are the model's
    tensor shapes (:func:`safetensors_shapes`, or a loaded model's parameters).
    """
    if weights is None or weights.group_size is None:
        return
    widths = {name: shape[1] for name, shape in shapes.items() if _is_quantized_linear(name, shape, weights)}
    indivisible = [name for name, width in widths.items() if width % weights.group_size]
    if not indivisible:
        return
    fitting = next((size for size in GROUP_SIZES if all(width % size == 0 for width in widths.values())), None)
    fix = (
        f"use group_size {fitting} (e.g. a shipped recipe without _g128)" if fitting is not None
        else "use strategy: channel, or ignore those linears"
    )
    name = indivisible[0]
    raise InputError(
        f"{recipe}: group_size {weights.group_size} does not divide the input width of {len(indivisible)} "
        f"quantized linears (e.g. {name.removesuffix('.weight')}: {widths[name]} columns); {fix}, or pass --scheme, "
        "which picks the group size for the model's width"
    )


def safetensors_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in a folder's ``*.safetensors`` files, read from their JSON headers alone.

    A safetensors file starts with the header's length (8 bytes, little-endian) and the header, a JSON object
    ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``; no tensor data is read.
    """
    shapes = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with path.open("rb") as file:
                (header_length,) = struct.unpack("<Q", file.read(8))
                header = json.loads(file.read(header_length))
            shapes.update({name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"})
        except (OSError, struct.error, ValueError, KeyError, TypeError) as error:
            raise InputError(
                f"{path} is not a readable safetensors file ({error}); re-save the model with save_pretrained"
            ) from error
    return shapes


@dataclass(frozen=True)
class CheckpointSize:
    """The expected size of a compressed checkpoint: the model's parameter count and an upper bound in bytes."""

    parameters: int
    bytes: int


# config, tokenizer and processor files beside the weights, and safetensors headers (a tokenizer.json is ~2-20 MB)
CHECKPOINT_FILES_ALLOWANCE = 64 * 2**20
SCALE_BYTES = 4  # scales and zero points, counted as float32 / int32 (the widest compressed-tensors writes)


def checkpoint_size(
    shapes: Mapping[str, Sequence[int]], weights: QuantizedWeights | None, value_bytes: int
) -> CheckpointSize:
    """An upper bound of the bytes ``save_pretrained(save_compressed=True)`` writes for tensors of ``shapes``.

    A quantized linear weight (:func:`_is_quantized_linear`) takes ``num_bits`` bits per value, packed into
    int32 words (``32 // num_bits`` values per word: 1 byte per value for 8 bits, 0.5 for 4, 0.4 for 3),
    plus one ``SCALE_BYTES`` scale per output channel or per group (and as many zero points when asymmetric).
    Every other tensor (embeddings, ``lm_head``, norms, ignored or untargeted modules) stays at ``value_bytes``
    per value, the dtype the model is saved in. ``CHECKPOINT_FILES_ALLOWANCE`` covers the other files.
    """
    parameters, total = 0, CHECKPOINT_FILES_ALLOWANCE
    for name, shape in shapes.items():
        values = math.prod(shape)
        parameters += values
        if weights is None or not _is_quantized_linear(name, shape, weights):
            total += values * value_bytes
            continue
        rows, columns = shape
        total += math.ceil(values / (32 // weights.num_bits)) * 4
        scales = rows * (math.ceil(columns / weights.group_size) if weights.group_size else 1)
        total += scales * SCALE_BYTES * (1 if weights.symmetric else 2)
    return CheckpointSize(parameters, total)


def check_free_space(output: Path, size: CheckpointSize, scheme: str, option: str = "--output") -> None:
    """Refuse an ``output`` whose disk has less free space than the checkpoint's expected ``size``.

    The free space is that of the nearest existing ancestor of ``output`` (``shutil.disk_usage``).
    """
    where = _nearest_existing(output.absolute())
    free = shutil.disk_usage(where).free
    if free < size.bytes:
        raise InputError(
            f"{option} {output}: the checkpoint needs up to {_human_bytes(size.bytes)} "
            f"({_human_count(size.parameters)} parameters at {scheme}) but {where} has only {_human_bytes(free)} "
            f"free; free some space there or choose an {option} on a disk with room"
        )


def resolve_recipe(recipe: Path) -> Path:
    """A ``--recipe``: a YAML file, or the name of a shipped recipe (``qig_gptq_w8a8``, with or without .yaml)."""
    from qig_plugin.recipes import shipped_recipe, shipped_recipes

    if recipe.is_file():
        return recipe
    if recipe.parent == Path("."):
        try:
            return shipped_recipe(recipe.name)
        except FileNotFoundError:
            pass
    names = [path.stem for path in shipped_recipes()]
    near = difflib.get_close_matches(recipe.stem, names, n=1)
    if near:
        raise InputError(f"recipe {recipe} does not exist; did you mean the shipped recipe '{near[0]}'?")
    raise InputError(
        f"recipe {recipe} does not exist; pass a recipe YAML or a shipped recipe's name ({', '.join(names)})"
    )


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
        raise InputError(f"recipe {recipe}: {_with_modifier_hint(str(error))}") from error
    if not modifiers:
        raise InputError(
            f"recipe {recipe} parses to no modifiers: llm-compressor reads only the nested form "
            "`<name>_stage:` / `<name>_modifiers:` / `ModifierName: {...}` and runs a flat YAML as an empty "
            "recipe; nest the modifiers as in qig_plugin/recipes/qig_gptq_w8a8.yaml"
        )
    return modifiers


def _with_modifier_hint(message: str) -> str:
    """llm-compressor's "No modifier of type 'X' found." with the closest known modifier name, or the fix."""
    from qig_plugin.upstream import close_modifier_name

    unknown = re.search(r"No modifier of type '([^']+)' found", message)
    if unknown is None:
        return message
    near = close_modifier_name(unknown.group(1))
    if near is not None:
        return f"no modifier is named '{unknown.group(1)}'; did you mean '{near}'?"
    return (
        f"no modifier is named '{unknown.group(1)}'; name one of llm-compressor's modifiers (GPTQModifier, "
        "QuantizationModifier, AWQModifier, ...) or of qig-plugin's (QIGGPTQModifier, QIGAWQModifier, ...)"
    )


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
    ``A16`` when activations stay in 16 bits; float formats keep their preset name (e.g. ``FP8``). A
    mixed-precision recipe (``qig plan-bits``) gives its schemes joined by ``+``, e.g. ``W3A16+W4A16``.
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
    if not names:
        raise InputError(
            "the recipe quantizes no weights; put a quantizing modifier (GPTQModifier, QIGGPTQModifier, ...) with "
            "a weight scheme in it"
        )
    return "+".join(sorted(names))


def check_servable(scheme: str, support: dict[str, str | None]) -> None:
    """Refuse a scheme (each part of a mixed ``W3A16+W4A16``) this CPU's vLLM cannot serve (``support`` from
    ``cpu_serving_support()``)."""
    unknown = f"qig knows vLLM's CPU support only for {', '.join(support)}"
    reasons = [f"{part}: {support.get(part, unknown)}" for part in scheme.split("+") if support.get(part, unknown)]
    if not reasons:
        return
    reason = reasons[0].split(": ", 1)[1] if "+" not in scheme else "; ".join(reasons)
    servable = ", ".join(name for name, problem in support.items() if problem is None) or "none"
    raise InputError(
        f"vLLM on this CPU cannot serve {scheme}: {reason}. Quantize to a scheme it serves ({servable}), "
        "or pass --allow-unservable to quantize for another machine"
    )


def load_image(path: Path, where: str) -> Image.Image:
    """Open and fully decode an image file as RGB; ``where`` names the record or option in errors."""
    from PIL import Image

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
    from PIL import Image

    from qig_plugin.data.calibration import CalibrationRecord

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
    if not path.exists():
        raise InputError(
            f"calibration data {path} does not exist; pass a .json/.jsonl file of records or a datasets folder, "
            "or leave out --data to use the shipped set"
        )
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


def check_records_fit_model(records: list[CalibrationRecord], source: str, *, vision_language: bool) -> None:
    """Calibration records a model can take: no image for a text-only model; all or none with one for a VLM.

    (Every dataset row must have the same columns: the sequential pipeline traces the model with the first.)
    """
    with_image = [index for index, record in enumerate(records) if record.image is not None]
    if with_image and not vision_language:
        raise InputError(
            f"record {with_image[0]} of {source} has an image, but the model is a text-only LLM; "
            'give text records ("image": null) or quantize a vision-language model'
        )
    if 0 < len(with_image) < len(records):
        without = next(index for index in range(len(records)) if index not in set(with_image))
        raise InputError(
            f"record {without} of {source} has no image but record {with_image[0]} has one; "
            "give every record an image, or none"
        )


def check_tokenized_fits_model(dataset, source: str, *, vision_language: bool) -> None:
    """A tokenized calibration set for a text-only model holds no image columns."""
    image_columns = [name for name in dataset.column_names if name.startswith(("pixel_", "image_"))]
    if image_columns and not vision_language:
        raise InputError(
            f"calibration set {source} has image columns ({', '.join(image_columns)}), but the model is a "
            "text-only LLM; give a set tokenized without images"
        )


def check_checkpoint_folder(path: Path) -> dict:
    """A checkpoint folder to serve: its ``config.json`` (returned as a dict) and safetensors weights are there."""
    if not (path / "config.json").is_file():
        raise InputError(f"{path} is not a checkpoint folder (no config.json); pass the --output of `qig quantize`")
    if not any(path.glob("*.safetensors")):
        raise InputError(f"{path} has no safetensors weights; pass the --output of a finished `qig quantize`")
    return read_config(path)


def vocab_size(config: dict) -> int | None:
    """The language model's vocabulary size: ``text_config.vocab_size`` for VLMs, else ``vocab_size``."""
    size = config.get("text_config", {}).get("vocab_size", config.get("vocab_size"))
    return size if isinstance(size, int) else None


def checkpoint_scheme(config: dict) -> str | None:
    """The scheme of a compressed-tensors checkpoint's ``quantization_config`` (e.g. ``W4A16``), None when it has
    none; ``W<weight bits>A<activation bits>`` (``A16`` without activation quantization), ``FP<bits>`` for floats,
    several groups joined by ``+``."""
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict):
        return None
    names = []
    for group in (quantization.get("config_groups") or {}).values():
        weights, activations = group.get("weights") or {}, group.get("input_activations") or {}
        if not weights:
            continue
        if weights.get("type") == "float" or activations.get("type") == "float":
            names.append(f"FP{weights.get('num_bits')}")
        else:
            names.append(f"W{weights.get('num_bits')}A{activations.get('num_bits', 16)}")
    return "+".join(dict.fromkeys(names)) or quantization.get("quant_method", "quantized")


def check_eval_pair(checkpoint: Path, checkpoint_config: dict, reference: str | Path, reference_config: dict) -> None:
    """``qig eval``'s two models fit together: a quantized checkpoint, an unquantized reference of the same
    architecture (model type, vision or not) and vocabulary size."""
    if not isinstance(checkpoint_config.get("quantization_config"), dict):
        raise InputError(
            f"{checkpoint} is not a quantized checkpoint (its config.json has no quantization_config); "
            "pass the --output of `qig quantize` (or of llm-compressor's save_pretrained(save_compressed=True))"
        )
    if isinstance(reference_config.get("quantization_config"), dict):
        raise InputError(
            f"--reference {reference} is itself quantized ({checkpoint_scheme(reference_config)}); "
            "pass the full-precision model the checkpoint was quantized from"
        )
    kinds = {name: ("vision-language" if is_vision_language(config) else "text-only", config.get("model_type"))
             for name, config in (("checkpoint", checkpoint_config), ("reference", reference_config))}
    if kinds["checkpoint"] != kinds["reference"]:
        (kind, model_type), (reference_kind, reference_type) = kinds["checkpoint"], kinds["reference"]
        raise InputError(
            f"{checkpoint} is a {kind} {model_type} model but --reference {reference} is a {reference_kind} "
            f"{reference_type} model; pass the model the checkpoint was quantized from"
        )
    sizes = vocab_size(checkpoint_config), vocab_size(reference_config)
    if sizes[0] != sizes[1]:
        raise InputError(
            f"mismatched vocabularies: {checkpoint} has {sizes[0]} tokens but --reference {reference} has {sizes[1]}; "
            "next-token distributions can be compared only over one vocabulary: pass the model the checkpoint was "
            "quantized from"
        )


def check_same_tokenizer(checkpoint_tokenizer, reference_tokenizer, checkpoint: Path, reference: str | Path) -> None:
    """The checkpoint's tokenizer maps the same tokens to the same ids as the reference's."""
    ours, theirs = checkpoint_tokenizer.get_vocab(), reference_tokenizer.get_vocab()
    if ours == theirs:
        return
    differing = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda item: item[1])
    token, token_id = differing[0]
    where = "the checkpoint's" if ours.get(token) == token_id else "the reference's"
    raise InputError(
        f"mismatched vocabularies: the tokenizers of {checkpoint} ({len(ours)} tokens) and --reference {reference} "
        f"({len(theirs)} tokens) differ (e.g. {token!r} is id {token_id} only in {where}); pass the model the "
        "checkpoint was quantized from"
    )


def check_token_ids_fit(dataset, source: str, size: int | None) -> None:
    """A tokenized set's ids are all below the model's vocabulary ``size``."""
    if size is None:
        return
    largest = max((max(row["input_ids"]) for row in dataset if len(row["input_ids"])), default=-1)
    if largest >= size:
        raise InputError(
            f"mismatched vocabularies: {source} holds token id {largest}, but the model's vocabulary has {size} "
            "tokens; tokenize the data with the model's tokenizer"
        )


def load_eval_source(path: Path):
    """``qig eval --data``: a ``.txt`` file (its text, for perplexity) or what :func:`load_calibration_source`
    takes (records, with or without answers, or a tokenized datasets folder)."""
    if path.suffix == ".txt" and path.is_file():
        text = path.read_text(errors="replace")
        if len(text.split()) < 2:
            raise InputError(f"{path} holds no text to score; give a text file of at least a few words")
        return text
    if not path.exists():
        raise InputError(
            f"evaluation data {path} does not exist; pass a .txt file, a .json/.jsonl file of records or a datasets "
            "folder, or leave out --data to use the shipped held-out set"
        )
    return load_calibration_source(path)


def check_tokenized_dataset(dataset, source: str) -> None:
    """Every row has masks as long as its ``input_ids`` and at least one real token.

    A real token has ``attention_mask`` 1 and (where present) ``loss_mask`` non-zero; a row without one
    contributes nothing but padding to calibration.
    """
    import torch

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
    import torch

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
