"""``qig eval`` and ``qig_plugin.evaluation``: the metrics on hand-made log-probs, bootstrap intervals, answer
spans, a saved checkpoint scoring as the in-memory quantized model, the command end to end on a tiny Idefics3
W4A16 checkpoint, and its refusals of bad input (before any model is loaded, nothing written)."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from qig_plugin.cli import main
from qig_plugin.data import build_calibration_dataset, shipped_records, shipped_text_records
from qig_plugin.evaluation import (
    answer_span,
    bootstrap_interval,
    next_token_log_probs,
    paired_ratio,
    perplexity_interval,
    records_set,
    sample_metrics,
    text_passages,
)
from qig_plugin.models import load_processor
from qig_plugin.quantize import quantize_to_checkpoint
from qig_plugin.recipes import shipped_recipe
from tests.tiny_text_folder import build_tiny_text_folder
from tests.tiny_vlm_folder import build_tiny_vlm_folder


def log_probs(probabilities) -> torch.Tensor:
    return torch.tensor(probabilities, dtype=torch.float32).log()


# ---------------------------------------------------------------- metrics


def test_identical_models_have_zero_kl_full_agreement_and_equal_nll():
    reference = torch.randn(2, 5, 7).log_softmax(-1)
    ids = torch.randint(0, 7, (2, 5))
    metrics = sample_metrics(reference, reference.clone(), ids, answer_spans=[(2, 5), None])
    assert np.allclose(metrics["kl"], 0, atol=1e-6) and np.all(metrics["top1"] == 1)
    assert np.allclose(metrics["nll"], metrics["nll_reference"]) and list(metrics["tokens"]) == [4, 4]
    assert metrics["exact"][0] == metrics["exact_reference"][0] and math.isnan(metrics["exact"][1])


def test_metrics_match_hand_computed_values():
    # vocab 2, one sample of 3 tokens [0, 1, 1]; the answer is tokens 1..2
    reference = log_probs([[[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]]])
    quantized = log_probs([[[0.25, 0.75], [0.2, 0.8], [0.6, 0.4]]])
    ids = torch.tensor([[0, 1, 1]])
    metrics = sample_metrics(reference, quantized, ids, answer_spans=[(1, 3)])
    kl = [0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), 0.0, 0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4)]
    assert metrics["kl"][0] == pytest.approx(sum(kl) / 3, rel=1e-5)
    assert metrics["kl_answer"][0] == pytest.approx((kl[0] + kl[1]) / 2, rel=1e-5)  # positions 0, 1 predict 1, 2
    assert metrics["top1"][0] == pytest.approx(2 / 3)  # position 0: argmax 1 vs a tie (argmax 0)
    assert metrics["nll"][0] == pytest.approx(-(math.log(0.75) + math.log(0.8)) / 2, rel=1e-5)
    assert metrics["nll_reference"][0] == pytest.approx(-(math.log(0.5) + math.log(0.8)) / 2, rel=1e-5)
    assert metrics["exact"][0] == 1.0 and metrics["exact_reference"][0] == 0.0  # the reference's tie picks token 0


def test_right_padding_is_left_out():
    reference, quantized = torch.randn(2, 6, 5).log_softmax(-1), torch.randn(2, 6, 5).log_softmax(-1)
    ids = torch.randint(0, 5, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    padded = sample_metrics(reference, quantized, ids, attention_mask=mask)
    alone = sample_metrics(reference[1:, :4], quantized[1:, :4], ids[1:, :4])
    for name in ("kl", "top1", "nll", "nll_reference", "tokens"):
        assert padded[name][1] == pytest.approx(alone[name][0], rel=1e-6), name


def test_different_vocabularies_are_refused():
    with pytest.raises(ValueError, match="different vocabulary"):
        sample_metrics(torch.zeros(1, 3, 4), torch.zeros(1, 3, 5), torch.zeros(1, 3, dtype=torch.long))


def test_bootstrap_intervals():
    values = np.random.default_rng(1).exponential(size=40)
    mean, low, high = bootstrap_interval(values)
    assert low < mean < high and mean == pytest.approx(values.mean())
    assert bootstrap_interval(values) == [mean, low, high]  # seeded
    assert bootstrap_interval(np.full(10, 0.5)) == [0.5, 0.5, 0.5]
    assert paired_ratio(values, values) == pytest.approx([1.0, 1.0, 1.0])
    nll, tokens = np.array([1.0, 3.0]), np.array([3.0, 1.0])
    assert perplexity_interval(nll, tokens)[0] == pytest.approx(math.exp(1.5))  # token-weighted


# ---------------------------------------------------------------- data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Idefics3, its W4A16 checkpoint from quantize_to_checkpoint, and the in-memory quantized model's
    log-probs on two held-out records."""
    root = tmp_path_factory.mktemp("eval")
    folder = build_tiny_vlm_folder(root)
    processor = load_processor(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    dataset = build_calibration_dataset(shipped_records("calibration")[:2], processor)
    heldout = records_set("held-out", shipped_records("heldout")[:2], processor)
    checkpoint = root / "w4a16"
    quantize_to_checkpoint(model, processor, shipped_recipe("qig_gptq_w4a16_g128"), dataset, checkpoint)
    in_memory = [next_token_log_probs(model, row) for row in heldout.rows]
    return {"folder": folder, "checkpoint": checkpoint, "processor": processor, "heldout": heldout,
            "in_memory": in_memory}


def test_answer_spans_hold_the_answer_and_the_end_of_turn(tiny, tmp_path):
    processor, heldout = tiny["processor"], tiny["heldout"]
    records = shipped_records("heldout")[:2]
    for record, row, (start, stop) in zip(records, heldout.rows, heldout.answer_spans):
        assert processor.tokenizer.decode(row["input_ids"][start:stop]) == record.answer + "<|im_end|>"
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(build_tiny_text_folder(tmp_path, chat_template=None))
    record = shipped_text_records("heldout")[0]
    ids = base(f"{record.prompt}\n\n{record.answer}")["input_ids"]
    start, stop = answer_span(record, base, ids)
    assert base.decode(ids[start:stop]).strip() == record.answer and stop == len(ids)  # no end-of-turn token
    assert answer_span(record, base, ids[:-3]) is None  # cut off


def test_the_answer_span_of_a_multi_turn_record_is_its_first_answer(tiny):
    processor = tiny["processor"]
    record = dataclasses.replace(shipped_records("heldout")[0], follow_ups=(("And the sky?", "Blue."),))
    scored = records_set("multi-turn", [record], processor)
    (row,), (span,) = scored.rows, scored.answer_spans
    start, stop = span
    assert processor.tokenizer.decode(row["input_ids"][start:stop]) == record.answer + "<|im_end|>"
    assert processor.tokenizer.decode(row["input_ids"][stop:]).count("Blue.") == 1  # the later turn follows


def test_text_is_cut_into_passages(tiny):
    tokenizer = tiny["processor"].tokenizer
    passages = text_passages("word " * 300, tokenizer, tokens=64)
    assert all(len(p) == 64 for p in passages[:-1]) and 2 <= len(passages[-1]) <= 64


# ---------------------------------------------------------------- checkpoints


def test_saved_checkpoint_scores_as_the_in_memory_quantized_model(tiny):
    from qig_plugin.cli import _load_model
    from qig_plugin.validation import read_config

    checkpoint = tiny["checkpoint"]
    loaded = _load_model(checkpoint, read_config(checkpoint), trust_remote_code=False)
    for row, expected in zip(tiny["heldout"].rows, tiny["in_memory"]):
        assert torch.equal(next_token_log_probs(loaded, row), expected)


def test_qig_eval_scores_a_checkpoint_against_its_parent(tiny, tmp_path, capsys):
    records = tmp_path / "records.jsonl"
    records.write_text("\n".join(json.dumps({"image": None, "prompt": p, "answer": a})
                                 for p, a in [("What is 2 + 2?", "4"), ("Name a colour.", "")]) + "\n")
    notes = tmp_path / "notes.txt"
    notes.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    output = tmp_path / "eval" / "w4a16.json"
    assert main(["eval", str(tiny["checkpoint"]), "--reference", str(tiny["folder"]), "--data", str(records),
                 str(notes), "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "records.jsonl (2 samples" in out and "1 with answers" in out and "answer exact match" in out
    assert "notes.txt" in out and "perplexity" in out
    document = json.loads(output.read_text())
    assert document["scheme"] == "W4A16" and document["bootstrap"]["resamples"] == 2000
    sets = {entry["name"]: entry for entry in document["sets"]}
    assert sets["records.jsonl"]["answered"] == 1 and sets["records.jsonl"]["per_sample"]["exact"][1] is None
    assert 0 < sets["notes.txt"]["kl"][0] < 0.1 and sets["notes.txt"]["ppl"][1] <= sets["notes.txt"]["ppl"][0]
    assert output.with_suffix(".png").stat().st_size > 10_000


def test_qig_eval_defaults_to_the_shipped_heldout_set(tiny, tmp_path, capsys):
    output = tmp_path / "default.json"
    assert main(["eval", str(tiny["checkpoint"]), "--reference", str(tiny["folder"]), "--max-samples", "2",
                 "--output", str(output)]) == 0
    names = [entry["name"] for entry in json.loads(output.read_text())["sets"]]
    assert names == ["held-out records", "held-out text"]
    assert "held-out records (2 samples" in capsys.readouterr().out


# ---------------------------------------------------------------- bad input: exit 2, one message, nothing written


def refused(args, tmp_path, capsys) -> str:
    output = tmp_path / "out" / "eval.json"
    assert main(["eval", *map(str, args), "--output", str(output)]) == 2
    assert not output.parent.exists()
    return capsys.readouterr().err


def test_a_checkpoint_that_is_not_quantized_is_refused(tiny, tmp_path, capsys):
    err = refused([tiny["folder"], "--reference", tiny["folder"]], tmp_path, capsys)
    assert "is not a quantized checkpoint (its config.json has no quantization_config)" in err


def test_a_quantized_reference_is_refused(tiny, tmp_path, capsys):
    err = refused([tiny["checkpoint"], "--reference", tiny["checkpoint"]], tmp_path, capsys)
    assert "is itself quantized (W4A16)" in err


def test_mismatched_vocabularies_are_refused(tiny, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny["checkpoint"], other)
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["vocab_size"] = 1024
    (other / "config.json").write_text(json.dumps(config))
    err = refused([other, "--reference", tiny["folder"]], tmp_path, capsys)
    assert "mismatched vocabularies" in err and "has 1024 tokens" in err and "has 512" in err

    retokenized = tmp_path / "retokenized"  # same vocabulary size, other tokens
    shutil.copytree(tiny["checkpoint"], retokenized)
    text_folder = build_tiny_text_folder(tmp_path / "text")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(text_folder / name, retokenized / name)
    err = refused([retokenized, "--reference", tiny["folder"]], tmp_path, capsys)
    assert "mismatched vocabularies: the tokenizers of" in err


def test_a_text_model_is_no_reference_for_a_vlm_checkpoint(tiny, tmp_path, capsys):
    err = refused([tiny["checkpoint"], "--reference", build_tiny_text_folder(tmp_path)], tmp_path, capsys)
    assert "is a vision-language idefics3 model but --reference" in err and "text-only llama" in err


def test_missing_or_empty_data_is_refused(tiny, tmp_path, capsys):
    base = [tiny["checkpoint"], "--reference", tiny["folder"], "--data"]
    assert "evaluation data" in refused([*base, tmp_path / "missing.jsonl"], tmp_path, capsys)
    (tmp_path / "empty.txt").write_text("\n")
    assert "holds no text to score" in refused([*base, tmp_path / "empty.txt"], tmp_path, capsys)
    (tmp_path / "empty.jsonl").write_text("")
    assert "holds no calibration records" in refused([*base, tmp_path / "empty.jsonl"], tmp_path, capsys)


def test_missing_checkpoint_and_bad_output_are_refused(tiny, tmp_path, capsys):
    assert "is not a checkpoint folder" in refused([tmp_path / "nowhere", "--reference", tiny["folder"]],
                                                   tmp_path, capsys)
    assert main(["eval", str(tiny["checkpoint"]), "--reference", str(tiny["folder"]),
                 "--output", str(tmp_path / "eval.csv")]) == 2
    assert "must end in .json" in capsys.readouterr().err
    (tmp_path / "taken.json").write_text("{}")
    assert main(["eval", str(tiny["checkpoint"]), "--reference", str(tiny["folder"]),
                 "--output", str(tmp_path / "taken.json")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_token_ids_beyond_the_vocabulary_are_refused(tiny, tmp_path, capsys):
    from datasets import Dataset

    folder = tmp_path / "tokenized"
    Dataset.from_list([{"input_ids": [1, 2, 600], "attention_mask": [1, 1, 1]}]).save_to_disk(str(folder))
    assert main(["eval", str(tiny["checkpoint"]), "--reference", str(tiny["folder"]), "--data", str(folder),
                 "--output", str(tmp_path / "eval.json")]) == 2
    assert "holds token id 600, but the model's vocabulary has 512" in capsys.readouterr().err
