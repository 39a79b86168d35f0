"""What a few families do differently, checked under QIG-GPTQ: Gemma 3's two attention variants, Qwen3-VL's
DeepStack injection, and a linear the plugin cannot place."""

import types

import pytest
import torch

import qig_plugin  # noqa: F401  (registers the modifiers)
from qig_plugin.modifiers import QIGGPTQModifier
from qig_plugin.modifiers.language_model import decoder_layers
from qig_plugin.quantize import quantize_to_checkpoint
from tests.tiny_models import tiny_gemma3, tiny_qwen3_vl, tiny_text_llm

RECIPE = """
quant_stage:
  quant_modifiers:
    QIGGPTQModifier:
      qig_steps: 2
      ignore: {ignore}
      config_groups:
        group_0:
          targets: [Linear]
          weights: {{num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 64}}
"""


def _recipe(ignore):
    return RECIPE.format(ignore=[str(pattern) for pattern in ignore]).replace("'", '"')


def _may_attend(mask: torch.Tensor) -> torch.Tensor:
    """``[batch, 1, q, k]`` attention mask -> bool, True where query q may attend key k."""
    return mask if mask.dtype == torch.bool else mask == 0


def test_gemma3_attention_is_attributed_with_each_layers_own_mask(tmp_path, monkeypatch):
    tiny = tiny_gemma3(tmp_path / "model")
    text = tiny.model.config.get_text_config()
    assert text.layer_types == ["sliding_attention", "full_attention"]
    masks = {}
    real = QIGGPTQModifier.group_weights

    def record(self, group, args, kwargs):
        if group.block_name.endswith("self_attn"):
            masks.setdefault(group.block_name, _may_attend(kwargs["attention_mask"]))
        return real(self, group, args, kwargs)

    monkeypatch.setattr(QIGGPTQModifier, "group_weights", record)
    quantize_to_checkpoint(tiny.model, tiny.processor, _recipe(tiny.ignore), tiny.dataset, tmp_path / "out")

    layers_name, _ = decoder_layers(tiny.model)
    sliding, full = masks[f"{layers_name}.0.self_attn"], masks[f"{layers_name}.1.self_attn"]
    last = sliding.shape[-2] - 1
    assert last > text.sliding_window
    assert not sliding[0, 0, last, 0] and sliding[0, 0, last, last]  # the first token is out of the window
    assert full[0, 0, last, 0] and full[0, 0, last, last]  # the global layer sees it


def test_qwen3_vl_deepstack_features_reach_the_next_layers_attribution(tmp_path, monkeypatch):
    tiny = tiny_qwen3_vl(tmp_path / "model")
    assert tiny.model.config.vision_config.deepstack_visual_indexes == [0]
    _, layers = decoder_layers(tiny.model)
    layer0_outputs, layer1_inputs, attributed = [], [], []
    layers[0].register_forward_hook(
        lambda m, args, output: layer0_outputs.append(output[0] if isinstance(output, tuple) else output)
    )
    layers[1].register_forward_pre_hook(
        lambda m, args, kwargs: layer1_inputs.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    real = QIGGPTQModifier.group_weights

    def record(self, group, args, kwargs):
        if group.block is layers[1].self_attn:
            attributed.append(True)
        return real(self, group, args, kwargs)

    monkeypatch.setattr(QIGGPTQModifier, "group_weights", record)
    quantize_to_checkpoint(tiny.model, tiny.processor, _recipe(tiny.ignore), tiny.dataset, tmp_path / "out")

    injected = (layer1_inputs[-1] - layer0_outputs[-1])[0].abs().amax(-1)  # [seq], the last batch
    (row,) = [row for row in tiny.dataset if len(row["input_ids"]) == injected.shape[0]]
    image = torch.tensor(row["input_ids"]) == tiny.model.config.image_token_id
    assert (injected[image] > 0).all() and (injected[~image] == 0).all()
    assert len(attributed) == len(tiny.dataset)  # QIG attributed layer 1's attention on those inputs


def _llama_layer_forward_without_the_mlp_module(self, hidden_states, attention_mask=None, position_ids=None,
                                                past_key_values=None, use_cache=False, position_embeddings=None,
                                                **kwargs):
    """LlamaDecoderLayer.forward, but the MLP's linears are called one by one, never through ``self.mlp``."""
    residual = hidden_states
    hidden_states, _ = self.self_attn(
        hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
        position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
        position_embeddings=position_embeddings, **kwargs,
    )
    hidden_states = residual + hidden_states
    x = self.post_attention_layernorm(hidden_states)
    mlp = self.mlp
    return hidden_states + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


def test_a_linear_called_outside_its_group_block_is_named_in_the_error(tmp_path):
    tiny = tiny_text_llm(tmp_path / "model", "llama")
    _, layers = decoder_layers(tiny.model)
    layers[0].forward = types.MethodType(_llama_layer_forward_without_the_mlp_module, layers[0])
    with pytest.raises(ValueError, match=r"QIG could not place model\.layers\.0\.mlp\.(gate|up)_proj.*model\.layers\.0\.mlp\b"):
        quantize_to_checkpoint(tiny.model, tiny.processor, _recipe(tiny.ignore), tiny.dataset, tmp_path / "out")
    assert not (tmp_path / "out").exists()
