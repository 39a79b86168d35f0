"""QIG token weights for MoE experts: each expert is attributed on the tokens routed to it.

llm-compressor linearizes a MoE block's fused experts into ``LinearExperts2D``, a ``ModuleList`` of
expert MLPs called as ``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``
on the block's ``T = batch * seq`` flattened tokens. Expert ``e`` runs on the rows of the tokens
routed to it (``torch.where`` over the one-hot routing, in that order) or, in llm-compressor's
default ``moe_calibrate_all_experts`` mode, on all ``T`` rows, of which only the routed ones reach
the block output. Either way an expert's linears see 2-D inputs ``[rows, features]``, with no
batch or sequence axis to read token weights from.

The MoE block's output is ``sum_e r_te f_e(x_t)``, so the part of token ``t``'s quantization
discrepancy that flows through expert ``e`` is ``r_te (f_e(x_t; W) - f_e(x_t; Q(W)))``; ``r_te``
does not depend on the expert's input, so its integrated gradient is ``r_te`` times the expert's
own. The expert's token weights are therefore its QIG scores on its routed rows times their
routing weights, clipped and scaled to mean 1 over the routed rows like any other group's. In
all-experts mode the other rows (there only to fill the Hessian of rarely routed experts) keep
stock weight 1, so equal QIG scores and routing weights reproduce stock calibration exactly.
"""

from dataclasses import dataclass

import torch
from pydantic import BaseModel, PrivateAttr

from qig_plugin.attribution import calibration_token_weights
from qig_plugin.upstream import LinearExperts2D, expert_token_rows

__all__ = ["ExpertRoute", "ExpertRouting", "ExpertRoutingHooks", "expert_token_weights", "routed_call"]


@dataclass
class ExpertRoute:
    """Which rows of one expert call's input are routed tokens.

    :param rows: indices ``[routed]`` into the expert's input rows, in the order the experts module
        routes them (all of them when the expert ran on the routed rows only)
    :param routing_weights: the router's weight of the expert for each routed row ``[routed]``
    :param total_rows: rows of the expert's input (``T`` in all-experts mode, else ``routed``)
    """

    rows: torch.Tensor
    routing_weights: torch.Tensor
    total_rows: int


class ExpertRouting:
    """The routing of every linearized experts module of a model, recorded on each of its calls.

    :param model: the model; its ``LinearExperts2D`` modules are found by type, whatever their names
    """

    def __init__(self, model: torch.nn.Module):
        self.experts_modules = [m for m in model.modules() if isinstance(m, LinearExperts2D)]
        # every module inside an expert (the expert MLP and its linears) -> (experts module, expert index)
        self._owner: dict[torch.nn.Module, tuple[LinearExperts2D, int]] = {}
        for experts in self.experts_modules:
            for index in range(experts.num_experts):
                for module in experts[index].modules():
                    self._owner[module] = (experts, index)
        # experts module -> (top_k_index [T, k], top_k_weights [T, k]) of its latest call
        self._latest: dict[LinearExperts2D, tuple[torch.Tensor, torch.Tensor]] = {}

    def record_hook(self, experts: LinearExperts2D, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of an experts module (register with ``with_kwargs=True``)."""
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        self._latest[experts] = (values["top_k_index"].detach(), values["top_k_weights"].detach())

    def is_expert(self, module: torch.nn.Module) -> bool:
        return module in self._owner

    def route(self, module: torch.nn.Module, input_rows: int) -> ExpertRoute | None:
        """The routed rows of the input ``[input_rows, features]`` that ``module`` (inside an expert) sees now.

        :return: None when ``module`` is in no expert or its experts module has not run yet
        :raises ValueError: when ``input_rows`` matches neither the routed count nor ``T``
        """
        if module not in self._owner:
            return None
        experts, index = self._owner[module]
        if experts not in self._latest:
            return None
        top_k_index, top_k_weights = self._latest[experts]
        top_k_position, token_indices = expert_token_rows(top_k_index, index)
        routing_weights = top_k_weights[token_indices, top_k_position].float()
        if input_rows == token_indices.numel():
            rows = torch.arange(input_rows, device=token_indices.device)
        elif input_rows == top_k_index.shape[0]:
            rows = token_indices
        else:
            raise ValueError(
                f"an expert of {type(experts).__name__} got {input_rows} input rows, but {token_indices.numel()} "
                f"tokens are routed to it out of {top_k_index.shape[0]}: QIG cannot tell which rows are which "
                "tokens; quantize this model's experts with the stock modifier (ignore them in the QIG stage)"
            )
        return ExpertRoute(rows, routing_weights, input_rows)


def routed_call(args: tuple, kwargs: dict, position: int | str, route: ExpertRoute) -> tuple[tuple, dict]:
    """The block call with its 2-D input ``[rows, features]`` cut to the routed rows, as ``[1, routed, features]``.

    :param position: where the input sits (``block_input``'s first result): a positional index or a keyword
    """
    if isinstance(position, int):
        return (args[position][route.rows].unsqueeze(0), *args[position + 1:]), kwargs
    return args, {**kwargs, position: kwargs[position][route.rows].unsqueeze(0)}


def expert_token_weights(scores: torch.Tensor, route: ExpertRoute, iqr_k: float | None) -> torch.Tensor:
    """Token weights of every input row of one expert call.

    :param scores: the expert's QIG scores on its routed rows ``[1, routed]``
    :param route: which input rows those are, and their routing weights
    :param iqr_k: the IQR clipping multiplier (None: no clipping)
    :return: weights ``[total_rows]``: routed rows get ``scores * routing_weights`` clipped and scaled
        to mean 1 over the routed rows; other rows (all-experts mode) keep weight 1
    """
    weights = torch.ones(route.total_rows, device=scores.device)
    routed = route.rows.numel()
    if routed:
        routed_scores = scores.float() * route.routing_weights.to(scores.device).unsqueeze(0)
        weights[route.rows.to(scores.device)] = calibration_token_weights(routed_scores, None, iqr_k)[0]
    return weights


class ExpertRoutingHooks(BaseModel):
    """Pydantic mixin for a modifier: records the routing of every linearized experts module on each call.

    Call :meth:`start_expert_routing` at calibration start (it registers the modifier's hooks) and
    :meth:`stop_expert_routing` at its end; in between, :attr:`expert_routing` answers which rows of an
    expert's input are which tokens.
    """

    _expert_routing: ExpertRouting | None = PrivateAttr(default=None)

    @property
    def expert_routing(self) -> ExpertRouting:
        return self._expert_routing

    def start_expert_routing(self, model: torch.nn.Module) -> None:
        self._expert_routing = ExpertRouting(model)
        for experts in self._expert_routing.experts_modules:
            self.register_hook(experts, self._expert_routing.record_hook, "forward_pre", with_kwargs=True)

    def stop_expert_routing(self) -> None:
        self._expert_routing = None
