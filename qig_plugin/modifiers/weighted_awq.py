"""``TokenWeightedAWQModifier``: llm-compressor's AWQ search with a per-token weighted loss.

Stock AWQ picks, per mapping, the scale ``s = x_mean^alpha`` whose ``Q(W s) / s`` block
output is closest to the full-precision one, by an unweighted MSE over tokens. Here the
loss is ``sum_t lambda_t e_t / (H sum_t lambda_t)`` (MAE or MSE per element), ``lambda``
(``[batch, seq]`` per cached batch) comes from the subclass's one seam,
``mapping_token_weights``, and padding counts neither in the loss nor in ``x_mean``.
Everything else (grid, duo scaling, folding, the following quantization stage) is stock.
"""

from functools import partial

import torch
import torch.distributed as dist
from compressed_tensors.distributed import is_distributed
from llmcompressor.core import Event, State
from pydantic import PrivateAttr

from qig_plugin.attribution import block_input
from qig_plugin.attribution.weighted_calibration import (
    LossMode,
    masked_channel_abs_sum,
    weighted_reconstruction_error,
)
from qig_plugin.modifiers.block_attribution import TokenMasking
from qig_plugin.modifiers.experts import ExpertRoute, ExpertRoutingHooks
from qig_plugin.modifiers.language_model import language_model_name, scope_to_language_model
from qig_plugin.upstream import AWQMapping, AWQSearchSeam, ResolvedMapping, awq_mappings_of

__all__ = ["TokenWeightedAWQModifier"]


class TokenWeightedAWQModifier(TokenMasking, ExpertRoutingHooks, AWQSearchSeam):
    """AWQ with token weights in the grid-search loss. Takes every ``AWQModifier`` field, plus:

    :param loss_mode: ``"mae"`` (the QIG and MBQ references) or ``"mse"`` (stock AWQ)

    Without ``mappings``, the model's default AWQ mappings are scoped to its language
    model, so a VLM's vision tower never matches. On CPU-only torch, the cached batches
    are not pinned (llm-compressor 0.14.0.1 pins unconditionally and fails there; see
    :class:`~qig_plugin.upstream.AWQSearchSeam`).
    """

    loss_mode: LossMode = "mae"

    # per mapping parent: each calibration batch's kept tokens [batch, seq] (None: all)
    _token_keeps: dict[torch.nn.Module, list[torch.Tensor | None]] = PrivateAttr(default_factory=dict)
    # per smooth layer: [sum |x| over kept tokens [hidden], kept-token count]
    _kept_activation_stats: dict[str, list[torch.Tensor]] = PrivateAttr(default_factory=dict)
    # the weights [batch, seq] of each cached batch of the mapping being searched
    _loss_weights: list[torch.Tensor] | None = PrivateAttr(default=None)
    # MoE: per expert parent (a 2-D input of routed rows, e.g. an expert's down_proj) each
    # calibration batch's routed rows
    _expert_routes: dict[torch.nn.Module, list[ExpertRoute]] = PrivateAttr(default_factory=dict)

    def mapping_token_weights(
        self, mapping: ResolvedMapping, keeps: list[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        """Token weights ``[batch, seq]`` of each cached batch of ``mapping.parent``.

        :param mapping: the mapping about to be searched; its cached parent kwargs are
            ``self.cached_parent_calls(mapping)``, in calibration-batch order
        :param keeps: per batch, the tokens that count ``[batch, seq]`` (None: all);
            masked tokens must get weight 0. For a parent inside a MoE expert (2-D inputs
            ``[rows, features]``), ``self._expert_routes[mapping.parent]`` holds each batch's
            routed rows instead, and the weights are ``[rows]``.
        """
        raise NotImplementedError(f"{type(self).__name__} must define mapping_token_weights")

    def on_initialize(self, state: State, **kwargs) -> bool:
        if self.mappings is None:
            prefix = language_model_name(state.model)
            self.mappings = [
                AWQMapping(
                    scope_to_language_model(m.smooth_layer, prefix),
                    [scope_to_language_model(b, prefix) for b in m.balance_layers],
                    activation_hook_target=m.activation_hook_target,
                )
                for m in awq_mappings_of(state.model)
            ]
        return super().on_initialize(state, **kwargs)

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        super().on_calibration_start(state, event, **kwargs)
        self.start_expert_routing(state.model)
        for mapping in self.resolved_mappings:
            if mapping.parent not in self._token_keeps:
                self._token_keeps[mapping.parent] = []
                self.register_hook(
                    mapping.parent, partial(self._record_keep, mapping.parent), "forward_pre", with_kwargs=True
                )
            self.register_hook(
                mapping.activation_hook_target or mapping.balance_layers[0],
                partial(self._accumulate_kept_activations, mapping),
                "forward",
            )

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        super().on_calibration_end(state, event, **kwargs)
        self._token_keeps.clear()
        self._kept_activation_stats.clear()
        self._qig_token_mask = None
        self.stop_expert_routing()
        self._expert_routes.clear()

    def before_scale_search(self, mapping: ResolvedMapping) -> None:
        """The mapping's kept-token activation mean and token weights, right before its grid search."""
        keeps = self._token_keeps.pop(mapping.parent)
        self.set_activation_sum(mapping, *self._kept_activation_stats.pop(mapping.smooth_name))
        self._loss_weights = self.mapping_token_weights(mapping, keeps)

    def after_scale_search(self, mapping: ResolvedMapping) -> None:
        self._loss_weights = None

    def search_loss(self, fp_outputs: list[torch.Tensor], candidate_outputs: list[torch.Tensor]) -> float:
        """The weighted loss over this process's batches or, distributed, over every rank's (as stock AWQ sums)."""
        loss = weighted_reconstruction_error(fp_outputs, candidate_outputs, self._loss_weights, self.loss_mode)
        if not is_distributed():
            return loss
        # numerator and denominator summed over ranks, so every rank picks the same scales
        denominator = sum(
            (lam.double().sum().item() * out.shape[-1] for lam, out in zip(self._loss_weights, fp_outputs)), 0.0
        )
        sums = torch.tensor([loss * denominator, denominator], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        return (sums[0] / sums[1]).item()

    # forward pre-hook of a mapping parent: the kept tokens of this batch (an expert's: its routed rows)
    def _record_keep(self, parent: torch.nn.Module, _module, args: tuple, kwargs: dict):
        _, block_in = block_input(args, kwargs)
        if block_in.ndim == 2 and self.expert_routing.is_expert(parent):
            self._expert_routes.setdefault(parent, []).append(self.expert_routing.route(parent, block_in.shape[0]))
            self._token_keeps[parent].append(None)
            return
        self._token_keeps[parent].append(self.token_mask(block_in, kwargs))

    # forward hook of the hooked balance layer: x_mean's sum and count over kept tokens only
    def _accumulate_kept_activations(self, mapping: ResolvedMapping, _module, args: tuple, _output):
        keep = self._token_keeps[mapping.parent][-1]
        total, count = masked_channel_abs_sum(args[0], keep)
        stats = self._kept_activation_stats.setdefault(
            mapping.smooth_name, [torch.zeros_like(total.cpu()), torch.zeros_like(count)]
        )
        stats[0] += total.cpu()
        stats[1] += count


def _collective_device() -> torch.device:
    """Where a tensor must be for the process group's collectives: CPU for gloo, else the current accelerator."""
    if dist.get_backend() == "gloo" or not torch.accelerator.is_available():
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    return torch.device(accelerator.type, torch.accelerator.current_device_index())

