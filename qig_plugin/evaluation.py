"""How close is a quantized model to its full-precision parent? Fidelity on held-out data, with bootstrap intervals.

One implementation, used by ``qig eval`` and by ``benchmarks/quality.py``:

* pure metrics on next-token log-probabilities ``[batch, seq, vocab]`` of the reference (full precision) and the
  quantized model: KL(ref || q) per position, top-1 agreement, the NLL of the tokens that follow
  (:func:`position_metrics`, :func:`sample_metrics`);
* bootstrap 95% intervals over samples (:func:`bootstrap_interval`, :func:`perplexity_interval`), paired when two
  models are compared on the same samples (:func:`paired_ratio`, :func:`paired_difference`);
* the evaluation sets: records (image, prompt, answer) rendered with the model's chat template, whose answer
  tokens are located (:func:`answer_span`) so that answers are scored on their own; text passages for perplexity
  (:func:`heldout_text_passages`, :func:`text_passages`); tokenized rows;
* the driver (:func:`evaluate`), its summary (:func:`summarize`), a console table (:func:`format_table`) and a
  plot (:func:`plot_summary`).

Definitions. Position ``p`` of a sequence predicts token ``p + 1``. *KL* is the mean of KL(ref || q) over all
positions; *KL answer* over the positions that predict answer tokens (from the answer's first token to the end of
the sequence, closing template tokens included). *Top-1 agreement* is the share of positions where both models'
most likely next token is the same. *Perplexity* is exp of the mean NLL of the tokens that follow, token-weighted
over the samples. *Answer exact match* (task accuracy, on records with answers): the model's greedy answer is the
record's answer, i.e. every answer token and the end-of-turn token after it is the argmax given the tokens before
it (teacher forcing gives exactly greedy decoding's answer while it agrees, so one forward pass decides it).

Importing this module loads numpy but not torch (the functions that need torch import it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from qig_plugin.data import CalibrationRecord

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0
TEXT_PASSAGES = 16  # held-out documentation passages for perplexity
TEXT_TOKENS = 256  # tokens per passage


# ---------------------------------------------------------------- pure metrics on log-probabilities


def kl_per_position(reference: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """KL(ref || q) of each position's next-token distribution: log-probs ``[..., seq, vocab]`` x2 -> ``[..., seq]``."""
    return (reference.exp() * (reference - quantized)).sum(-1)


def position_metrics(
    reference: torch.Tensor, quantized: torch.Tensor, input_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-position metrics of two models' next-token log-probs ``[batch, seq, vocab]`` on ``input_ids [batch, seq]``.

    Returns ``[batch, seq]`` tensors: ``kl`` (KL(ref || q)), ``agree`` (1.0 where both argmaxes are equal), and,
    for the token each position predicts (``input_ids[:, p + 1]``; the last position predicts nothing and gets
    NaN), ``nll`` and ``nll_reference`` (its negative log-probability under q and ref) and ``correct`` and
    ``correct_reference`` (1.0 where it is the model's argmax).
    """
    import torch

    if reference.shape != quantized.shape:
        raise ValueError(
            f"the two models' log-probs differ in shape: {tuple(reference.shape)} vs {tuple(quantized.shape)} "
            "(a different vocabulary?)"
        )
    reference, quantized = reference.float(), quantized.float()
    targets = input_ids[:, 1:, None].long()
    nan = torch.full((*input_ids.shape[:1], 1), float("nan"))
    predicted = {"q": quantized.argmax(-1), "ref": reference.argmax(-1)}

    def next_token(values: torch.Tensor) -> torch.Tensor:  # [batch, seq - 1] -> [batch, seq], NaN at the end
        return torch.cat([values.float(), nan], dim=1)

    return {
        "kl": kl_per_position(reference, quantized),
        "agree": (predicted["q"] == predicted["ref"]).float(),
        "nll": next_token(-quantized[:, :-1].gather(-1, targets)[..., 0]),
        "nll_reference": next_token(-reference[:, :-1].gather(-1, targets)[..., 0]),
        "correct": next_token(predicted["q"][:, :-1] == targets[..., 0]),
        "correct_reference": next_token(predicted["ref"][:, :-1] == targets[..., 0]),
    }


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values [batch, seq]`` over the positions where ``mask [batch, seq]`` is true: ``[batch]``."""
    mask = mask.to(values.dtype)
    return (values.nan_to_num() * mask).sum(-1) / mask.sum(-1)


def sample_metrics(
    reference: torch.Tensor,
    quantized: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    answer_spans: Sequence[tuple[int, int] | None] | None = None,
) -> dict[str, np.ndarray]:
    """Per-sample metrics ``[batch]`` of two models' next-token log-probs ``[batch, seq, vocab]`` on ``input_ids``.

    ``attention_mask [batch, seq]`` marks real tokens (right padding); ``answer_spans[i] = (start, stop)`` the
    answer tokens ``start..stop - 1`` of sample ``i`` (its end-of-turn token included), or None.

    * ``kl``, ``top1``: mean KL(ref || q) and top-1 agreement over every real position;
    * ``nll``, ``nll_reference``, ``tokens``: mean NLL of the real tokens after the first, and their count;
    * with ``answer_spans``: ``kl_answer`` (mean KL over the positions predicting token ``start`` to the last real
      one), ``answer_nll``, ``answer_nll_reference``, ``answer_tokens`` (over the answer tokens), ``exact`` and
      ``exact_reference`` (1.0 when every answer token is the model's argmax), NaN for a sample without a span.
    """
    import torch

    batch, seq = input_ids.shape
    real = torch.ones(batch, seq, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    lengths = real.sum(-1)
    per_position = position_metrics(reference, quantized, input_ids)
    predicts_real = real.clone()
    predicts_real[:, :-1] &= real[:, 1:]
    predicts_real[:, -1] = False  # position p scores token p + 1
    metrics = {
        "kl": _masked_mean(per_position["kl"], real),
        "top1": _masked_mean(per_position["agree"], real),
        "nll": _masked_mean(per_position["nll"], predicts_real),
        "nll_reference": _masked_mean(per_position["nll_reference"], predicts_real),
        "tokens": predicts_real.sum(-1).float(),
    }
    if answer_spans is not None:
        if len(answer_spans) != batch:
            raise ValueError(f"{len(answer_spans)} answer spans for a batch of {batch} samples")
        positions = torch.arange(seq)
        answer_names = ("kl_answer", "answer_nll", "answer_nll_reference", "answer_tokens", "exact", "exact_reference")
        answer = {name: torch.full((batch,), float("nan")) for name in answer_names}
        for i, span in enumerate(answer_spans):
            if span is None:
                continue
            start, stop = span
            if not 0 < start < stop <= int(lengths[i]):
                raise ValueError(f"answer span {span} of sample {i} is outside its {int(lengths[i])} tokens")
            predicts = (positions >= start - 1) & (positions < stop - 1)  # the positions predicting the answer
            from_answer = (positions >= start - 1) & (positions < int(lengths[i]) - 1)
            answer["kl_answer"][i] = per_position["kl"][i][from_answer].mean()
            answer["answer_nll"][i] = per_position["nll"][i][predicts].mean()
            answer["answer_nll_reference"][i] = per_position["nll_reference"][i][predicts].mean()
            answer["answer_tokens"][i] = float(stop - start)
            answer["exact"][i] = per_position["correct"][i][predicts].min()
            answer["exact_reference"][i] = per_position["correct_reference"][i][predicts].min()
        metrics.update(answer)
    return {name: values.double().numpy() for name, values in metrics.items()}


# ---------------------------------------------------------------- bootstrap intervals


def _draws(samples: int, resamples: int, seed: int) -> np.ndarray:
    """``[resamples, samples]`` indices drawn with replacement (the same draws for the same arguments)."""
    if samples == 0:
        raise ValueError("no samples to resample")
    return np.random.default_rng(seed).integers(0, samples, size=(resamples, samples))


def _interval(point: float, statistics: np.ndarray, confidence: float) -> list[float]:
    tail = 100 * (1 - confidence) / 2
    return [float(point), float(np.nanpercentile(statistics, tail)), float(np.nanpercentile(statistics, 100 - tail))]


def bootstrap_interval(
    values: np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = SEED,
) -> list[float]:
    """``[statistic(values), low, high]``: a statistic of per-sample ``values [n]`` and its bootstrap interval
    (percentiles of the statistic over ``resamples`` resamples of the samples with replacement)."""
    values = np.asarray(values, dtype=float)
    draws = _draws(len(values), resamples, seed)
    return _interval(statistic(values), np.array([statistic(values[d]) for d in draws]), confidence)


def perplexity(nll: np.ndarray, tokens: np.ndarray) -> float:
    """exp of the token-weighted mean of per-sample mean NLLs ``nll [n]`` over ``tokens [n]`` tokens each."""
    return float(np.exp(np.sum(nll * tokens) / np.sum(tokens)))


def perplexity_interval(nll: np.ndarray, tokens: np.ndarray, **options) -> list[float]:
    """:func:`perplexity` with its bootstrap interval over samples (options as :func:`bootstrap_interval`)."""
    nll, tokens = np.asarray(nll, dtype=float), np.asarray(tokens, dtype=float)
    draws = _draws(len(nll), options.get("resamples", BOOTSTRAP_RESAMPLES), options.get("seed", SEED))
    statistics = np.exp((nll[draws] * tokens[draws]).sum(1) / tokens[draws].sum(1))
    return _interval(perplexity(nll, tokens), statistics, options.get("confidence", CONFIDENCE))


def paired_ratio(numerator: np.ndarray, denominator: np.ndarray, **options) -> list[float]:
    """mean(numerator) / mean(denominator) over the same samples, with a paired bootstrap interval."""
    numerator, denominator = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    draws = _draws(len(numerator), options.get("resamples", BOOTSTRAP_RESAMPLES), options.get("seed", SEED))
    ratios = numerator[draws].mean(1) / denominator[draws].mean(1)
    return _interval(numerator.mean() / denominator.mean(), ratios, options.get("confidence", CONFIDENCE))


def paired_difference(first: np.ndarray, second: np.ndarray, **options) -> list[float]:
    """mean(first) - mean(second) over the same samples, with a paired bootstrap interval."""
    return bootstrap_interval(np.asarray(first, dtype=float) - np.asarray(second, dtype=float), **options)


# ---------------------------------------------------------------- evaluation sets


@dataclass
class EvalSet:
    """Samples to score: ``rows`` of ``input_ids`` (and ``attention_mask``, image columns) for one forward each.

    ``kind`` is ``"records"`` (conversations, ``answer_spans`` per row) or ``"text"`` (plain token sequences).
    """

    name: str
    kind: str
    rows: list[dict]
    answer_spans: list[tuple[int, int] | None] = field(default_factory=list)

    @property
    def has_answers(self) -> bool:
        return any(span is not None for span in self.answer_spans)


def answer_span(record: CalibrationRecord, processor, input_ids: Sequence[int]) -> tuple[int, int] | None:
    """Where the record's answer lies in its tokenized conversation ``input_ids``: ``(start, stop)``, or None.

    The tokens ``start..stop - 1`` are those that overlap the answer's characters in the rendered conversation,
    plus the special token right after them (the end of the turn, e.g. ``<|im_end|>``), if there is one. Counted
    from the end of the sequence, so images expanded into image tokens before the answer do not shift it. None
    for an empty answer, or when the answer was cut off (the tokens at the end are not the rendered text's).
    """
    if not record.answer.strip():
        return None
    from qig_plugin.data.calibration import render_conversation

    tokenizer = getattr(processor, "tokenizer", processor)
    text = render_conversation(record, processor)
    has_template = getattr(processor, "chat_template", None) is not None
    answer_start = text.index(record.answer, text.index(record.prompt) + len(record.prompt))
    answer_end = answer_start + len(record.answer)
    encoding = tokenizer(text, add_special_tokens=not has_template, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    first = next(i for i, (_, end) in enumerate(offsets) if end > answer_start)
    last = max(i for i, (begin, _) in enumerate(offsets) if begin < answer_end)
    if last + 1 < len(ids) and ids[last + 1] in set(tokenizer.all_special_ids):
        last += 1  # the end of the turn: the model must stop there too
    tail = len(ids) - first
    if len(input_ids) < tail or list(input_ids[len(input_ids) - tail :]) != list(ids[first:]):
        return None
    start = len(input_ids) - tail
    return start, start + (last - first + 1)


def records_set(name: str, records: list[CalibrationRecord], processor) -> EvalSet:
    """Records tokenized as for calibration (no truncation), with their answer spans."""
    from qig_plugin.data import build_calibration_dataset

    dataset = build_calibration_dataset(records, processor, max_length=2**31 - 1)
    rows = [{k: v for k, v in row.items() if k != "loss_mask"} for row in dataset]
    spans = [answer_span(record, processor, row["input_ids"]) for record, row in zip(records, rows)]
    return EvalSet(name, "records", rows, spans)


def text_set(name: str, passages: Iterable[Sequence[int]]) -> EvalSet:
    """Token-id passages as an evaluation set (no answers: perplexity of every token)."""
    rows = [{"input_ids": list(ids), "attention_mask": [1] * len(ids)} for ids in passages]
    return EvalSet(name, "text", rows)


def tokenized_set(name: str, dataset) -> EvalSet:
    """A tokenized ``datasets.Dataset`` (``input_ids`` and optionally ``attention_mask``, image columns)."""
    rows = [{k: v for k, v in row.items() if k != "loss_mask"} for row in dataset]
    return EvalSet(name, "text", rows)


def shipped_topics() -> frozenset[str]:
    """Every ``pydoc_data.topics`` topic a shipped record uses (VLM and text-only records, both splits)."""
    from qig_plugin.data.records import PASSAGE_TASKS, TEXT_ONLY_TOPICS

    return frozenset(topic for topic, *_ in PASSAGE_TASKS) | frozenset(TEXT_ONLY_TOPICS)


def heldout_text_passages(
    tokenizer, count: int = TEXT_PASSAGES, tokens: int = TEXT_TOKENS, exclude: Iterable[str] | None = None
) -> list[list[int]]:
    """``count`` real documentation passages (``pydoc_data.topics``), ``tokens`` ids each, chosen with seed ``SEED``
    among the topics longer than ``4 * tokens`` characters that are not in ``exclude`` (default
    :func:`shipped_topics`, so that no calibration record of ``qig quantize`` has seen them)."""
    import pydoc_data.topics

    excluded = shipped_topics() if exclude is None else frozenset(exclude)
    candidates = sorted(
        name for name, text in pydoc_data.topics.topics.items() if name not in excluded and len(text) > 4 * tokens
    )
    chosen = np.random.default_rng(SEED).choice(len(candidates), count, replace=False)
    passages = []
    for index in sorted(chosen):
        ids = tokenizer(pydoc_data.topics.topics[candidates[index]], add_special_tokens=False)["input_ids"]
        passages.append(list(ids[:tokens]))
    return passages


def text_passages(text: str, tokenizer, tokens: int = TEXT_TOKENS) -> list[list[int]]:
    """A text cut into consecutive passages of ``tokens`` ids (a shorter last one if it has at least 2 tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [ids[i : i + tokens] for i in range(0, len(ids), tokens) if len(ids[i : i + tokens]) >= 2]


# ---------------------------------------------------------------- running the models


def _collate(row: dict) -> dict:
    from qig_plugin.data import batch_one_collator

    return batch_one_collator([row])


def next_token_log_probs(model, row: dict) -> torch.Tensor:
    """The model's next-token log-probs ``[1, seq, vocab]`` (float32) for one row (``input_ids`` etc.)."""
    import torch

    with torch.no_grad():
        return model(**_collate(row), use_cache=False).logits.float().log_softmax(-1)


def evaluate(reference_model, quantized_model, sets: Sequence[EvalSet], *, progress: bool = False
             ) -> dict[str, dict[str, np.ndarray]]:
    """Per-sample metrics (:func:`sample_metrics`) of each set: ``{set name: {metric: [samples]}}``.

    Both models see every row in turn (one row at a time: only two rows' log-probs are held at once);
    ``progress`` shows a progress bar per set.
    """
    import torch
    from tqdm.auto import tqdm

    results = {}
    for eval_set in sets:
        per_sample: dict[str, list[float]] = {}
        for index, row in enumerate(tqdm(eval_set.rows, desc=f"Scoring {eval_set.name}", disable=not progress)):
            reference = next_token_log_probs(reference_model, row)
            quantized = next_token_log_probs(quantized_model, row)
            spans = [eval_set.answer_spans[index]] if eval_set.answer_spans else None
            metrics = sample_metrics(reference, quantized, torch.as_tensor(row["input_ids"])[None], answer_spans=spans)
            for name, values in metrics.items():
                per_sample.setdefault(name, []).append(float(values[0]))
        results[eval_set.name] = {name: np.array(values) for name, values in per_sample.items()}
    return results


# ---------------------------------------------------------------- summary, table, plot

METRIC_LABELS = {
    "kl": "KL(ref || q), all positions",
    "kl_answer": "KL(ref || q), answer positions",
    "top1": "top-1 agreement",
    "exact": "answer exact match",
    "answer_ppl": "answer perplexity",
    "ppl": "perplexity",
}


def summarize(per_sample: dict[str, np.ndarray], kind: str) -> dict[str, list[float] | float | int]:
    """Means with bootstrap intervals of one set's per-sample metrics (see :func:`sample_metrics`).

    ``kl``, ``top1`` (and for records with answers ``kl_answer``, ``exact``, ``exact_reference``, the paired
    ``exact_difference`` q - ref, ``answer_ppl``, ``answer_ppl_reference``; for text ``ppl``, ``ppl_reference``
    and the paired ``ppl_ratio`` q / ref) as ``[value, low, high]``; ``samples``, ``tokens``.
    """
    summary: dict[str, list[float] | float | int] = {
        "samples": len(per_sample["kl"]),
        "tokens": int(per_sample["tokens"].sum()),
        "kl": bootstrap_interval(per_sample["kl"]),
        "top1": bootstrap_interval(per_sample["top1"]),
    }
    if kind == "text":
        nll, nll_reference, tokens = per_sample["nll"], per_sample["nll_reference"], per_sample["tokens"]
        summary["ppl"] = perplexity_interval(nll, tokens)
        summary["ppl_reference"] = perplexity_interval(nll_reference, tokens)
        summary["ppl_ratio"] = _paired_perplexity_ratio(nll, nll_reference, tokens)
    answered = ~np.isnan(per_sample.get("exact", np.array([np.nan])))
    if "exact" in per_sample and answered.any():
        answer = {name: values[answered] for name, values in per_sample.items()}
        summary["answered"] = int(answered.sum())
        summary["kl_answer"] = bootstrap_interval(answer["kl_answer"])
        summary["exact"] = bootstrap_interval(answer["exact"])
        summary["exact_reference"] = bootstrap_interval(answer["exact_reference"])
        summary["exact_difference"] = paired_difference(answer["exact"], answer["exact_reference"])
        summary["answer_ppl"] = perplexity_interval(answer["answer_nll"], answer["answer_tokens"])
        summary["answer_ppl_reference"] = perplexity_interval(answer["answer_nll_reference"], answer["answer_tokens"])
    return summary


def _paired_perplexity_ratio(nll: np.ndarray, nll_reference: np.ndarray, tokens: np.ndarray) -> list[float]:
    draws = _draws(len(nll), BOOTSTRAP_RESAMPLES, SEED)
    difference = ((nll[draws] - nll_reference[draws]) * tokens[draws]).sum(1) / tokens[draws].sum(1)
    return _interval(perplexity(nll, tokens) / perplexity(nll_reference, tokens), np.exp(difference), CONFIDENCE)


def _fmt(interval: list[float], digits: int) -> str:
    value, low, high = interval
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _digits(interval: list[float]) -> int:
    """Enough decimals for the interval's width to show (2 significant digits of the smaller of value, width)."""
    scale = min(abs(interval[0]) or 1.0, (interval[2] - interval[1]) or abs(interval[0]) or 1.0)
    return min(6, max(2, 1 - math.floor(math.log10(scale))))


def format_table(summaries: dict[str, dict], kinds: dict[str, str]) -> str:
    """The console table: one block per set, quantized value [95% interval] and the reference's where it has one."""
    lines = [f"{'':36s} {'quantized [95% interval]':>30s}   {'reference':>9s}"]
    for name, summary in summaries.items():
        answered = f", {summary['answered']} with answers" if "answered" in summary else ""
        lines.append(f"{name} ({summary['samples']} samples, {summary['tokens']} tokens{answered})")
        rows = [("kl", None), ("top1", None)]
        if kinds[name] == "text":
            rows.append(("ppl", "ppl_reference"))
        if "answered" in summary:
            rows[1:1] = [("kl_answer", None)]
            rows += [("exact", "exact_reference"), ("answer_ppl", "answer_ppl_reference")]
        for metric, reference in rows:
            interval = summary[metric]
            digits = 3 if metric in ("top1", "exact") else (2 if "ppl" in metric else _digits(interval))
            reference_text = f"{summary[reference][0]:.{digits}f}" if reference else ""
            lines.append(f"  {METRIC_LABELS[metric]:34s} {_fmt(interval, digits):>30s}   {reference_text:>9s}")
    return "\n".join(lines)


def plot_summary(per_sample: dict[str, dict[str, np.ndarray]], summaries: dict[str, dict], title: str,
                 path: Path) -> None:
    """A PNG of the evaluation: per-sample KL of each set (log scale, mean and interval), top-1 agreement and
    answer exact match (quantized vs reference), and perplexities (quantized vs reference), with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summaries)
    figure, (kl_axis, share_axis, ppl_axis) = plt.subplots(1, 3, figsize=(14, 4.2))
    for i, name in enumerate(names):
        values = per_sample[name]["kl"]
        jitter = np.random.default_rng(SEED).uniform(-0.15, 0.15, len(values))
        kl_axis.scatter(i + jitter, np.maximum(values, 1e-12), s=10, alpha=0.5, color="tab:blue")
        mean, low, high = summaries[name]["kl"]
        kl_axis.errorbar(i + 0.3, mean, yerr=[[mean - low], [high - mean]], fmt="D", color="black", capsize=3)
    kl_axis.set_xticks(range(len(names)), names, fontsize=8)
    kl_axis.set_yscale("log")
    kl_axis.set_title("KL(ref || q) per sample (lower is better)", fontsize=9)

    def bars(axis, entries: list[tuple[str, list[float], list[float] | None]], ylabel: str) -> None:
        labelled = set()
        for j, (label, quantized, reference) in enumerate(entries):
            for offset, interval, color, legend in ((-0.2, quantized, "tab:orange", "quantized"),
                                                    (0.2, reference, "tab:gray", "reference")):
                if interval is None:
                    continue
                axis.bar(j + offset, interval[0], 0.4, color=color, label=None if legend in labelled else legend,
                         yerr=[[interval[0] - interval[1]], [interval[2] - interval[0]]], capsize=3)
                labelled.add(legend)
        axis.set_xticks(range(len(entries)), [label for label, *_ in entries], fontsize=8)
        axis.set_ylabel(ylabel)
        if entries:
            axis.legend(fontsize=8)

    shares = [(f"{name}\ntop-1 agree", summaries[name]["top1"], None) for name in names]
    shares += [(f"{name}\nexact match", summaries[name]["exact"], summaries[name]["exact_reference"])
               for name in names if "exact" in summaries[name]]
    bars(share_axis, shares, "share")
    share_axis.set_ylim(0, 1.05)
    share_axis.set_title("agreement with the reference, answers right", fontsize=9)
    ppls = [(f"{name}\ntext", summaries[name]["ppl"], summaries[name]["ppl_reference"])
            for name in names if "ppl" in summaries[name]]
    ppls += [(f"{name}\nanswers", summaries[name]["answer_ppl"], summaries[name]["answer_ppl_reference"])
             for name in names if "answer_ppl" in summaries[name]]
    bars(ppl_axis, ppls, "perplexity")
    ppl_axis.set_title("perplexity (lower is better)", fontsize=9)
    figure.suptitle(title + " (95% bootstrap intervals)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def to_json(header: dict, per_sample: dict[str, dict[str, np.ndarray]], summaries: dict[str, dict],
            kinds: dict[str, str]) -> str:
    """The evaluation as JSON: ``header`` (checkpoint, reference, ...), the bootstrap settings, and per set its
    kind, summary and per-sample metrics (NaN as null)."""

    def clean(values: np.ndarray) -> list[float | None]:
        return [None if math.isnan(value) else float(value) for value in values]

    document = {
        **header,
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "confidence": CONFIDENCE, "seed": SEED},
        "sets": [
            {"name": name, "kind": kinds[name], **summaries[name],
             "per_sample": {metric: clean(values) for metric, values in per_sample[name].items()}}
            for name in summaries
        ],
    }
    return json.dumps(document, indent=1) + "\n"


def replace_images(records: list[CalibrationRecord], image=None) -> list[CalibrationRecord]:
    """The records with their images replaced (``None``: text-only), e.g. to score a VLM's records on its LLM."""
    return [dataclasses.replace(record, image=image) for record in records]
