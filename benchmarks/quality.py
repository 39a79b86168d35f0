"""Does QIG preserve the model better than stock GPTQ, AWQ, SmoothQuant and MBQ, calibrated as users calibrate?

    python benchmarks/quality.py --quick                 # VLM, W3A16, GPTQ family, 32 samples: NOT the headline
    python benchmarks/quality.py                         # the headline grid: 256 samples (64k+ tokens), 2 seeds
    python benchmarks/quality.py --split validation --schemes w3a16 w4a8 --methods gptq qig_gptq qig_gptq_exact

Models: ``vlm``, the default model (real SmolLM2-135M-Instruct in SmolVLM with a vision tower trained on
easy-VQA, docs/model-card.md), and ``text``, its language model alone. Calibration: ``--samples`` records of
``qig_plugin.data.user_scale`` (about 256 tokens each: easy-VQA conversations and real English tasks from the Brown
corpus, fortunes and the Python documentation, docs/calibration-data.md) of its ``calibration`` split, drawn with
each of ``--seeds``. Scored on another split, by document and by image: ``--split validation`` for every choice of
defaults and method variants, ``--split heldout`` (the default) for reported numbers only. Metrics against the
full-precision parent: mean KL(FP || Q) of next-token distributions over all positions and over answer
positions of ``EVAL_RECORDS`` records of that split, top-1 agreement, KL and perplexity on ``TEXT_PASSAGES``
real passages of that split, and (VLM) easy-VQA accuracy on ``VQA_QUESTIONS`` questions of its images (TEST for
held-out), each with a bootstrap 95% interval over samples; ratios use paired resamples.

Mixed precision (``--schemes bits3.0 bits3.5``, methods ``mixed_uniform``, ``mixed_entropy``, ``mixed_qig`` and the
control ``mixed_discrepancy``): an average-bits budget instead of a scheme; each allocation (``qig plan-bits``:
uniform, LUQ's activation entropy, QIG, QIG's forward-only discrepancy) is planned on the cell's first
``PLAN_SAMPLES`` calibration records and run by stock GPTQ, so only the allocation differs; ``mixed_qig`` is
compared with the better of uniform and entropy.

Regime check (printed and stored): at each scheme stock GPTQ must beat round-to-nearest on KL and perplexity; where
it does not, the calibration set is too small or too narrow for conclusions about GPTQ-based methods.

Every cell (model, scheme, method, samples, seed, split) runs in its own process and saves its per-sample
metrics under ``benchmarks/results/quality_cells/`` (reused on later runs unless ``--fresh``); the summary of every
saved cell of the same samples and split goes to ``benchmarks/results/quality.{json,md,png}`` (``--split
validation``: ``quality_validation.*``). ``--quick`` keeps no cells and writes ``quality_quick.*``. Cell wall times
are the ``oneshot`` calibration alone.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from qig_plugin.evaluation import (
    bootstrap_interval,
    next_token_log_probs,
    paired_difference,
    paired_ratio,
    perplexity_interval,
    records_set,
    text_set,
)
from qig_plugin.evaluation import sample_metrics as evaluation_sample_metrics
from qig_plugin.recipes import shipped_recipe

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES = shipped_recipe("gptq_w8a8").parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
CELLS = RESULTS / "quality_cells"
SAMPLES = 256  # calibration records of about 256 tokens: 64k+ tokens, the headline size
QUICK_SAMPLES = 32
EVAL_RECORDS = 48
TEXT_PASSAGES = 24
TEXT_TOKENS = 256
VQA_QUESTIONS = 300
EVAL_SEED = 0  # which records, passages and questions of the scored split (the same for every cell)
CHILD_TIMEOUT_S = 5400
ALL_SCHEMES = ("w3a16", "w4a16", "w4a8", "w8a8")
# mixed precision: an average-bits budget instead of a scheme (weight-only, int, symmetric, group 64)
BUDGETS = {"bits3.0": 3.0, "bits3.5": 3.5}
UNIFORM_FOR_BUDGET = {"bits3.0": "w3a16", "bits3.5": "w3a16"}  # the nearest uniform width within each budget
MIXED_WIDTHS = (2, 3, 4)  # plan_mixed_precision's default (8 lost at both budgets on validation records)
PLAN_SAMPLES = 32  # calibration records the sensitivity is measured on
WEIGHT_ACTIVATION = ("w4a8", "w8a8")

# method -> (recipe file stem with {scheme}, modifier class swaps, field overrides, schemes it applies to)
METHODS = {
    "rtn": ("gptq_{scheme}", {"GPTQModifier": "QuantizationModifier"}, {}, ALL_SCHEMES),
    "gptq": ("gptq_{scheme}", {}, {}, ALL_SCHEMES),
    "qig_gptq": ("qig_gptq_{scheme}", {}, {}, ALL_SCHEMES),
    "awq": ("awq_{scheme}", {}, {}, ALL_SCHEMES[:3]),
    "qig_awq": ("qig_awq_{scheme}", {}, {}, ALL_SCHEMES[:3]),
    "mbq_awq": ("qig_awq_{scheme}", {"QIGAWQModifier": "MBQModifier"}, {}, ALL_SCHEMES[:3]),
    "sq_gptq": ("sq_gptq_{scheme}", {}, {}, WEIGHT_ACTIVATION),
    "qig_sq_gptq": ("qig_sq_gptq_{scheme}", {}, {}, WEIGHT_ACTIVATION),
    "qig_sq_qig_gptq": ("qig_sq_gptq_{scheme}", {"GPTQModifier": "QIGGPTQModifier"}, {}, WEIGHT_ACTIVATION),
    "autoround": ("autoround_{scheme}", {}, {}, ALL_SCHEMES[:3]),
    "qig_autoround": ("qig_autoround_{scheme}", {}, {}, ALL_SCHEMES[:3]),
}
# controls in every QIG family: the same weighting path with cheaper token scores (see control_modifiers)
CONTROL_KINDS = ("norm", "first_token_zero", "discrepancy")
QIG_FAMILIES = {"qig_gptq": ("qig_gptq_{scheme}", "QIGGPTQModifier", "gptq"),
                "qig_awq": ("qig_awq_{scheme}", "QIGAWQModifier", "awq"),
                "qig_sq_gptq": ("qig_sq_gptq_{scheme}", "QIGSmoothQuantModifier", "sq_gptq"),
                "qig_autoround": ("qig_autoround_{scheme}", "QIGAutoRoundModifier", "autoround")}
for _family, (_recipe, _cls, _) in QIG_FAMILIES.items():
    for _kind in CONTROL_KINDS:
        METHODS[f"{_kind}_{_family.removeprefix('qig_')}"] = (
            _recipe, {_cls: f"{_kind}:{_cls}"}, {}, METHODS[_family][3])
# variants of QIG-GPTQ's own knobs, chosen on the validation split
VARIANTS = {
    "qig_gptq_exact": ("qig_gptq_{scheme}", {}, {"qig_attribution": "exact"}, ALL_SCHEMES),
    "qig_gptq_quantized_baseline": ("qig_gptq_{scheme}", {}, {"qig_baseline": "quantized"}, WEIGHT_ACTIVATION),
    "qig_gptq_no_iqr_clip": ("qig_gptq_{scheme}", {}, {"qig_iqr_clip": False}, ALL_SCHEMES),
}
# how QIG scores become weights (see weighting_variants): sharper, softer, or halfway to uniform
WEIGHTINGS = ("power2", "sqrt", "half_uniform")
VARIANTS.update({f"qig_gptq_{shape}": ("qig_gptq_{scheme}", {"QIGGPTQModifier": f"{shape}:QIGGPTQModifier"}, {},
                                       ALL_SCHEMES) for shape in WEIGHTINGS})
# end-loss guidance (see end_loss_variants): token weights from the Fisher of the end output at each decoder
# layer, alone (a control) or times QIG's
END_LOSS = {"fisher_gptq": ("qig_gptq_{scheme}", {"QIGGPTQModifier": "fisher:QIGGPTQModifier"}, {}, ALL_SCHEMES),
            "qig_fisher_gptq": ("qig_gptq_{scheme}", {"QIGGPTQModifier": "qig_fisher:QIGGPTQModifier"}, {},
                                ALL_SCHEMES),
            "fisher_linear_gptq": ("qig_gptq_{scheme}", {"QIGGPTQModifier": "fisher_linear:QIGGPTQModifier"}, {},
                                   ALL_SCHEMES),
            "qig_fisher_mean_gptq": ("qig_gptq_{scheme}", {"QIGGPTQModifier": "qig_fisher_mean:QIGGPTQModifier"},
                                     {}, ALL_SCHEMES)}
VARIANTS.update(END_LOSS)
# QIG-AutoRound's weights with the first token (the attention sink) left out (see sink_zero_variant)
VARIANTS["qig_sink_zero_autoround"] = (
    "qig_autoround_{scheme}", {"QIGAutoRoundModifier": "sink_zero:QIGAutoRoundModifier"}, {}, ALL_SCHEMES[:3])
FISHER_LABEL_DRAWS = 2
METHODS.update(VARIANTS)
# mixed precision (qig plan-bits): each allocation's plan on the cell's own calibration records, run by stock GPTQ
# so that only the allocation differs; uniform is every linear at the widest width within the budget
MIXED = {f"mixed_{sensitivity}": (None, {}, {"sensitivity": sensitivity}, tuple(BUDGETS))
         for sensitivity in ("uniform", "entropy", "qig", "discrepancy")}
METHODS.update(MIXED)
STOCK = ("rtn", "gptq", "awq", "sq_gptq", "autoround", "mixed_uniform", "mixed_entropy")
QIG = ("qig_gptq", "qig_awq", "qig_sq_gptq", "qig_sq_qig_gptq", "qig_autoround", "mixed_qig")
CONTROLS = tuple(m for m in METHODS if m.split("_")[0] in ("norm", "first", "discrepancy")) + ("mbq_awq",
                                                                                             "mixed_discrepancy")
MAIN_METHODS = STOCK + QIG + CONTROLS
# each non-stock method's stock counterpart
STOCK_TWIN = {**{m: "gptq" for m in METHODS if m.endswith("_gptq") and m not in STOCK},
              **{m: "awq" for m in METHODS if m.endswith("_awq") and m not in STOCK},
              **{m: "autoround" for m in METHODS if m.endswith("_autoround") and m not in STOCK},
              **{m: "sq_gptq" for m in METHODS if m.endswith("_sq_gptq") or m == "qig_sq_qig_gptq"},
              **{m: "gptq" for m in VARIANTS if m.startswith("qig_gptq_")},  # QIG-GPTQ's own knobs
              "mixed_qig": "mixed_entropy", "mixed_discrepancy": "mixed_entropy"}
IMAGE_ONLY = ("mbq_awq",)  # MBQ weights tokens by modality: the text model has no image tokens
SCHEMES = ALL_SCHEMES + tuple(BUDGETS)


# ---------------------------------------------------------------- controls (benchmark-only modifiers)


def control_modifiers(classes: dict[str, type]) -> dict[str, type]:
    """``"{kind}:{QIG class}"`` -> that QIG modifier with cheaper token scores (same normalization, clipping and
    weighting path), for each kind:

    - ``norm``: ``||x_t||`` of the block input;
    - ``first_token_zero``: every token 1, the first (the attention sink) 0, no clipping;
    - ``discrepancy``: the block's own output discrepancy ``mean_h |f(x_t; W) - f(x_t; Q(W))|``, forward only, for
      every block, attention included (the cheapest QIG-like score: QIG must beat it to justify integration).
    """
    from qig_plugin.attribution import AttributionCache, block_discrepancy, block_input
    from qig_plugin.upstream import hooks_disabled

    weight_cache = AttributionCache()  # Q(W) of the layer being calibrated

    def norm_scores(self, block, weight_args, args, kwargs, baseline_args=None, input_linears=()):
        return block_input(args, kwargs)[1].detach().float().norm(dim=-1)

    def first_token_zero_scores(self, block, weight_args, args, kwargs, baseline_args=None, input_linears=()):
        scores = torch.ones(block_input(args, kwargs)[1].shape[:2])
        scores[:, 0] = 0.0
        return scores

    def discrepancy_scores(self, block, weight_args, args, kwargs, baseline_args=None, input_linears=()):
        with hooks_disabled():
            return block_discrepancy(block, args, kwargs, weight_args, weight_cache)

    scores = {"norm": norm_scores, "first_token_zero": first_token_zero_scores, "discrepancy": discrepancy_scores}
    controls = {}
    for name in ("QIGGPTQModifier", "QIGAWQModifier", "QIGSmoothQuantModifier", "QIGAutoRoundModifier"):
        for kind in CONTROL_KINDS:
            fields = {"qig_iqr_clip": (bool, False)} if kind == "first_token_zero" else {}
            control = type(f"{kind.title().replace('_', '')}{name}", (classes[name],),
                           {"qig_scores": scores[kind], "__annotations__": {k: v[0] for k, v in fields.items()},
                            **{k: v[1] for k, v in fields.items()}})
            controls[f"{kind}:{name}"] = control
    return controls


def weighting_variants(qig_gptq: type) -> dict[str, type]:
    """``"{shape}:QIGGPTQModifier"`` -> QIG-GPTQ with another map from QIG scores ``s`` to token weights:

    - ``power2``: weights from ``s**2`` (sharper), clipped and normalized as the default;
    - ``sqrt``: weights from ``s**0.5`` (softer);
    - ``half_uniform``: the default weights averaged with uniform ones, ``(lambda + 1) / 2`` on kept tokens.
    """
    from qig_plugin.attribution import calibration_token_weights

    def shaped(transform):
        def qig_weights(self, scores, keep):
            return calibration_token_weights(transform(scores), keep, self.iqr_multiplier)
        return qig_weights

    def half_uniform(self, scores, keep):
        kept = torch.ones_like(scores) if keep is None else keep.to(scores.dtype)
        return (calibration_token_weights(scores, keep, self.iqr_multiplier) + kept) / 2

    shapes = {"power2": shaped(lambda s: s.square()), "sqrt": shaped(torch.sqrt), "half_uniform": half_uniform}
    return {f"{shape}:QIGGPTQModifier": type(f"{shape.title().replace('_', '')}QIGGPTQModifier", (qig_gptq,),
                                             {"qig_weights": shapes[shape]}) for shape in WEIGHTINGS}


def end_loss_variants(qig_gptq: type) -> dict[str, type]:
    """``"{kind}:QIGGPTQModifier"`` -> QIG-GPTQ whose token scores are multiplied by the end-loss Fisher weight of
    the block's decoder layer, read from the batch's ``loss_mask`` (``[1, seq, layers]``, see
    :func:`with_end_loss_column`): ``fisher`` on uniform scores (the control), ``qig_fisher`` on QIG's;
    ``fisher_linear``: each linear's own column of per-linear Fisher weights; ``qig_fisher_mean``: the mean of
    QIG's token weights and the layer's Fisher weights."""
    from llmcompressor.core import active_session

    from qig_plugin.attribution import block_input
    from qig_plugin.modifiers.language_model import decoder_layers

    column_of = {}  # module inside a decoder layer -> its layer's column; each linear of them -> its own column

    def batch_fisher(module, per_linear=False):  # [batch, seq] Fisher weights of the module on this batch
        state = active_session().state
        if not column_of:
            layers = decoder_layers(state.model)[1]
            column_of.update((("layer", m), index) for index, layer in enumerate(layers) for m in layer.modules())
            column_of.update((("linear", m), index) for index, m in enumerate(decoder_linears(layers)))
        column = column_of["linear" if per_linear else "layer", module]
        return state.loss_masks[state.current_batch_idx][..., column].float()

    def scored(use_qig):
        def qig_scores(self, block, weight_args, args, kwargs, baseline_args=None, input_linears=()):
            base = (qig_gptq.qig_scores(self, block, weight_args, args, kwargs, baseline_args, input_linears)
                    if use_qig else torch.ones(block_input(args, kwargs)[1].shape[:2]))
            return base * batch_fisher(block).to(base.device)
        return qig_scores

    def mean_group_weights(self, group, args, kwargs):  # halfway between QIG's weights and the Fisher's
        fisher = self.qig_weights(batch_fisher(group.block), self.token_mask(block_input(args, kwargs)[1], kwargs))
        return {linear: (weights + fisher.to(weights.device)) / 2
                for linear, weights in qig_gptq.group_weights(self, group, args, kwargs).items()}

    def linear_group_weights(self, group, args, kwargs):
        keep = self.token_mask(block_input(args, kwargs)[1], kwargs)
        return {linear: self.qig_weights(batch_fisher(linear, per_linear=True), keep) for linear in group.linears}

    variants = {f"{kind}:QIGGPTQModifier": type(f"{kind.title().replace('_', '')}QIGGPTQModifier", (qig_gptq,),
                                                {"qig_scores": scored(kind == "qig_fisher")})
                for kind in ("fisher", "qig_fisher")}
    variants["fisher_linear:QIGGPTQModifier"] = type("FisherLinearQIGGPTQModifier", (qig_gptq,),
                                                     {"group_weights": linear_group_weights})
    variants["qig_fisher_mean:QIGGPTQModifier"] = type("QigFisherMeanQIGGPTQModifier", (qig_gptq,),
                                                       {"group_weights": mean_group_weights})
    return variants


def sink_zero_variant(qig_modifier: type) -> dict[str, type]:
    """``"sink_zero:{QIG class}"`` -> that QIG modifier with the first token of every sample (the attention sink)
    left out of its weights: weight 0, QIG's weights on the other kept tokens, clipped and normalized as the
    default. The first-token-zero control also weights the first token 0, with uniform, unclipped weights elsewhere."""
    from qig_plugin.attribution import calibration_token_weights

    def qig_weights(self, scores, keep):
        keep = torch.ones_like(scores, dtype=torch.bool) if keep is None else keep.clone()
        keep[:, 0] = False
        return calibration_token_weights(scores, keep, self.iqr_multiplier)

    name = qig_modifier.__name__
    return {f"sink_zero:{name}": type(f"SinkZero{name}", (qig_modifier,), {"qig_weights": qig_weights})}


def decoder_linears(layers) -> list[torch.nn.Linear]:
    """Every linear of the decoder layers, in module order: the columns of the per-linear Fisher weights."""
    return [m for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]


def with_end_loss_column(model, dataset, per_linear: bool = False, draws: int = FISHER_LABEL_DRAWS, seed: int = 0):
    """``dataset`` with its ``loss_mask`` replaced by each token's end-loss Fisher weight per decoder layer,
    ``[seq, layers]`` (``per_linear``: per linear of the decoder layers, in module order, ``[seq, linears]``):
    ``mean_k ||d log p(y_k) / d h||^2`` summed over every position's label ``y_k`` drawn from the full-precision
    model's own next-token distribution (``draws`` draws), ``h`` the layer's (linear's) output at the token. Its
    expectation is the diagonal of the Fisher that the KL to the parent grows with, per token."""
    from qig_plugin.data import batch_one_collator
    from qig_plugin.modifiers.language_model import decoder_layers

    _, layers = decoder_layers(model)
    watched = decoder_linears(layers) if per_linear else list(layers)
    generator = torch.Generator().manual_seed(seed)
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    outputs: list[torch.Tensor] = []

    def entry(_layer, args, kwargs):
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs

    def keep(_layer, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden.retain_grad()
        outputs.append(hidden)

    handles = [layers[0].register_forward_pre_hook(entry, with_kwargs=True)]
    handles += [module.register_forward_hook(keep) for module in watched]
    columns = []
    try:
        for row in dataset:
            batch = batch_one_collator([{k: v for k, v in row.items() if k != "loss_mask"}])
            outputs.clear()
            with torch.enable_grad():
                log_probs = model(**batch, use_cache=False).logits.float().log_softmax(dim=-1)[0]
                energy = torch.zeros(log_probs.shape[0], len(watched))
                for _ in range(draws):
                    labels = torch.multinomial(log_probs.detach().exp(), 1, generator=generator)
                    for hidden in outputs:
                        hidden.grad = None
                    log_probs.gather(-1, labels).sum().backward(retain_graph=True)
                    energy += torch.stack([h.grad[0].float().square().sum(dim=-1) for h in outputs], dim=-1)
            columns.append((energy / draws).numpy())
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
    return dataset.remove_columns("loss_mask").add_column("loss_mask", [c.tolist() for c in columns])


def build_modifiers(method: str, scheme: str) -> list:
    """The method's modifiers for ``scheme``: the shipped recipe, with class swaps and field overrides."""
    from llmcompressor.modifiers.autoround import AutoRoundModifier
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    from qig_plugin.modifiers import (
        MBQModifier,
        QIGAutoRoundModifier,
        QIGAWQModifier,
        QIGGPTQModifier,
        QIGSmoothQuantModifier,
    )

    classes = {cls.__name__: cls for cls in (GPTQModifier, QuantizationModifier, AWQModifier, SmoothQuantModifier,
                                             AutoRoundModifier, MBQModifier, QIGAutoRoundModifier, QIGAWQModifier,
                                             QIGGPTQModifier, QIGSmoothQuantModifier)}
    classes.update(control_modifiers(classes))
    classes.update(weighting_variants(QIGGPTQModifier))
    classes.update(end_loss_variants(QIGGPTQModifier))
    classes.update(sink_zero_variant(QIGAutoRoundModifier))
    recipe, swaps, overrides, _ = METHODS[method]
    stages = yaml.safe_load((RECIPES / f"{recipe.format(scheme=scheme)}.yaml").read_text())
    modifiers = []
    for stage in stages.values():
        for group in stage.values():
            for name, fields in group.items():
                cls = classes[swaps.get(name, name)]
                fields = {**fields, **overrides}
                modifiers.append(cls(**{k: v for k, v in fields.items() if k in cls.model_fields}))
    return modifiers


def mixed_recipe(model, dataset, method: str, scheme: str) -> str:
    """The GPTQ recipe of the method's mixed-precision plan under the scheme's budget, measured on the first
    ``PLAN_SAMPLES`` calibration records."""
    from qig_plugin.data import batch_one_collator
    from qig_plugin.mixed_precision import plan_mixed_precision

    batches = [batch_one_collator([row]) for row in dataset.select(range(min(PLAN_SAMPLES, len(dataset))))]
    plan = plan_mixed_precision(model, batches, BUDGETS[scheme], MIXED_WIDTHS, METHODS[method][2]["sensitivity"])
    widths = list(plan.widths.values())
    allocation = {"average_bits": round(plan.average_bits, 4),
                  "units_per_width": {str(bits): widths.count(bits) for bits in MIXED_WIDTHS}}
    return plan.recipe("GPTQModifier"), allocation


# ---------------------------------------------------------------- data


def load_model_and_processor(model_kind: str):
    """The full-precision ``"vlm"`` (default model) or ``"text"`` (its language model) and its processor/tokenizer."""
    from qig_plugin.models import (
        build_default_model,
        build_text_model,
        load_model,
        load_processor,
    )

    if model_kind == "vlm":
        model_dir = build_default_model()
        return load_model(model_dir), load_processor(model_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = build_text_model()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(model_dir)


def records_of(model_kind: str, split: str, count: int, seed: int, processor) -> list:
    from qig_plugin.data.user_scale import text_records, vlm_records

    if model_kind == "vlm":
        return vlm_records(split, count, seed, processor=processor)
    return text_records(split, count, seed, tokenizer=processor)


def evaluation_sets(model_kind: str, split: str, processor) -> dict:
    """What a cell is scored on, from ``split``: records (KL), text passages (KL, perplexity), VQA questions (VLM)."""
    from qig_plugin.data import easy_vqa
    from qig_plugin.data.user_scale import heldout_corpus_passages

    tokenizer = getattr(processor, "tokenizer", processor)
    sets = {
        "records": records_set("records", records_of(model_kind, split, EVAL_RECORDS, EVAL_SEED, processor),
                               processor),
        "text": text_set("text", heldout_corpus_passages(tokenizer, TEXT_PASSAGES, TEXT_TOKENS, split=split,
                                                         seed=EVAL_SEED)),
    }
    if model_kind == "vlm":
        pool = easy_vqa.validation_questions() if split == "validation" else list(easy_vqa.questions("test"))
        chosen = np.random.default_rng(EVAL_SEED).permutation(len(pool))[:VQA_QUESTIONS]
        sets["vqa"] = [pool[i] for i in sorted(chosen)]
    return sets


# ---------------------------------------------------------------- metrics (qig_plugin.evaluation's)


def model_outputs(model, processor, sets: dict) -> dict:
    """Next-token log-probabilities ``[1, seq, vocab]`` of every record and passage, and the VQA answers."""
    from qig_plugin.data import easy_vqa
    from qig_plugin.vqa import hf_answers

    model.eval()
    outputs = {name: [next_token_log_probs(model, row) for row in sets[name].rows] for name in ("records", "text")}
    if "vqa" in sets:
        answers = hf_answers(model, processor, sets["vqa"])
        outputs["vqa_correct"] = [float(easy_vqa.first_word(a) == q.answer) for a, q in zip(answers, sets["vqa"])]
    return outputs


def sample_metrics(reference: dict, quantized: dict, sets: dict) -> dict[str, list[float]]:
    """Per-sample metrics (one value per record, passage or question).

    ``kl_answer`` averages the positions from the one predicting the answer's first token to the end.
    """
    records, texts = sets["records"], sets["text"]
    metrics = {"kl_all": [], "kl_answer": [], "top1": [], "text_kl": [], "text_nll": [], "text_nll_fp": []}
    for ref, quant, row, span in zip(reference["records"], quantized["records"], records.rows, records.answer_spans):
        scores = evaluation_sample_metrics(ref, quant, torch.as_tensor(row["input_ids"])[None], answer_spans=[span])
        metrics["kl_all"].append(float(scores["kl"][0]))
        metrics["kl_answer"].append(float(scores["kl_answer"][0]))
        metrics["top1"].append(float(scores["top1"][0]))
    for ref, quant, row in zip(reference["text"], quantized["text"], texts.rows):
        scores = evaluation_sample_metrics(ref, quant, torch.as_tensor(row["input_ids"])[None])
        metrics["text_kl"].append(float(scores["kl"][0]))
        metrics["text_nll"].append(float(scores["nll"][0]))
        metrics["text_nll_fp"].append(float(scores["nll_reference"][0]))
    if "vqa_correct" in quantized:
        metrics["vqa_correct"] = quantized["vqa_correct"]
        metrics["vqa_correct_fp"] = reference["vqa_correct"]
    return metrics


# ---------------------------------------------------------------- one cell


def save_reference(model_kind: str, split: str, path: Path) -> None:
    """The FP parent's outputs on the scored split, computed once per run and read by every cell."""
    model, processor = load_model_and_processor(model_kind)
    torch.save(model_outputs(model, processor, evaluation_sets(model_kind, split, processor)), path)


def run_cell(model_kind: str, scheme: str, method: str, samples: int, seed: int, split: str,
             reference_path: Path) -> dict:
    """Calibrate one (model, scheme, method) on ``samples`` records drawn with ``seed``; score it on ``split``."""
    from qig_plugin.data import build_calibration_dataset
    from qig_plugin.quantize import calibrate

    torch.manual_seed(seed)
    model, processor = load_model_and_processor(model_kind)
    dataset = build_calibration_dataset(records_of(model_kind, "calibration", samples, seed, processor), processor)
    recipe, allocation = mixed_recipe(model, dataset, method, scheme) if method in MIXED else (
        build_modifiers(method, scheme), {})
    start = time.perf_counter()
    if method in END_LOSS:
        dataset = with_end_loss_column(model, dataset, per_linear=method == "fisher_linear_gptq", seed=seed)
    seconds = time.perf_counter() - start + calibrate(model, processor, recipe, dataset,
                                                      use_loss_mask=method in END_LOSS)
    sets = evaluation_sets(model_kind, split, processor)
    return {
        "model": model_kind, "scheme": scheme, "method": method, "samples": samples, "seed": seed, "split": split,
        "calibration_tokens": int(sum(len(ids) for ids in dataset["input_ids"])),
        "calibration_s": round(seconds, 1), **allocation,
        "per_sample": sample_metrics(torch.load(reference_path), model_outputs(model, processor, sets), sets),
    }


# ---------------------------------------------------------------- summary


def pooled(cells: list[dict]) -> dict[str, np.ndarray]:
    """Per-sample metrics of a method's seeds, averaged over the seeds (same scored samples in every cell)."""
    return {k: np.mean([np.array(c["per_sample"][k]) for c in cells], axis=0) for k in cells[0]["per_sample"]}


def summarize(cells: list[dict]) -> dict:
    per_sample = pooled(cells)
    text_tokens = np.full(len(per_sample["text_nll"]), TEXT_TOKENS - 1)  # every passage scores TEXT_TOKENS - 1 tokens
    summary = {
        "seeds": sorted(c["seed"] for c in cells),
        "calibration_tokens": [c["calibration_tokens"] for c in cells],
        "kl_all": bootstrap_interval(per_sample["kl_all"]),
        "kl_answer": bootstrap_interval(per_sample["kl_answer"]),
        "top1": bootstrap_interval(per_sample["top1"]),
        "text_kl": bootstrap_interval(per_sample["text_kl"]),
        "text_ppl": perplexity_interval(per_sample["text_nll"], text_tokens),
        "text_ppl_fp": perplexity_interval(per_sample["text_nll_fp"], text_tokens)[0],
        "calibration_s": [c["calibration_s"] for c in cells],
    }
    if "vqa_correct" in per_sample:
        summary["vqa_accuracy"] = bootstrap_interval(per_sample["vqa_correct"])
        summary["vqa_accuracy_fp"] = float(np.mean(per_sample["vqa_correct_fp"]))
    return summary


def regime_check(summaries: dict) -> list[dict]:
    """Per (model, scheme): does stock GPTQ beat round-to-nearest on KL and on text perplexity?"""
    rows = []
    for model_kind, scheme in sorted({(m, s) for m, s, _ in summaries}):
        gptq, rtn = summaries.get((model_kind, scheme, "gptq")), summaries.get((model_kind, scheme, "rtn"))
        if gptq is None or rtn is None:
            continue
        kl, ppl = gptq["kl_all"][0] < rtn["kl_all"][0], gptq["text_ppl"][0] < rtn["text_ppl"][0]
        rows.append({"model": model_kind, "scheme": scheme, "gptq_kl": gptq["kl_all"][0], "rtn_kl": rtn["kl_all"][0],
                     "gptq_ppl": gptq["text_ppl"][0], "rtn_ppl": rtn["text_ppl"][0], "gptq_beats_rtn": kl and ppl,
                     "verdict": "sane" if kl and ppl else
                     "GPTQ does not beat RTN: the calibration set is too small or too narrow for this scheme"})
    return rows


def ratios_to_best_stock(cells: dict) -> list[dict]:
    """Per (model, scheme): each non-stock method against the best stock method (not RTN) and its stock twin:
    KL ratios with paired bootstrap intervals, perplexity ratio, VQA accuracy difference (points)."""
    rows = []
    for model_kind, scheme in sorted({(m, s) for m, s, _ in cells}):
        present = {k: pooled(c) for (m, s, k), c in cells.items() if (m, s) == (model_kind, scheme)}
        uniform = (model_kind, UNIFORM_FOR_BUDGET.get(scheme), "gptq")
        if uniform in cells:  # a budget's stock recipes include GPTQ at the nearest uniform width
            present[f"gptq_{uniform[1]}"] = pooled(cells[uniform])
        stock = [k for k in present if (k in STOCK or k.startswith("gptq_")) and k != "rtn"]
        if not stock:
            continue
        best = min(stock, key=lambda k: np.mean(present[k]["kl_all"]))
        for method, metrics in present.items():
            if method in stock or method == "rtn":
                continue
            row = {"model": model_kind, "scheme": scheme, "method": method, "best_stock": best}
            for metric in ("kl_all", "kl_answer", "text_kl"):
                row[metric] = paired_ratio(metrics[metric], present[best][metric])
            row["text_ppl_ratio"] = float(np.exp(np.mean(metrics["text_nll"]) - np.mean(present[best]["text_nll"])))
            if "vqa_correct" in metrics:
                row["vqa_points"] = [100 * v for v in paired_difference(metrics["vqa_correct"],
                                                                        present[best]["vqa_correct"])]
            twin = STOCK_TWIN.get(method)
            if twin in present:
                row["twin"] = twin
                row["kl_all_twin"] = paired_ratio(metrics["kl_all"], present[twin]["kl_all"])
            rows.append(row)
    return rows


def fmt(interval: list[float], digits: int = 3) -> str:
    return f"{interval[0]:.{digits}f} [{interval[1]:.{digits}f}, {interval[2]:.{digits}f}]"


def markdown(summaries: dict, ratios: list[dict], regime: list[dict], header: str) -> str:
    lines = [header, "",
             "| model | scheme | method | KL all | KL answer | top-1 | text PPL (FP) | VQA % (FP) | calib s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (model_kind, scheme, method), s in sorted(summaries.items(), key=lambda kv: (
            kv[0][0], SCHEMES.index(kv[0][1]), list(METHODS).index(kv[0][2]))):
        vqa = (f"{100 * s['vqa_accuracy'][0]:.1f} [{100 * s['vqa_accuracy'][1]:.1f}, {100 * s['vqa_accuracy'][2]:.1f}]"
               f" ({100 * s['vqa_accuracy_fp']:.1f})" if "vqa_accuracy" in s else "-")
        lines.append(f"| {model_kind} | {scheme} | {method} | {fmt(s['kl_all'])} | {fmt(s['kl_answer'])} "
                     f"| {s['top1'][0]:.3f} | {s['text_ppl'][0]:.2f} ({s['text_ppl_fp']:.2f}) | {vqa} "
                     f"| {'/'.join(str(round(t)) for t in s['calibration_s'])} |")
    lines += ["", "Regime check (stock GPTQ against RTN):", "",
              "| model | scheme | GPTQ KL | RTN KL | GPTQ PPL | RTN PPL | verdict |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['scheme']} | {r['gptq_kl']:.4f} | {r['rtn_kl']:.4f} | {r['gptq_ppl']:.2f} "
              f"| {r['rtn_ppl']:.2f} | {r['verdict']} |" for r in regime]
    lines += ["", ("| model | scheme | method | best stock | KL ratio all | KL ratio answer | text KL ratio | PPL ratio "
                   "| VQA points vs best stock | KL ratio to stock twin |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in ratios:
        twin = f"{fmt(r['kl_all_twin'])} ({r['twin']})" if "twin" in r else "-"
        vqa = fmt(r["vqa_points"], 1) if "vqa_points" in r else "-"
        lines.append(f"| {r['model']} | {r['scheme']} | {r['method']} | {r['best_stock']} | {fmt(r['kl_all'])} "
                     f"| {fmt(r['kl_answer'])} | {fmt(r['text_kl'])} | {r['text_ppl_ratio']:.3f} | {vqa} | {twin} |")
    return "\n".join(lines) + "\n"


def plot(summaries: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, "kl_all", "KL(FP || Q), lower is better", True) for m in sorted({m for m, _, _ in summaries})]
    if any("vqa_accuracy" in s for s in summaries.values()):
        panels.append(("vlm", "vqa_accuracy", "easy-VQA accuracy, higher is better", False))
    colors = dict(zip(METHODS, plt.get_cmap("tab20").colors * 2))  # one color per method in every panel
    figure, axes = plt.subplots(len(panels), 1, figsize=(13, 3.8 * len(panels)), squeeze=False)
    for axis, (model_kind, metric, label, log_scale) in zip(axes[:, 0], panels):
        schemes = [s for s in SCHEMES if any((model_kind, s, m) in summaries for m in METHODS)]
        methods = [m for m in METHODS if any((model_kind, s, m) in summaries for s in schemes)]
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            xs, ys, errors = [], [], []
            for j, scheme in enumerate(schemes):
                if (model_kind, scheme, method) in summaries:
                    mean, low, high = summaries[(model_kind, scheme, method)][metric]
                    xs.append(j + (i - len(methods) / 2 + 0.5) * width)
                    ys.append(mean)
                    errors.append((mean - low, high - mean))
            hatch = "//" if method in QIG else ("." if method in CONTROLS + tuple(VARIANTS) else None)
            axis.bar(xs, ys, width, yerr=np.array(errors).T, label=method, hatch=hatch, capsize=2,
                     color=colors[method])
        axis.set_xticks(range(len(schemes)), [s.upper() for s in schemes])
        if log_scale:
            axis.set_yscale("log")
        axis.set_ylabel(label.split(",")[0])
        axis.set_title(f"{model_kind}: {label} (95% bootstrap intervals); {title}")
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_bits_curve(summaries: dict, path: Path, title: str) -> bool:
    """Quality against average weight bits of the VLM's mixed-precision allocations (each at its budget) beside
    uniform GPTQ at 3 and 4 bits (W3A16, W4A16); False when there are no mixed cells."""
    mixed = {(scheme, method) for model_kind, scheme, method in summaries if model_kind == "vlm" and method in MIXED}
    if not mixed:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    uniform = [(bits, ("vlm", scheme, "gptq")) for bits, scheme in ((3, "w3a16"), (4, "w4a16"))]
    lines = {"uniform width (GPTQ)": [(bits, key) for bits, key in uniform if key in summaries]}
    for method in MIXED:
        if method != "mixed_uniform":  # uniform within a budget is the 3-bit point above
            lines[method] = sorted((BUDGETS[scheme], ("vlm", scheme, method)) for scheme, m in mixed if m == method)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, metric, label in zip(axes, ("kl_all", "vqa_accuracy"), ("KL(FP || Q), lower is better",
                                                                    "easy-VQA accuracy, higher is better")):
        for name, points in lines.items():
            if points:
                values = np.array([summaries[key][metric] for _, key in points])
                bits = [b for b, _ in points]
                axis.errorbar(bits, values[:, 0], yerr=[values[:, 0] - values[:, 1], values[:, 2] - values[:, 0]],
                              marker="o", capsize=3, label=name)
        axis.set_xlabel("average weight bits (scales not counted)")
        axis.set_title(label, fontsize=9)
        axis.legend(fontsize=8)
    figure.suptitle(f"mixed precision, run by GPTQ; {title}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


# ---------------------------------------------------------------- driver


def run_child(arguments: list[str]) -> str:
    """Run this script with ``arguments`` in a fresh process (a clean llm-compressor session); its stdout.

    A child past ``CHILD_TIMEOUT_S`` is killed and run once more (a grid run once stalled in a child's futex wait
    while other jobs shared the cores; the rerun of the same cell finished normally)."""
    for attempt in (1, 2):
        try:
            completed = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True,
                                       timeout=CHILD_TIMEOUT_S)
            break
        except subprocess.TimeoutExpired:
            print(f"    {' '.join(arguments[:4])}: no result after {CHILD_TIMEOUT_S} s, attempt {attempt} killed",
                  flush=True)
    else:
        raise SystemExit(f"{' '.join(arguments[:4])} timed out twice")
    if completed.returncode != 0:
        print(completed.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{' '.join(arguments[:4])} failed (exit {completed.returncode})")
    return completed.stdout


def plan(args) -> list[tuple[str, str, str]]:
    methods = args.methods or MAIN_METHODS
    return [(model_kind, scheme, method) for model_kind in args.models for scheme in args.schemes
            for method in methods if scheme in METHODS[method][3]
            and not (model_kind == "text" and method in IMAGE_ONLY)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"VLM, W3A16, GPTQ family, {QUICK_SAMPLES} samples, one seed: under 10 minutes")
    parser.add_argument("--models", nargs="+", choices=("vlm", "text"), default=["vlm", "text"])
    parser.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS))
    parser.add_argument("--samples", type=int, default=SAMPLES, help="calibration records (about 256 tokens each)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="calibration draws")
    parser.add_argument("--split", choices=("validation", "heldout"), default="heldout",
                        help="scored split: validation for choices, heldout for reported numbers")
    parser.add_argument("--fresh", action="store_true", help="recompute cells already saved")
    parser.add_argument("--one", nargs=7, help=argparse.SUPPRESS)  # MODEL SCHEME METHOD SAMPLES SEED SPLIT REFERENCE
    parser.add_argument("--reference", nargs=3, help=argparse.SUPPRESS)  # MODEL SPLIT PATH
    args = parser.parse_args()
    if args.reference:
        save_reference(args.reference[0], args.reference[1], Path(args.reference[2]))
        return
    if args.one:
        model_kind, scheme, method, samples, seed, split, reference = args.one
        print("RESULT " + json.dumps(run_cell(model_kind, scheme, method, int(samples), int(seed), split,
                                              Path(reference))))
        return
    if args.quick:
        args.models, args.schemes, args.samples, args.seeds = ["vlm"], ["w3a16"], QUICK_SAMPLES, [0]
        args.methods = args.methods or ["rtn", "gptq", "qig_gptq", "discrepancy_gptq"]
    stem = "quality_quick" if args.quick else ("quality" if args.split == "heldout" else "quality_validation")
    with tempfile.TemporaryDirectory() as scratch:
        # --quick computes every cell afresh, keeps none, and writes quality_quick.*
        cells_dir = Path(scratch) / "cells" if args.quick else CELLS
        run_grid(args, cells_dir, Path(scratch), stem)


def run_grid(args, cells_dir: Path, scratch: Path, stem: str) -> None:
    """Run the planned cells not saved in ``cells_dir`` yet; summarize every saved cell of this size and split."""
    started = time.perf_counter()
    todo = [(*cell, seed) for cell in plan(args) for seed in args.seeds]
    cells_dir.mkdir(parents=True, exist_ok=True)
    references = {}
    for index, (model_kind, scheme, method, seed) in enumerate(todo, 1):
        name = f"{model_kind} {scheme} {method} seed {seed}"
        saved = cells_dir / f"{model_kind}_{scheme}_{method}_{args.samples}_seed{seed}_{args.split}.json"
        if saved.exists() and not args.fresh:
            print(f"[{index}/{len(todo)}] {name}: saved result", flush=True)
            continue
        if model_kind not in references:
            references[model_kind] = scratch / f"{model_kind}_reference.pt"
            print(f"FP reference of {model_kind} on {args.split} ...", flush=True)
            run_child(["--reference", model_kind, args.split, str(references[model_kind])])
        print(f"[{index}/{len(todo)}] {name} on {args.samples} samples, scored on {args.split} "
              f"({time.perf_counter() - started:.0f} s so far) ...", flush=True)
        output = run_child(["--one", model_kind, scheme, method, str(args.samples), str(seed), args.split,
                            str(references[model_kind])])
        cell = json.loads(next(l for l in output.splitlines() if l.startswith("RESULT ")).removeprefix("RESULT "))
        saved.write_text(json.dumps(cell) + "\n")
        vqa = cell["per_sample"].get("vqa_correct")
        print(f"    KL {np.mean(cell['per_sample']['kl_all']):.4f}"
              + (f", VQA {100 * np.mean(vqa):.1f}%" if vqa else "")
              + f", {cell['calibration_tokens']} tokens, calibration {cell['calibration_s']} s", flush=True)

    cells: dict[tuple[str, str, str], list[dict]] = {}
    for saved in sorted(cells_dir.glob(f"*_{args.samples}_seed*_{args.split}.json")):  # every saved cell
        cell = json.loads(saved.read_text())
        cells.setdefault((cell["model"], cell["scheme"], cell["method"]), []).append(cell)
    summaries = {key: summarize(group) for key, group in cells.items()}
    ratios = ratios_to_best_stock(cells)
    regime = regime_check(summaries)
    tokens = sorted({t for s in summaries.values() for t in s["calibration_tokens"]})
    header = (f"{args.samples} calibration samples ({tokens[0]}-{tokens[-1]} tokens), scored on the {args.split} "
              f"split" + (" (--quick: not the headline size)" if args.quick else ""))
    table = markdown(summaries, ratios, regime, header)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({
        "samples": args.samples, "calibration_tokens": [tokens[0], tokens[-1]], "split": args.split,
        "eval_records": EVAL_RECORDS, "text_passages": TEXT_PASSAGES, "text_tokens": TEXT_TOKENS,
        "vqa_questions": VQA_QUESTIONS, "regime_check": regime,
        "cells": [{"model": m, "scheme": s, "method": k, **v} for (m, s, k), v in summaries.items()],
        "ratios_to_best_stock": ratios,
    }, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(table)
    plot(summaries, RESULTS / f"{stem}.png", header)
    plot_bits_curve(summaries, RESULTS / f"{stem}_bits.png", header)
    print("\n" + table)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
