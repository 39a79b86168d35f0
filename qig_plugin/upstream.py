"""Every use qig-plugin makes of llm-compressor's and compressed-tensors' internals, in one place.

The plugin rests on private parts of llm-compressor 0.14 (the modifier factory's tables, AWQ's
grid search and caches, SmoothQuant's smoothing, the hooks' global switch, the experts' token
order) and of auto-round 0.15 (the block loss of its sign-gradient tuning). Nothing else in the package names them: the modifiers subclass the seam classes here and
override their public, documented methods. Importing this module checks the installed versions
and fails with one line naming the supported ones; ``tests/test_upstream.py`` fails by name when
an internal changes shape.
"""

from __future__ import annotations

import difflib
from importlib.metadata import PackageNotFoundError, version

from qig_plugin import __version__

# distribution -> the release series this plugin is written against
SUPPORTED_SERIES = {"llmcompressor": "0.14", "compressed-tensors": "0.19"}


def installed_outside(distribution: str, series: str) -> str | None:
    """The installed version of ``distribution`` ("not installed" when absent) unless it is of ``series`` (then None)."""
    try:
        found = version(distribution)
    except PackageNotFoundError:
        found = "not installed"
    return None if found == series or found.startswith(f"{series}.") else found


def check_versions() -> None:
    """Raise ``ImportError`` unless the installed llm-compressor and compressed-tensors are the supported series."""
    for distribution, series in SUPPORTED_SERIES.items():
        found = installed_outside(distribution, series)
        if found is not None:
            raise ImportError(
                f"qig-plugin {__version__} supports {distribution} {series}.x; found {found}. Install the "
                f"quantize environment's pins (`pip install 'qig-plugin[quantize]'`, which takes llmcompressor==0.14.0.1 "
                f"and compressed-tensors 0.19)"
            )


check_versions()

# ruff: noqa: E402 (the imports below run only once the versions are known to fit)
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from compressed_tensors.offload import update_offload_parameter
from compressed_tensors.offload.dist_utils import is_distributed
from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
from llmcompressor.modifiers.autoround import AutoRoundModifier
from llmcompressor.modifiers.factory import ModifierFactory
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
from llmcompressor.modifiers.transform.awq.base import get_lowest_common_ancestor_with_avoid
from llmcompressor.modifiers.transform.awq.dynamic_mappings import (
    get_layer_mappings_from_model as awq_mappings_of,
)
from llmcompressor.modifiers.transform.awq.mappings import AWQMapping, ResolvedMapping
from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
from llmcompressor.modifiers.transform.smoothquant.base import MINIMUM_SMOOTHING_SCALE, SmoothQuantScale
from llmcompressor.modifiers.transform.smoothquant.dynamic_mappings import (
    get_layer_mappings_from_model as smoothquant_mappings_of,
)
from llmcompressor.modifiers.utils.hooks import HooksMixin
from llmcompressor.core import active_session
from llmcompressor.pipelines.cache import IntermediatesCache
from llmcompressor.pipelines.sequential.pipeline import SequentialPipeline
from loguru import logger

__all__ = [
    "AWQMapping",
    "AWQSearchSeam",
    "AutoRoundSeam",
    "GPTQSeam",
    "LinearExperts2D",
    "ResolvedMapping",
    "SUPPORTED_SERIES",
    "SmoothQuantScale",
    "SmoothQuantSeam",
    "awq_mappings_of",
    "check_versions",
    "installed_outside",
    "close_modifier_name",
    "expert_token_rows",
    "get_lowest_common_ancestor_with_avoid",
    "hooks_disabled",
    "modifier_class",
    "register_modifier",
    "smoothquant_mappings_of",
    "unpinned_caches_without_accelerator",
]


# -- the modifier factory (its registries and error table are private) --------------------------------------------


def register_modifier(modifier_class_: type) -> None:
    """Make recipes able to name ``modifier_class_`` by its class name.

    Also drops the "add `import qig_plugin`" error :mod:`qig_plugin_recipe_hint` may have placed in the
    factory's table of known-but-unavailable modifiers under that name.
    """
    ModifierFactory._errors.pop(modifier_class_.__name__, None)
    ModifierFactory.register(modifier_class_.__name__, modifier_class_)


def _known_modifiers() -> dict[str, type]:
    if not ModifierFactory._loaded:
        ModifierFactory.refresh()
    return {
        **ModifierFactory._main_registry,
        **ModifierFactory._experimental_registry,
        **ModifierFactory._registered_registry,
    }


def modifier_class(name: str) -> type | None:
    """The modifier class a recipe reaches under ``name`` (registered plugins first, then llm-compressor's own)."""
    return _known_modifiers().get(name)


def close_modifier_name(name: str) -> str | None:
    """The known modifier name closest to a misspelt ``name`` (e.g. ``QIGGPTQModifer`` -> ``QIGGPTQModifier``)."""
    matches = difflib.get_close_matches(name, list(_known_modifiers()), n=1, cutoff=0.6)
    return matches[0] if matches else None


# -- hooks and caches ---------------------------------------------------------------------------------------------


def hooks_disabled():
    """Every modifier's hooks off inside the context; left off on exit when they already were.

    ``HooksMixin.disable_hooks`` re-enables on exit, which inside AWQ's smoothing (hooks already off)
    would let its caching hooks fire during the grid search.
    """
    return nullcontext() if HooksMixin._HOOKS_DISABLED else HooksMixin.disable_hooks()


def _skip_pinning(self, batch_index: int, input_names: list[str] | None = None) -> None:
    """``IntermediatesCache.pin_memory`` where pinning has no target (CPU-only torch raises there)."""


@contextmanager
def unpinned_caches_without_accelerator() -> Iterator[None]:
    """Inside the context, llm-compressor's calibration caches skip pinning when torch has no accelerator.

    llm-compressor 0.14.0.1's AWQ pins every cached batch unconditionally, which fails on CPU-only torch
    ("Cannot access accelerator device"); with an accelerator nothing changes.
    """
    if torch.accelerator.is_available():
        yield
        return
    pin_memory = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = _skip_pinning
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = pin_memory


# -- GPTQ ---------------------------------------------------------------------------------------------------------


class GPTQSeam(GPTQModifier):
    """``GPTQModifier`` with the names of the modules it calibrates readable."""

    def calibrated_module_name(self, module: torch.nn.Module) -> str | None:
        """The name of ``module`` if this modifier calibrates it (None otherwise)."""
        return self._module_names.get(module)


# -- AWQ ----------------------------------------------------------------------------------------------------------


class AWQSearchSeam(AWQModifier):
    """``AWQModifier`` whose grid search a subclass can weight, through public methods.

    Subclasses override :meth:`before_scale_search` (called with each mapping right before its grid
    search), :meth:`after_scale_search` and :meth:`search_loss`; they read the mapping parent's cached
    calls with :meth:`cached_parent_calls` and may replace the activation mean with
    :meth:`set_activation_sum`. On CPU-only torch the cached batches are not pinned.
    """

    @property
    def resolved_mappings(self) -> list[ResolvedMapping]:
        """The mappings resolved on the model at calibration start."""
        return self._resolved_mappings

    def cached_parent_calls(self, mapping: ResolvedMapping) -> IntermediatesCache:
        """The keyword arguments of every cached call of ``mapping.parent``, in calibration-batch order."""
        return self._parent_args_cache[mapping.parent]

    def set_activation_sum(self, mapping: ResolvedMapping, total: torch.Tensor, count: torch.Tensor) -> None:
        """Make the search's ``x_mean`` ``total / count`` (``[hidden]`` sum of ``|x|`` over ``count`` tokens)."""
        self._smooth_activation_stats[mapping.smooth_name] = [total, count]

    def before_scale_search(self, mapping: ResolvedMapping) -> None:
        """Called right before the grid search of ``mapping``."""

    def after_scale_search(self, mapping: ResolvedMapping) -> None:
        """Called right after the grid search of ``mapping``, also when it failed."""

    def search_loss(self, fp_outputs: list[torch.Tensor], candidate_outputs: list[torch.Tensor]) -> float:
        """The grid search's loss of one candidate scale: stock AWQ's MSE unless overridden.

        :param fp_outputs: per cached batch, the parent's full-precision output ``[batch, seq, hidden]``
        :param candidate_outputs: the same with ``Q(W s) / s`` weights
        """
        return AWQModifier._compute_loss(self, fp_outputs, candidate_outputs)

    def _compute_best_scale(self, mapping: ResolvedMapping, fp16_outputs, orig_layer_weights) -> torch.Tensor:
        self.before_scale_search(mapping)
        try:
            return super()._compute_best_scale(mapping, fp16_outputs, orig_layer_weights)
        finally:
            self.after_scale_search(mapping)

    def _compute_loss(self, fp16_outputs: list[torch.Tensor], int_w_outputs: list[torch.Tensor]) -> float:
        return self.search_loss(fp16_outputs, int_w_outputs)

    def _apply_smoothing(self, model: torch.nn.Module) -> None:
        with unpinned_caches_without_accelerator():
            super()._apply_smoothing(model)


# -- SmoothQuant --------------------------------------------------------------------------------------------------


class SmoothQuantSeam(SmoothQuantModifier):
    """``SmoothQuantModifier`` with a public seam for its default mappings and shared-memory-safe smoothing.

    Subclasses override :meth:`default_mappings` (used when the recipe gives no ``mappings``).

    Distributed smoothing is stock's, made safe for ranks that share their weights. llm-compressor 0.14
    loads a distributed model on CPU into shared memory (its ``DistributedCPUCache``: rank 0's tensors,
    mapped by every other rank), and stock SmoothQuant has every rank smooth in place: each reads ``W``,
    writes ``W / s``. A rank that reads after another has written divides a second time (``W / s^2``), so
    which ranks, and which layers, end up smoothed twice depends on timing. Here every rank computes each
    mapping's new weights from the unsmoothed ones, waits for all ranks to have read, then writes them: the
    writes are identical, so shared and per-rank (accelerator) copies alike end up with ``W / s`` once. One
    mapping at a time, so a layer shared by two mappings sees the first's update.
    """

    def default_mappings(self, model: torch.nn.Module) -> list:
        """``[[balance layer patterns], smooth layer pattern]`` pairs for ``model``: stock's inferred ones."""
        return smoothquant_mappings_of(model)

    def _infer_mappings_from_model(self, model: torch.nn.Module) -> list:
        return self.mappings if self.mappings is not None else self.default_mappings(model)

    @torch.no_grad()
    def _apply_smoothing(self, model: torch.nn.Module):
        if not is_distributed():
            return super()._apply_smoothing(model)
        self._reduce_activation_scales()
        for mapping in self.resolved_mappings_:
            if mapping.smooth_name not in self.scales_:
                continue
            logger.info(f"Smoothing with {mapping.smooth_name}")
            scale = self.scales_.pop(mapping.smooth_name)
            scales = self._calculate_smoothing_scales(
                mapping.balance_layers, scale.max_channel_vals - scale.min_channel_vals
            )
            scales = torch.maximum(scales, torch.Tensor([MINIMUM_SMOOTHING_SCALE]).to(scales.device))
            updates = [(layer, "weight", layer.weight * scales.view(1, -1)) for layer in mapping.balance_layers]
            smooth_layer = mapping.smooth_layer
            weight = smooth_layer.weight
            smoothed = weight / scales if weight.ndim == 1 else weight / scales.view(-1, 1)
            updates.append((smooth_layer, "weight", smoothed))
            if getattr(smooth_layer, "bias", None) is not None:
                updates.append((smooth_layer, "bias", smooth_layer.bias / scales))
            dist.barrier()  # every rank has read the unsmoothed weights
            for module, name, value in updates:
                update_offload_parameter(module, name, value)
            dist.barrier()  # and every rank has written before any reads again


# -- AutoRound ----------------------------------------------------------------------------------------------------

# auto-round's series whose block loss (SignRoundQuantizer._get_loss) the seam wraps
AUTO_ROUND_SERIES = "0.15"


def _sign_round_quantizer() -> type:
    """auto-round's ``SignRoundQuantizer``, after checking the installed auto-round is the supported series."""
    found = installed_outside("auto-round", AUTO_ROUND_SERIES)
    if found is not None:
        raise ImportError(
            f"qig-plugin {__version__} weights AutoRound's block loss in auto-round {AUTO_ROUND_SERIES}.x; found "
            f"{found}. Install it with `pip install 'auto-round=={AUTO_ROUND_SERIES}.1'` (llmcompressor 0.14 accepts it)"
        )
    from auto_round.algorithms.quantization.sign_round.quantizer import SignRoundQuantizer

    return SignRoundQuantizer


@contextmanager
def weighted_block_loss(sample_weights: torch.Tensor) -> Iterator[None]:
    """Inside the context, AutoRound's block loss weights each token's squared error by ``sample_weights``.

    :param sample_weights: ``[samples, seq]``, one row per cached calibration sample in AutoRound's sample
        order (the sequence padded as the block inputs are); the loss of a batch of samples ``indices`` is
        stock's mean squared error of ``sqrt(w) * output`` against ``sqrt(w) * reference``, so weights of 1
        give stock AutoRound bit for bit
    """
    quantizer = _sign_round_quantizer()
    stock_loss = quantizer._get_loss

    def token_weighted_loss(self, pred_output, ref_output, indices, *args, **kwargs):
        scale = sample_weights[torch.as_tensor(indices)].sqrt().unsqueeze(-1).to(pred_output.device)
        return stock_loss(self, pred_output * scale.to(pred_output.dtype), ref_output * scale.to(ref_output.dtype),
                          indices, *args, **kwargs)

    quantizer._get_loss = token_weighted_loss
    try:
        yield
    finally:
        quantizer._get_loss = stock_loss


_STOCK_SEQUENTIAL_PIPELINE = SequentialPipeline.__dict__["__call__"].__func__


def _sequential_pipeline(model, dataloader, dataset_args):
    """llm-compressor's sequential pipeline, with error propagation off for every ``AutoRoundModifier``.

    llm-compressor 0.14 turns ``propagate_error`` off when a recipe modifier's class is *named*
    ``AutoRoundModifier`` (AutoRound tunes each layer on its own forwards from the unquantized layer
    outputs); a subclass such as ``QIGAutoRoundModifier`` has another name, so the pipeline would run
    every tuned layer again (in AutoRound's bfloat16) on float32 activations. Here the check is ``isinstance``.
    """
    if any(isinstance(m, AutoRoundModifier) for m in active_session().lifecycle.recipe.modifiers):
        dataset_args.propagate_error = False
    return _STOCK_SEQUENTIAL_PIPELINE(model, dataloader, dataset_args)


SequentialPipeline.__call__ = staticmethod(_sequential_pipeline)


class AutoRoundSeam(AutoRoundModifier):
    """``AutoRoundModifier`` whose block reconstruction loss a subclass can weight per token.

    Subclasses override :meth:`tuning_token_weights`: called with each decoder layer right before AutoRound
    tunes it, it returns one ``[batch, seq]`` weight tensor per calibration call of that layer (or None for
    stock's unweighted loss); the seam pads them as stock pads the layer's inputs (weight 0 on padding) and
    weights AutoRound's loss with them (:func:`weighted_block_loss`). The modifier's own hooks are off while
    AutoRound tunes the layer (its forwards are not calibration batches).
    """

    def tuning_token_weights(self, decoding_layer: torch.nn.Module) -> list[torch.Tensor] | None:
        """Per calibration call of ``decoding_layer``, in pipeline order, its tokens' weights ``[batch, seq]``."""
        return None

    def is_decoding_layer(self, module: torch.nn.Module) -> bool:
        """Whether AutoRound tunes ``module`` as one block (a decoder layer of the sequential targets)."""
        return self._is_decoding_layer(module)

    def apply_autoround(self, state, modules):
        layers = [m for m in modules or [] if self.is_decoding_layer(m)]
        weights = self.tuning_token_weights(layers[0]) if len(layers) == 1 else None
        if weights is None:
            return super().apply_autoround(state, modules)
        longest = max(w.shape[1] for w in weights)
        padded = torch.cat([torch.nn.functional.pad(w.float().cpu(), (0, longest - w.shape[1])) for w in weights])
        with weighted_block_loss(padded), hooks_disabled():
            return super().apply_autoround(state, modules)


# -- MoE experts --------------------------------------------------------------------------------------------------


def expert_token_rows(top_k_index: torch.Tensor, expert_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens ``LinearExperts2D.forward`` routes to one expert, in the order it gathers them.

    :param top_k_index: the router's choice ``[tokens, k]``
    :return: ``(top_k_position [routed], token_indices [routed])``, as its
        ``torch.where(one_hot(top_k_index).permute(2, 1, 0)[expert_index])``
    """
    return torch.where(top_k_index.t() == expert_index)


# the plugin's modifiers register at the end of their package's import (see qig_plugin.registry)
import qig_plugin.modifiers  # noqa: F401
