"""QIG token weights of one block's input, shared by every QIG modifier.

``QIGAttribution`` is a pydantic mixin: its ``qig_*`` fields (:class:`~qig_plugin.attribution.QIGSettings`)
become recipe fields of the modifier that inherits it, and its two public methods turn one batch
of a block's inputs into QIG token weights ``lambda`` (``[batch, seq]``, mean 1 over each sample's
kept tokens): :meth:`QIGAttribution.qig_scores` (through
:func:`~qig_plugin.attribution.attribute_block`) and :meth:`QIGAttribution.qig_weights`. The
modifiers differ only in where they read the block inputs (a forward pre-hook for GPTQ and
SmoothQuant, AWQ's cached parent calls) and in what they weight with ``lambda``.
"""

from collections.abc import Sequence
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationArgs
from llmcompressor.core import active_session
from pydantic import BaseModel, PrivateAttr

from qig_plugin.attribution import AttributionCache, QIGSettings, attribute_block, calibration_token_weights
from qig_plugin.upstream import hooks_disabled

__all__ = ["QIGAttribution", "TokenMasking", "attendable_tokens", "quantized_linears"]


class TokenMasking(BaseModel):
    """Which tokens of a batch count: pydantic mixin reading padding and ``loss_mask``."""

    # the last [batch, seq] token mask read from a 4-D attention mask (the decoder layer's
    # blocks after attention, e.g. the MLP, see no attention mask of their own)
    _qig_token_mask: torch.Tensor | None = PrivateAttr(default=None)

    def token_mask(self, block_in: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """Tokens of the block input ``[batch, seq, hidden]`` that count ``[batch, seq]`` (None: all).

        From the attention mask in ``kwargs`` (or the last one seen) and the batch's ``loss_mask``.
        """
        shape = block_in.shape[:2]
        attention_mask = kwargs.get("attention_mask")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 4:
            self._qig_token_mask = attendable_tokens(attention_mask)
        keep = self._qig_token_mask if _has_shape(self._qig_token_mask, shape) else None
        state = active_session().state
        if state.loss_masks is not None and 0 <= state.current_batch_idx < len(state.loss_masks):
            loss_mask = state.loss_masks[state.current_batch_idx]
            if _has_shape(loss_mask, shape):
                loss_keep = loss_mask.to(block_in.device) != 0
                keep = loss_keep if keep is None else keep & loss_keep
        return keep


class QIGAttribution(QIGSettings, TokenMasking):
    """QIG fields (:class:`~qig_plugin.attribution.QIGSettings`) and token weights, mixed into llm-compressor modifiers."""

    # node counts and Q(W) carried from one batch's attribution to the next
    _qig_cache: AttributionCache = PrivateAttr(default_factory=AttributionCache)

    def qig_scores(
        self,
        block: torch.nn.Module,
        weight_args: dict[torch.nn.Module, QuantizationArgs],
        args: tuple,
        kwargs: dict[str, Any],
        baseline_args: QuantizationArgs | None = None,
        input_linears: Sequence[torch.nn.Module] = (),
    ) -> torch.Tensor:
        """QIG scores ``[batch, seq]`` of ``block``'s input on one batch, with every modifier's hooks off.

        See :func:`~qig_plugin.attribution.attribute_block` for the arguments.
        """
        with hooks_disabled():
            return attribute_block(
                block, args, kwargs, weight_args, self, input_linears=input_linears, baseline_args=baseline_args,
                cache=self._qig_cache,
            ).scores

    def qig_weights(self, scores: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Token weights ``[batch, seq]`` from scores: clipped, mean 1 over each sample's kept tokens, 0 elsewhere."""
        return calibration_token_weights(scores, keep, self.iqr_multiplier)

    def token_mask(self, block_in: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor | None:
        return super().token_mask(block_in, kwargs) if self.qig_mask_padding else None


def quantized_linears(block: torch.nn.Module) -> dict[torch.nn.Module, QuantizationArgs]:
    """Every linear inside ``block`` with a weight quantization scheme -> its weight args."""
    return {
        module: module.quantization_scheme.weights
        for module in block.modules()
        if isinstance(module, torch.nn.Linear)
        and getattr(getattr(module, "quantization_scheme", None), "weights", None) is not None
    }


def _has_shape(tensor: torch.Tensor | None, shape: torch.Size) -> bool:
    return isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == tuple(shape)


def attendable_tokens(attention_mask: torch.Tensor) -> torch.Tensor:
    """A token is real if it may attend to itself: the diagonal of a ``[batch, 1, q, k]`` mask -> ``[batch, q]``."""
    diagonal = attention_mask[:, 0].diagonal(dim1=-2, dim2=-1)
    if attention_mask.dtype == torch.bool:
        return diagonal
    return diagonal == 0
