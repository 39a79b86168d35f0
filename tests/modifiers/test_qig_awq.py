import json
from dataclasses import dataclass, field

import pytest
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
from safetensors.torch import load_file

import qig_plugin  # noqa: F401  (registers the modifiers)
from qig_plugin.modifiers import QIGAWQModifier
from qig_plugin.upstream import unpinned_caches_without_accelerator
from qig_plugin.modifiers.language_model import language_model_name, scope_to_language_model
from qig_plugin.quantize import quantize_to_checkpoint
from tests.modifiers.tiny_llama import SEQ, VOCAB, calibrate_tiny_llama, load_tiny_llama, tiny_tokenizer
from tests.tiny_models import IDEFICS3_IGNORE, tiny_idefics3

SAMPLES = 4
W4A16 = {"targets": ["Linear"], "scheme": "W4A16", "ignore": ["lm_head"]}

# test_qig_weights_change_the_chosen_scales: one token alone carries a massive activation on a few channels
OUTLIER_TOKEN = 2
OUTLIER_POSITIONS = [5, 17]  # of every calibration sample
OUTLIER_CHANNELS = list(range(8))
OUTLIER_EMBEDDING = 100.0  # dwarfs what attention and the MLPs add to the outlier token's residual
OUTLIER_GAIN = 10.0  # the post-attention norms' weight on the outlier channels
# the mappings whose parent (the MLP, down_proj) computes each token's output from that token alone
MLP_MAPPINGS = [f"model.layers.{i}.{name}" for i in range(2) for name in ("post_attention_layernorm", "mlp.up_proj")]
WEIGHTED_BAND = 0.05  # grid points the weighted search might pick: within this of its minimum
STOCK_MARGIN = 0.25  # how far above its minimum stock's loss must be at every one of them


def quantize(model_dir, awq, output_dir):
    model = calibrate_tiny_llama(
        model_dir,
        [awq, QuantizationModifier(**W4A16)],
        samples=SAMPLES,
        shuffle_calibration_samples=False,  # the same batch order in every run
    )
    model.save_pretrained(output_dir, save_compressed=True)
    return load_file(output_dir / "model.safetensors")


@pytest.fixture(autouse=True)
def stock_awq_runs_on_cpu():
    """Stock AWQ 0.14.0.1 pins its cache unconditionally, which fails on CPU-only torch."""
    with unpinned_caches_without_accelerator():
        yield


@pytest.fixture
def chosen_scales(monkeypatch):
    """Every scale AWQ's grid search returns, in call order (stock and QIG both go through it)."""
    scales = []
    real = AWQModifier._compute_best_scale

    def record(self, mapping, fp16_outputs, orig_layer_weights):
        best = real(self, mapping, fp16_outputs, orig_layer_weights)
        scales.append((mapping.smooth_name, best))
        return best

    monkeypatch.setattr(AWQModifier, "_compute_best_scale", record)
    return scales


@dataclass
class GridSearch:
    smooth_name: str
    losses: list[float] = field(default_factory=list)  # one per grid point
    scale: torch.Tensor | None = None  # the chosen one


@pytest.fixture
def grid_searches(monkeypatch):
    """Every AWQ grid search, in call order, with the loss of each grid point (stock and QIG alike)."""
    searches = []
    real = AWQModifier._compute_best_scale

    def record(self, mapping, fp16_outputs, orig_layer_weights):
        search = GridSearch(mapping.smooth_name)
        searches.append(search)
        modifier_type = type(self)
        own_loss = modifier_type.__dict__.get("_compute_loss")
        real_loss = modifier_type._compute_loss  # whichever the search calls: stock's MSE or the weighted seam's

        def recorded_loss(modifier, fp16_outputs, int_w_outputs):
            loss = real_loss(modifier, fp16_outputs, int_w_outputs)
            search.losses.append(loss)
            return loss

        modifier_type._compute_loss = recorded_loss
        try:
            search.scale = real(self, mapping, fp16_outputs, orig_layer_weights)
        finally:
            if own_loss is None:
                del modifier_type._compute_loss
            else:
                modifier_type._compute_loss = own_loss
        return search.scale

    monkeypatch.setattr(AWQModifier, "_compute_best_scale", record)
    return searches


@pytest.fixture
def outlier_llama_dir(tiny_llama_dir, tmp_path):
    """The tiny Llama in which only ``OUTLIER_TOKEN`` uses ``OUTLIER_CHANNELS``, with a massive activation.

    Its embedding is ``OUTLIER_EMBEDDING`` on those channels and 0 elsewhere; every other token's embedding
    is 0 on them, attention neither reads nor writes them, and no MLP writes them. So in every layer the
    residual stream is 0 on the outlier channels at every other token, and the outlier token's is almost
    all there; each post-attention norm multiplies them by ``OUTLIER_GAIN``.
    """
    model = load_tiny_llama(tiny_llama_dir)
    channels = OUTLIER_CHANNELS
    with torch.no_grad():
        embedding = model.model.embed_tokens.weight
        embedding[:, channels] = 0
        embedding[OUTLIER_TOKEN] = 0
        embedding[OUTLIER_TOKEN, channels] = OUTLIER_EMBEDDING
        for layer in model.model.layers:
            attention = layer.self_attn
            for linear in (attention.q_proj, attention.k_proj, attention.v_proj):
                linear.weight[:, channels] = 0
            attention.o_proj.weight[channels] = 0
            layer.mlp.down_proj.weight[channels] = 0
            layer.post_attention_layernorm.weight[channels] = OUTLIER_GAIN
    path = tmp_path / "outlier_llama"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def calibrate_on_outliers(model_dir, awq):
    """``awq`` then W4A16 through the real ``oneshot``, on samples with ``OUTLIER_TOKEN`` at ``OUTLIER_POSITIONS``."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(OUTLIER_TOKEN + 1, VOCAB, (SAMPLES, SEQ), generator=generator)
    ids[:, OUTLIER_POSITIONS] = OUTLIER_TOKEN
    oneshot(
        model=load_tiny_llama(model_dir),
        processor=tiny_tokenizer(),
        dataset=Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}),
        recipe=[awq, QuantizationModifier(**W4A16)],
        num_calibration_samples=SAMPLES,
        max_seq_length=SEQ,
        pipeline="sequential",
        shuffle_calibration_samples=False,
    )


def stock_excess_near_weighted_best(stock_losses: list[float], weighted_losses: list[float]) -> float:
    """The least relative excess of stock's loss over its minimum at the grid points whose weighted loss is
    within ``WEIGHTED_BAND`` of its own minimum: how far stock AWQ is from any choice the weighted search may make."""
    stock = torch.tensor(stock_losses, dtype=torch.float64)
    weighted = torch.tensor(weighted_losses, dtype=torch.float64)
    near_best = weighted <= (1 + WEIGHTED_BAND) * weighted.min()
    return (stock[near_best] / stock.min() - 1).min().item()


def test_equal_weights_choose_the_stock_awq_scales(tiny_llama_dir, tmp_path, monkeypatch, chosen_scales):
    stock = quantize(tiny_llama_dir, AWQModifier(), tmp_path / "stock")
    stock_scales = list(chosen_scales)
    chosen_scales.clear()

    calls = []
    real_token_weights = QIGAWQModifier.qig_weights

    def weights_of_one(self, scores, keep):
        calls.append(real_token_weights(self, scores, keep))  # the full QIG path still runs
        return torch.ones_like(scores)

    monkeypatch.setattr(QIGAWQModifier, "qig_weights", weights_of_one)
    ones = quantize(tiny_llama_dir, QIGAWQModifier(loss_mode="mse", qig_steps=2), tmp_path / "ones")

    # 2 layers x (q/k/v, gate/up, down); v -> o is skipped by AWQ for GQA shapes
    assert len(calls) == SAMPLES * 2 * 3 and len(stock_scales) == 2 * 3
    assert [name for name, _ in chosen_scales] == [name for name, _ in stock_scales]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(chosen_scales, stock_scales))
    assert stock.keys() == ones.keys()
    assert all(torch.equal(stock[name], ones[name]) for name in stock)


def test_qig_weights_change_the_chosen_scales(outlier_llama_dir, monkeypatch, grid_searches):
    """QIG weights that give the tokens carrying the outliers weight 0 move AWQ's choice on every MLP mapping.

    On ``outlier_llama_dir``, ``OUTLIER_TOKEN`` alone has a massive activation on ``OUTLIER_CHANNELS``. Its
    QIG weight is set to 0 (every other token keeps its own, renormalized), so the weighted search sees the
    other tokens only, and stock AWQ's unweighted MSE is dominated by the outlier tokens:

    - post_attention_layernorm -> gate/up (both layers): an outlier token's MLP input lies on the outlier
      channels (times ``OUTLIER_GAIN``), every other token's is 0 there. The outlier tokens' error comes only
      from the gate/up columns of those channels, which the candidate scales protect more as the ratio grows
      (their ``x_mean`` is the largest); the other tokens' error only from the other columns, which lose
      precision as the outlier columns take over each row's quantization range. Stock picks grid point 7-14
      of 0-19, the weighted search 0-1.
    - up_proj -> down_proj (both layers): the outlier tokens' down_proj input, one vector ~150x the others',
      sets ``x_mean``; following it helps them and only costs the others. Stock picks 4-6, weighted 1.
    - input_layernorm -> q/k/v: attention does not read the outlier channels, so nothing forces a change
      (the other tokens' QIG weights may or may not move these); not asserted.

    The weighted loss spreads over the 88 other tokens and 120 channels; the stock one is dominated by the 8
    outlier tokens' error on the few outlier columns, so a rounding that flips in ``Q(W s)`` moves it far
    more. AVX2 or AVX-512 kernels and thread counts changed neither to 0.1%; a model whose weights
    differ in their last bits (torch's scalar init, as on CPUs without AVX2) moved the weighted loss ratios
    by under 0.5% and the stock ones by up to 18%. So the weighted search picks within ``WEIGHTED_BAND`` (5%)
    of its minimum on any machine, and on each asserted mapping stock's loss is more than ``STOCK_MARGIN``
    (25%) above its minimum at every such grid point (measured: 32% to 127%): stock cannot pick them.
    """
    calibrate_on_outliers(outlier_llama_dir, AWQModifier())
    stock = list(grid_searches)
    grid_searches.clear()

    calls = []
    real_token_weights = QIGAWQModifier.qig_weights

    def outliers_weigh_nothing(self, scores, keep):
        weights = real_token_weights(self, scores, keep).clone()  # the full QIG path runs
        calls.append(weights)
        weights[:, OUTLIER_POSITIONS] = 0
        kept = torch.ones_like(weights) if keep is None else keep.to(weights.dtype)
        return weights * kept.sum(-1, keepdim=True) / weights.sum(-1, keepdim=True)  # mean 1 over kept tokens

    monkeypatch.setattr(QIGAWQModifier, "qig_weights", outliers_weigh_nothing)
    calibrate_on_outliers(outlier_llama_dir, QIGAWQModifier(loss_mode="mse", qig_steps=2))
    weighted = list(grid_searches)

    # 2 layers x (q/k/v, gate/up, down); v -> o is skipped by AWQ for GQA shapes
    assert len(calls) == SAMPLES * 2 * 3
    assert [s.smooth_name for s in weighted] == [s.smooth_name for s in stock] and len(stock) == 2 * 3
    assert set(MLP_MAPPINGS) <= {s.smooth_name for s in stock}
    for plain, weighed in zip(stock, weighted):
        assert len(plain.losses) == len(weighed.losses) == AWQModifier().n_grid
        if plain.smooth_name in MLP_MAPPINGS:
            excess = stock_excess_near_weighted_best(plain.losses, weighed.losses)
            assert excess > STOCK_MARGIN, f"{plain.smooth_name}: stock's loss only {excess:.1%} above its best"
            assert not torch.equal(plain.scale, weighed.scale), plain.smooth_name


def test_default_mappings_are_scoped_to_the_language_model(tmp_path):
    tiny = tiny_idefics3(tmp_path / "model")
    assert language_model_name(tiny.model) == "model.text_model"
    assert scope_to_language_model("re:.*q_proj$", "model.text_model") == r"re:model\.text_model\..*q_proj$"
    recipe = f"""
quant_stage:
  quant_modifiers:
    QIGAWQModifier: {{qig_steps: 2}}
    QuantizationModifier:
      ignore: {json.dumps(IDEFICS3_IGNORE)}
      config_groups:
        group_0:
          targets: [Linear]
          weights: {{num_bits: 4, type: int, symmetric: false, strategy: group, group_size: 64}}
"""
    output = tmp_path / "checkpoint"
    quantize_to_checkpoint(tiny.model, tiny.processor, recipe, tiny.dataset, output)
    tensors = load_file(output / "model.safetensors")
    packed = [name for name in tensors if name.endswith("weight_packed")]
    layers = tiny.model.config.get_text_config().num_hidden_layers
    assert len(packed) == layers * 7 and all("text_model" in name for name in packed)


def test_awq_without_language_model_says_pass_mappings():
    class NoDecoder(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="pass mappings scoped to it"):
        language_model_name(NoDecoder())
