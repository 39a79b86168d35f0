"""``MBQModifier``: the MBQ baseline (modality-balanced token weights) in the same AWQ search.

MBQ (thu-nics/MBQ) weights the AWQ reconstruction loss by modality: answer tokens 1,
vision tokens ``r_l``, everything else 0, where ``r_l`` is layer ``l``'s ratio of the
caption loss's mean ``|dL/dY|`` on vision tokens to that on answer tokens, taken at
``o_proj`` (for the attention mappings) and ``down_proj`` (for the MLP mappings) from one
forward and backward pass of the full-precision model per calibration sample, and
floored at the median over layers. The search, quantizers and folding are
:class:`~qig_plugin.modifiers.weighted_awq.TokenWeightedAWQModifier`'s, shared with QIG-AWQ.

Answer tokens are the kept tokens (padding and ``loss_mask == 0`` are out) that are not
image tokens: with ``oneshot(..., use_loss_mask=True)`` and a loss mask marking only the
answer, that is MBQ's caption span exactly; without one, every real text token.
"""

from functools import partial

import torch
from llmcompressor.core import Event, State, active_session
from llmcompressor.utils.helpers import DisableQuantization, eval_context
from pydantic import PrivateAttr

from qig_plugin.attribution.weighted_calibration import modality_ratios
from qig_plugin.modifiers.language_model import decoder_layers
from qig_plugin.modifiers.weighted_awq import TokenWeightedAWQModifier
from qig_plugin.upstream import ResolvedMapping

__all__ = ["MBQModifier"]


class MBQModifier(TokenWeightedAWQModifier):
    """AWQ with MBQ's modality-balanced loss weights. Takes every ``AWQModifier`` field and
    ``loss_mode`` (``"mae"`` default, MBQ's choice, or ``"mse"``). Needs a VLM whose config
    names its image token (``image_token_id`` or ``image_token_index``) and calibration
    samples with images, and a ``QuantizationModifier`` or ``GPTQModifier`` after it.
    """

    # per decoder layer, the floored vision/answer gradient ratio at o_proj and at down_proj
    _attention_ratios: torch.Tensor | None = PrivateAttr(default=None)
    _mlp_ratios: torch.Tensor | None = PrivateAttr(default=None)
    # per calibration batch index, its image tokens [batch, seq]
    _vision_masks: dict[int, torch.Tensor] = PrivateAttr(default_factory=dict)

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        image_token = _image_token_id(state.model)
        _, layers = decoder_layers(state.model)
        self._attention_ratios, self._mlp_ratios = self._gradient_ratios(state, layers, image_token)
        super().on_calibration_start(state, event, **kwargs)
        self.register_hook(
            state.model.get_input_embeddings(), partial(self._record_vision_tokens, image_token), "forward_pre"
        )

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        super().on_calibration_end(state, event, **kwargs)
        self._vision_masks.clear()

    def mapping_token_weights(
        self, mapping: ResolvedMapping, keeps: list[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        ratio = self._mapping_ratio(mapping)
        weights = []
        for index, keep in enumerate(keeps):
            vision = self._vision_masks[index]
            keep = torch.ones_like(vision) if keep is None else keep.to(vision.device)
            answer = keep & ~vision
            weights.append(answer.float() + ratio * (keep & vision).float())
        return weights

    # r of the decoder layer holding the mapping: attention ratio inside self_attn, else the MLP's
    def _mapping_ratio(self, mapping: ResolvedMapping) -> float:
        _, layers = decoder_layers(active_session().state.model)
        for index, layer in enumerate(layers):
            if any(mapping.parent is m for m in layer.self_attn.modules()):
                return self._attention_ratios[index].item()
            if any(mapping.parent is m for m in layer.mlp.modules()):
                return self._mlp_ratios[index].item()
        raise ValueError(f"MBQModifier: {mapping.parent_name} is not inside a decoder layer's self_attn or mlp")

    # embedding pre-hook during calibration: remember which tokens of this batch are image tokens
    def _record_vision_tokens(self, image_token: int, _module, args: tuple):
        batch_index = active_session().state.current_batch_idx
        self._vision_masks[batch_index] = (args[0] == image_token).cpu()

    def _gradient_ratios(
        self, state: State, layers: torch.nn.ModuleList, image_token: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward and backward of the caption loss per calibration sample.

        :return: floored ratios ``[layers]`` at o_proj and at down_proj
        """
        model = state.model
        for index, layer in enumerate(layers):
            if not hasattr(layer.mlp, "down_proj"):
                raise ValueError(
                    f"MBQModifier measures gradients at each decoder layer's mlp.down_proj, but layer {index}'s mlp is "
                    f"a {type(layer.mlp).__name__} (mixture of experts) without one; use QIGAWQModifier or "
                    "QIGGPTQModifier for MoE models"
                )
        outputs = [layer.self_attn.o_proj for layer in layers] + [layer.mlp.down_proj for layer in layers]
        # per hooked output: [vision |g| sum, vision count, answer |g| sum, answer count], summed over samples
        totals = torch.zeros(len(outputs), 4, dtype=torch.float64)
        current: dict[str, torch.Tensor] = {}

        def capture(index, _module, _args, output):
            def on_grad(grad):
                magnitude = grad.detach().abs().mean(-1)  # [batch, seq]
                for column, mask in ((0, current["vision"]), (2, current["answer"])):
                    totals[index, column] += magnitude[mask.to(magnitude.device)].double().sum().cpu()
                    totals[index, column + 1] += mask.sum().item()

            output.register_hook(on_grad)

        handles = [m.register_forward_hook(partial(capture, i)) for i, m in enumerate(outputs)]
        embedding = model.get_input_embeddings().weight
        requires_grad = embedding.requires_grad
        embedding.requires_grad_(True)  # so every decoder output carries a gradient
        device = embedding.device
        try:
            with torch.enable_grad(), DisableQuantization(model), eval_context(model):
                for batch in state.data.calib:
                    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    keep = batch.pop("loss_mask", batch["attention_mask"]) != 0
                    current["vision"] = batch["input_ids"] == image_token
                    current["answer"] = keep & ~current["vision"]
                    labels = batch["input_ids"].masked_fill(~current["answer"], -100)
                    model(**batch, labels=labels, use_cache=False).loss.backward()
        finally:
            for handle in handles:
                handle.remove()
            embedding.requires_grad_(requires_grad)
            embedding.grad = None
        if (totals[:, 1] == 0).any():
            raise ValueError("MBQModifier: no calibration sample has image tokens; MBQ needs samples with images")
        vision, answer = totals[:, 0] / totals[:, 1], totals[:, 2] / totals[:, 3].clamp_min(1)
        count = len(layers)
        return (
            modality_ratios(vision[:count].float(), answer[:count].float()),
            modality_ratios(vision[count:].float(), answer[count:].float()),
        )


def _image_token_id(model: torch.nn.Module) -> int:
    config = model.config
    token = getattr(config, "image_token_id", None)
    token = getattr(config, "image_token_index", None) if token is None else token
    if token is None:
        raise ValueError(
            f"MBQModifier needs a VLM whose config names its image token (image_token_id or "
            f"image_token_index); {type(model).__name__} has neither. Use QIGAWQModifier for text-only models"
        )
    return token
