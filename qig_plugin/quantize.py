"""One call from a loaded model (VLM or text-only LLM) and a recipe to a complete compressed-tensors checkpoint.

``quantize_to_checkpoint`` first proves the output folder writable and its disk roomy enough for
the checkpoint, then runs llm-compressor's real ``oneshot`` with the sequential pipeline over the
text decoder layers (stopping at the first NaN/Inf activation), then saves the compressed model
and its processor to a temporary sibling of the output folder and renames it: the output folder
appears only when the checkpoint is complete.
"""

import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers import Modifier
from llmcompressor.recipe import Recipe

import qig_plugin  # noqa: F401  (registers the QIG modifiers before the recipe is parsed)
from qig_plugin.data import batch_one_collator
from qig_plugin.modifiers.language_model import decoder_layers
from qig_plugin.upstream import unpinned_caches_without_accelerator
from qig_plugin.validation import (
    check_checkpoint_output,
    check_free_space,
    check_group_divisibility,
    checkpoint_size,
    finite_activations,
    recipe_quantized_weights,
)

@dataclass
class QuantizeReport:
    """What a quantization run did: where, how long, how big."""

    output_dir: Path
    calibration_s: float
    save_s: float
    size_bytes: int


def decoder_layer_class(model: torch.nn.Module) -> str:
    """Class name of the language model's decoder layers (the sequential targets)."""
    return type(decoder_layers(model)[1][0]).__name__


def check_model_fits_recipe_and_disk(
    model: torch.nn.Module, recipe: str | Path | list[Modifier], output_dir: Path
) -> None:
    """The checks that need the loaded model, run before calibration: the recipe's weight groups divide the
    width of every linear it quantizes, and ``output_dir``'s disk has room for the compressed checkpoint.

    Reads the parameters' shapes (tied parameters once) and their widest dtype, never their data.
    """
    modifiers = recipe if isinstance(recipe, list) else Recipe.create_instance(str(recipe)).modifiers
    weights = recipe_quantized_weights(modifiers)
    parameters = dict(model.named_parameters())
    shapes = {name: tuple(parameter.shape) for name, parameter in parameters.items()}
    check_group_divisibility(shapes, weights, "the recipe")
    value_bytes = max(parameter.element_size() for parameter in parameters.values())
    quantized = f"{weights.num_bits}-bit weights" if weights is not None else "unquantized weights"
    check_free_space(output_dir, checkpoint_size(shapes, weights, value_bytes), quantized, option="output_dir")


def _folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def calibrate(
    model: torch.nn.Module,
    processor,
    recipe: str | Path | list[Modifier],
    dataset: Dataset,
    *,
    sequential_targets: list[str] | None = None,
    use_loss_mask: bool = False,
) -> float:
    """Run llm-compressor's ``oneshot`` on ``model`` in place, layer by layer; return its wall time in seconds.

    Stock AWQ runs too on CPU-only torch (its cached batches are not pinned there). AutoRound leaves every layer it
    tuned in bfloat16 (its mixed precision); the model's own parameters get their dtypes back, so that it runs on
    its usual activations afterwards.

    :param model: the model, loaded from a saved folder (``oneshot`` re-reads its config)
    :param processor: its processor (or tokenizer)
    :param recipe: a recipe YAML path or string (nested ``*_stage`` / ``*_modifiers`` form), or modifiers
    :param dataset: tokenized calibration samples (one sample per batch)
    :param sequential_targets: decoder layer classes; found from the model when None
    :param use_loss_mask: let the modifiers read the dataset's ``loss_mask`` column (tokens with 0 weigh nothing)
    """
    if len(dataset) == 0:
        raise ValueError("the calibration dataset is empty: give at least one sample")
    layers_name, layers = decoder_layers(model)
    dtypes = {parameter: parameter.dtype for parameter in model.parameters()}
    start = time.perf_counter()
    with finite_activations(layers, layers_name), unpinned_caches_without_accelerator():
        oneshot(
            model=model,
            processor=processor,
            dataset=dataset,
            recipe=recipe if isinstance(recipe, list) else str(recipe),
            num_calibration_samples=len(dataset),
            data_collator=batch_one_collator,
            sequential_targets=sequential_targets or [decoder_layer_class(model)],
            pipeline="sequential",
            use_loss_mask=use_loss_mask,
        )
    for parameter, dtype in dtypes.items():
        if parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
    return time.perf_counter() - start


def quantize_to_checkpoint(
    model: torch.nn.Module,
    processor,
    recipe: str | Path | list[Modifier],
    dataset: Dataset,
    output_dir: str | Path,
    *,
    sequential_targets: list[str] | None = None,
    overwrite: bool = False,
    extra_files: Mapping[str, Callable[[], str]] | None = None,
) -> QuantizeReport:
    """Calibrate ``model`` with ``recipe`` on ``dataset`` (see :func:`calibrate`) and write a compressed checkpoint.

    Before calibrating, the output location is checked as ``qig quantize`` checks it: ``output_dir`` is not
    a file (nor an existing folder, unless ``overwrite``), its parent can be created and written (a probe
    file, removed again), and its disk has room for the checkpoint's expected size; and the recipe's weight
    groups must divide the model's linears (see :func:`check_model_fits_recipe_and_disk`).

    :param output_dir: the checkpoint folder to create
    :param overwrite: replace an existing ``output_dir``
    :param extra_files: text files to write into the checkpoint (name -> a function returning the text), e.g. the
        run's log; written last, just before the checkpoint folder appears
    :raises InputError: (``qig_plugin.validation``) a check failed; nothing was written
    """
    output_dir = Path(output_dir)
    check_checkpoint_output(output_dir, overwrite=overwrite, option="output_dir")
    check_model_fits_recipe_and_disk(model, recipe, output_dir)
    calibration_s = calibrate(model, processor, recipe, dataset, sequential_targets=sequential_targets)

    start = time.perf_counter()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".partial", dir=output_dir.parent))
    try:
        model.save_pretrained(staging, save_compressed=True)
        processor.save_pretrained(staging)
        if hasattr(processor, "image_processor"):  # preprocessor_config.json, which vLLM and load_processor read
            processor.image_processor.save_pretrained(staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text())
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return QuantizeReport(output_dir, calibration_s, time.perf_counter() - start, _folder_size(output_dir))
