"""QIG token weights of one sample, and the picture ``qig explain`` draws of them.

:func:`explain_sample` runs the full-precision model once on one image/prompt/answer sample,
catches the input of every decoder layer's attention (the q/k/v group) and MLP (the gate/up
group), and scores each token with the attribution calibration uses: the sub-layer groups
QIG-GPTQ resolves for the recipe's targets, ``Q(W)`` of the recipe's targeted linears on its
weight grid, :func:`~qig_plugin.attribution.attribute_block` with the recipe's ``qig_*``
settings, and token weights with mean 1 over the sample. :func:`plot_explanation` draws
the weights over the image patches and the text tokens, and how each layer's weight mass
splits between vision, prompt and answer tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qig_plugin.attribution import AttributionCache, attribute_block, calibration_token_weights, settings_of
from qig_plugin.data.calibration import IMAGE_PLACEHOLDER_TOKENS, CalibrationRecord, build_calibration_dataset
from qig_plugin.modifiers.groups import resolve_groups, targeted_linears
from qig_plugin.modifiers.language_model import decoder_layers

GROUPS = ("attention", "mlp")
GROUP_TITLES = {"attention": "attention (q/k/v)", "mlp": "MLP (gate/up)"}
ROLES = ("vision", "prompt", "answer")
ROLE_COLOURS = {"vision": "#4c72b0", "prompt": "#dd8452", "answer": "#55a868"}


@dataclass
class Explanation:
    """QIG token weights of one sample.

    :param tokens: the sample's tokens as text, ``seq`` of them
    :param roles: ``"vision"`` (image placeholders), ``"prompt"`` (template, system and user turn) or
        ``"answer"`` (the assistant turn) per token
    :param image: the pixels the vision tower sees, ``[H, W, 3]`` in ``[0, 1]`` (None without an image)
    :param weights: ``(layer index, group)`` -> token weights ``[seq]``, mean 1 over the sample
    """

    tokens: list[str]
    roles: list[str]
    image: np.ndarray | None
    image_token_id: int | None
    input_ids: list[int]
    weights: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    @property
    def image_positions(self) -> list[int]:
        """Positions of the image-patch tokens (``<image>``), in patch order."""
        return [index for index, token_id in enumerate(self.input_ids) if token_id == self.image_token_id]

    def mass_by_role(self, layer: int, group: str) -> dict[str, float]:
        """Fraction of the weight mass of ``(layer, group)`` on each role; the fractions sum to 1."""
        weights = self.weights[(layer, group)]
        total = float(weights.sum())
        roles = np.array(self.roles)
        return {role: float(weights[torch.from_numpy(roles == role)].sum()) / total for role in ROLES}


def _prompt_length(record: CalibrationRecord, processor) -> int:
    """Tokens before the answer: the sample rendered up to the assistant's turn, with its image expanded."""
    content = [{"type": "image"}] if record.image is not None else []
    content.append({"type": "text", "text": record.prompt})
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    images = [[record.image]] if record.image is not None else None
    return len(processor(text=[text], images=images, add_special_tokens=False)["input_ids"][0])


def _seen_image(pixel_values: torch.Tensor, image_processor) -> np.ndarray:
    """Un-normalize the first image ``[3, H, W]`` of ``pixel_values`` ``[1, n, 3, H, W]`` to ``[H, W, 3]``."""
    mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    return (pixel_values[0, 0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def recipe_quantization(modifiers: list):
    """What a recipe's calibration attributes with: its weight quantization config and its QIG settings.

    :param modifiers: the recipe's modifiers, in order
    :return: the quantization config of its first quantizing modifier (the scheme ``Q(W)`` uses; a
        QIG-AWQ or QIG-SmoothQuant stage reads it from the stage after it, as here) and the ``qig_*``
        settings of its first QIG modifier (the defaults for a stock recipe)
    :raises ValueError: when no modifier quantizes weights
    """
    from qig_plugin.attribution import QIGSettings

    configs = [
        modifier.resolve_quantization_config()
        for modifier in modifiers
        if hasattr(modifier, "resolve_quantization_config")
    ]
    configs = [config for config in configs if any(s.weights is not None for s in config.config_groups.values())]
    if not configs:
        raise ValueError("the recipe quantizes no weights, so there is no Q(W) to attribute; give a recipe with a "
                         "quantizing modifier (GPTQModifier, QIGGPTQModifier, QuantizationModifier)")
    qig_modifiers = [modifier for modifier in modifiers if isinstance(modifier, QIGSettings)]
    return configs[0], settings_of(qig_modifiers[0] if qig_modifiers else None)


def explain_sample(model: torch.nn.Module, processor, record: CalibrationRecord, modifiers: list) -> Explanation:
    """QIG token weights of every decoder layer's attention and MLP group on one sample.

    :param model: the full-precision model (float32)
    :param processor: its processor; the sample is rendered as in calibration
    :param record: the sample
    :param modifiers: the recipe's modifiers (see :func:`recipe_quantization`)
    """
    config, settings = recipe_quantization(modifiers)
    row = build_calibration_dataset([record], processor).with_format("torch")[0]
    inputs = {name: value.unsqueeze(0) for name, value in row.items() if name != "loss_mask"}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].float()
    input_ids = row["input_ids"].tolist()
    prompt_length = _prompt_length(record, processor)
    placeholder_ids = {processor.tokenizer.convert_tokens_to_ids(token) for token in IMAGE_PLACEHOLDER_TOKENS}
    roles = [
        "vision" if token_id in placeholder_ids else "answer" if index >= prompt_length else "prompt"
        for index, token_id in enumerate(input_ids)
    ]

    _, layers = decoder_layers(model)
    drawn_blocks = {}
    for layer_index, layer in enumerate(layers):
        drawn_blocks[layer.self_attn] = (layer_index, "attention")
        drawn_blocks[layer.mlp] = (layer_index, "mlp")
    groups = [g for g in resolve_groups(model, targeted_linears(model, config)) if g.block in drawn_blocks]
    if not groups:
        raise ValueError("the recipe targets no attention or MLP linears of the decoder layers; nothing to explain")
    calls: dict[int, tuple[tuple, dict]] = {}
    handles = [
        group.block.register_forward_pre_hook(
            lambda _module, args, kwargs, index=index: calls.__setitem__(index, (args, kwargs)), with_kwargs=True
        )
        for index, group in enumerate(groups)
    ]
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    explanation = Explanation(
        tokens=[processor.tokenizer.decode([token_id]) for token_id in input_ids],
        roles=roles,
        image=_seen_image(inputs["pixel_values"], processor.image_processor) if "pixel_values" in inputs else None,
        image_token_id=getattr(model.config, "image_token_id", None),
        input_ids=input_ids,
    )
    cache = AttributionCache()
    for index, group in enumerate(groups):
        args, kwargs = calls[index]
        attribution = attribute_block(
            group.block, args, kwargs, group.weight_args, settings, input_linears=group.linears, cache=cache
        )
        weights = calibration_token_weights(attribution.scores, None, settings.iqr_multiplier)
        explanation.weights[drawn_blocks[group.block]] = weights[0].detach()
    return explanation


def _patch_grid(count: int) -> tuple[int, int]:
    """Rows and columns of ``count`` patch tokens: a square grid (Idefics3's pixel shuffle keeps row-major order)."""
    side = math.isqrt(count)
    return (side, side) if side * side == count else (1, count)


def _draw_image(axis, explanation: Explanation, weights: torch.Tensor, norm, colormap) -> None:
    positions = explanation.image_positions
    axis.set_xticks([])
    axis.set_yticks([])
    if explanation.image is None or not positions:
        axis.text(0.5, 0.5, "no image", ha="center", va="center", transform=axis.transAxes)
        return
    rows, columns = _patch_grid(len(positions))
    grid = weights[positions].reshape(rows, columns).numpy()
    height, width = explanation.image.shape[:2]
    axis.imshow(explanation.image, extent=(0, width, height, 0))
    axis.imshow(grid, extent=(0, width, height, 0), cmap=colormap, norm=norm, alpha=0.6, interpolation="nearest")


# black text on light boxes, white on dark ones (relative luminance of the box colour)
def _label_colour(box_colour) -> str:
    from matplotlib.colors import to_rgb

    red, green, blue = to_rgb(box_colour)
    return "black" if 0.2126 * red + 0.7152 * green + 0.0722 * blue > 0.45 else "white"


def _draw_tokens(axis, explanation: Explanation, weights: torch.Tensor, norm, colormap, line_chars: int = 150) -> None:
    """Text tokens as coloured boxes in reading order; the image's patch tokens become one grey chip."""
    axis.set_axis_off()
    image_positions = set(explanation.image_positions)
    column, line = 0, 0
    chip_drawn = False
    for index, token in enumerate(explanation.tokens):
        if index in image_positions:
            if chip_drawn:
                continue
            label, colour = f"[{len(image_positions)} image patches]", "#dddddd"
            chip_drawn = True
        else:
            label, colour = token.replace("\n", "\\n"), colormap(norm(float(weights[index])))
        width = len(label) + 1
        if column + width > line_chars:
            column, line = 0, line + 1
        axis.text(
            column / line_chars, 1 - line * 0.11, label, family="monospace", fontsize=7, va="top",
            color=_label_colour(colour), transform=axis.transAxes,
            bbox=dict(boxstyle="square,pad=0.1", facecolor=colour, edgecolor="none"),
        )
        column += width


def plot_explanation(explanation: Explanation, layers: list[int], path: Path, title: str) -> None:
    """Write a PNG: per chosen layer and group, the image heatmap beside the coloured text tokens;
    below, per group, each layer's weight mass split between vision, prompt and answer tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    colormap = plt.get_cmap("magma_r")
    shown = [(layer, group) for layer in layers for group in GROUPS if (layer, group) in explanation.weights]
    norm = Normalize(0.0, max(float(explanation.weights[key].max()) for key in shown))
    figure = plt.figure(figsize=(13, 1.9 * len(shown) + 3.2), layout="constrained")
    grid = figure.add_gridspec(len(shown) + 1, 2, width_ratios=(1, 5), height_ratios=[1] * len(shown) + [1.3])
    for row, (layer, group) in enumerate(shown):
        weights = explanation.weights[(layer, group)]
        image_axis = figure.add_subplot(grid[row, 0])
        _draw_image(image_axis, explanation, weights, norm, colormap)
        image_axis.set_ylabel(f"layer {layer}\n{GROUP_TITLES[group]}", fontsize=8)
        _draw_tokens(figure.add_subplot(grid[row, 1]), explanation, weights, norm, colormap)
    figure.colorbar(
        plt.cm.ScalarMappable(norm=norm, cmap=colormap), ax=figure.axes, shrink=0.5, label="QIG token weight (mean 1)"
    )

    summary = grid[len(shown), :].subgridspec(1, len(GROUPS))
    for column, group in enumerate(GROUPS):
        axis = figure.add_subplot(summary[0, column])
        group_layers = sorted(layer for layer, name in explanation.weights if name == group)
        bottom = np.zeros(len(group_layers))
        for role in ROLES:
            mass = np.array([explanation.mass_by_role(layer, group)[role] for layer in group_layers])
            axis.bar(group_layers, mass, bottom=bottom, color=ROLE_COLOURS[role], label=role, width=0.85)
            bottom += mass
        token_share = {role: explanation.roles.count(role) / len(explanation.roles) for role in ROLES}
        axis.set_title(
            f"{GROUP_TITLES[group]}: weight mass per layer (token share: "
            + ", ".join(f"{role} {share:.0%}" for role, share in token_share.items()) + ")",
            fontsize=8,
        )
        axis.set_xlabel("decoder layer", fontsize=8)
        axis.set_ylim(0, 1)
        axis.tick_params(labelsize=7)
    axis.legend(fontsize=7, loc="lower right")
    figure.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")  # the PNG appears only once complete
    try:
        figure.savefig(partial, dpi=110, format="png")
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
        plt.close(figure)
