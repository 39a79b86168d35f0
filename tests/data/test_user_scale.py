"""Calibration data at user scale: the installed corpora, their document splits, and the records built from them
(qig_plugin.data.corpora, qig_plugin.data.user_scale, CalibrationRecord.follow_ups)."""

from __future__ import annotations

import hashlib
import re
import time

import pytest
import torch

from qig_plugin.data import CalibrationRecord, build_calibration_dataset, corpora, user_scale
from qig_plugin.data.corpora import CORPORA, SPLITS

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def processor(default_model_dir):
    from qig_plugin.models.default_model import load_processor

    return load_processor(default_model_dir)


@pytest.fixture(scope="module")
def text_tokenizer():
    from transformers import AutoTokenizer

    from qig_plugin.models.default_model import build_text_model

    return AutoTokenizer.from_pretrained(build_text_model())


@pytest.fixture(scope="module")
def calibration_256(processor):
    start = time.perf_counter()
    records = user_scale.vlm_records("calibration", 256, seed=0, processor=processor)
    return records, time.perf_counter() - start


def _image_hash(record: CalibrationRecord) -> str:
    return hashlib.sha256(record.image.tobytes()).hexdigest()


def _texts(record: CalibrationRecord) -> str:
    return "\n".join([record.prompt, record.answer, *(part for turn in record.follow_ups for part in turn)])


# ---------------------------------------------------------------- corpora


def test_every_corpus_is_installed_and_split_about_80_10_10_by_document():
    for name in CORPORA:
        documents = corpora.all_documents(name)
        ids = [document.id for document in documents]
        assert len(ids) == len(set(ids)), name
        by_split = {split: corpora.corpus_documents(name, split) for split in SPLITS}
        assert sum(len(docs) for docs in by_split.values()) == len(documents)
        assert set().union(*({d.id for d in docs} for docs in by_split.values())) == set(ids)
        for split, docs in by_split.items():
            share = len(docs) / len(documents)
            expected = corpora.SPLIT_PERCENT[split] / 100
            assert abs(share - expected) < 0.05, (name, split, share)
    assert len(corpora.all_documents("brown")) == 500
    assert len(corpora.all_documents("pydocs")) > 400
    assert len(corpora.all_documents("fortunes")) > 10_000


def test_the_splits_are_a_stable_function_of_the_document():
    assert corpora.split_of("brown/ca01") == corpora.split_of("brown/ca01")
    assert [d.id for d in corpora.corpus_documents("brown", "heldout")][:3] == [
        d.id for d in corpora.all_documents("brown") if corpora.split_of(d.id) == "heldout"
    ][:3]


def test_copies_of_a_fortune_share_one_split_and_only_one_is_kept():
    documents = corpora.all_documents("fortunes")
    keys = [d.split_key for d in documents]
    assert len(keys) == len(set(keys))
    assert corpora.fortune_key("Hello,  World!\n\t-- Anon") == corpora.fortune_key("hello world -- anon")


def test_brown_text_has_no_tags_and_normal_punctuation_spacing():
    text = corpora.all_documents("brown")[0].text
    assert text.startswith("The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary")
    assert '"no evidence"' in text
    assert "/nn" not in text and " ," not in text and " ." not in text and "``" not in text
    assert corpora.detokenize_brown("He/pps said/vbd ,/, ``/`` no/at ''/'' ./.") == 'He said, "no".'


def test_a_missing_corpus_names_itself_and_the_install_command(monkeypatch, tmp_path):
    corpora._brown_documents.cache_clear()
    monkeypatch.setenv("QIG_CORPORA", str(tmp_path))
    try:
        with pytest.raises(corpora.CorpusNotInstalledError, match=r"'brown'.*scripts/setup_corpora.sh"):
            corpora.corpus_documents("brown", "calibration")
        with pytest.raises(corpora.CorpusNotInstalledError, match="brown"):
            user_scale.text_records("calibration", 4, tokenizer=object())
    finally:
        corpora._brown_documents.cache_clear()
    monkeypatch.setattr(corpora, "FORTUNES_DIR", tmp_path / "none")
    corpora._fortune_documents.cache_clear()
    try:
        with pytest.raises(corpora.CorpusNotInstalledError, match=r"'fortunes'.*setup_corpora.sh.*fortunes-min"):
            corpora.all_documents("fortunes")
    finally:
        corpora._fortune_documents.cache_clear()
    with pytest.raises(ValueError, match="unknown corpus"):
        corpora.all_documents("gutenberg")


# ---------------------------------------------------------------- follow-up turns


def test_follow_ups_become_extra_turns_with_every_answer_placed(processor):
    record = CalibrationRecord(
        user_scale._split_images("calibration")[0][1][0].image(),
        "what shape is it?", "circle", (("what color is it?", "teal"), ("is it a square?", "no")),
    )
    (row,) = build_calibration_dataset([record], processor, max_length=2048)
    text = processor.tokenizer.decode(row["input_ids"])
    turns = re.findall(r"<\|im_start\|>(user|assistant)\n(.*?)<\|im_end\|>", text, re.DOTALL)
    assert [role for role, _ in turns] == ["user", "assistant"] * 3
    assert [content for role, content in turns if role == "assistant"] == ["circle", "teal", "no"]
    assert turns[2][1] == "what color is it?" and "<image>" not in turns[2][1] and "<image>" in turns[0][1]
    assert user_scale.record_tokens(record, processor) == len(row["input_ids"])
    # Without follow-ups a row is what it always was.
    (plain,) = build_calibration_dataset([CalibrationRecord(record.image, "what shape is it?", "circle")], processor)
    assert text.startswith(processor.tokenizer.decode(plain["input_ids"]))
    with pytest.raises(ValueError, match="follow-up"):
        build_calibration_dataset([CalibrationRecord(None, "p", "a", (("q",),))], processor.tokenizer)


# ---------------------------------------------------------------- records


def test_256_vlm_records_reach_64k_tokens_near_256_each(calibration_256, processor):
    records, seconds = calibration_256
    assert len(records) == 256 and all(record.image is not None for record in records)
    dataset = build_calibration_dataset(records, processor, max_length=2048)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    assert sum(lengths) >= 64 * 1024
    assert lengths == [user_scale.record_tokens(record, processor) for record in records]
    assert sorted(lengths)[len(lengths) // 2] in range(240, 300)
    assert max(lengths) <= user_scale.TARGET_TOKENS + user_scale.TURN_SLACK_TOKENS + 8
    assert seconds < 60


def test_vlm_records_mix_easy_vqa_conversations_and_real_text(calibration_256):
    records, _ = calibration_256
    answers = set(__import__("qig_plugin.data.easy_vqa", fromlist=["ANSWERS"]).ANSWERS)
    vqa = [r for r in records if r.answer in answers and len(r.follow_ups) >= 3]
    assert 0.3 * len(records) <= len(vqa) <= 0.5 * len(records)
    assert any("Continue" in r.prompt for r in records)
    assert any(r.prompt.startswith(("Give me a quotation", "Tell me a fortune")) or
               any(p.startswith(("Give me a quotation", "Tell me a fortune")) for p, _ in r.follow_ups)
               for r in records)


def test_records_are_deterministic_and_seeds_sample_differently(processor, text_tokenizer):
    first = user_scale.vlm_records("validation", 12, seed=3, processor=processor)
    again = user_scale.vlm_records("validation", 12, seed=3, processor=processor)
    other = user_scale.vlm_records("validation", 12, seed=4, processor=processor)
    assert [_texts(r) for r in first] == [_texts(r) for r in again]
    assert [_image_hash(r) for r in first] == [_image_hash(r) for r in again]
    assert [_texts(r) for r in first] != [_texts(r) for r in other]
    texts = user_scale.text_records("validation", 12, seed=3, tokenizer=text_tokenizer)
    assert [_texts(r) for r in texts] == [
        _texts(r) for r in user_scale.text_records("validation", 12, seed=3, tokenizer=text_tokenizer)]


def test_splits_are_disjoint_by_image_and_by_document(processor):
    records = {split: user_scale.vlm_records(split, 48, seed=1, processor=processor) for split in SPLITS}
    images = {split: {_image_hash(r) for r in rs} for split, rs in records.items()}
    for a, b in [("calibration", "validation"), ("calibration", "heldout"), ("validation", "heldout")]:
        assert not images[a] & images[b]
        assert not set(user_scale.split_image_ids(a)) & set(user_scale.split_image_ids(b))
    assert {s for s, _ in user_scale.split_image_ids("heldout")} == {"test"}
    assert {s for s, _ in user_scale.split_image_ids("calibration")} == {"train"}
    # Every long-enough passage or answer comes from a document of its own split and of no other.
    documents = {split: [d.text for name in CORPORA for d in corpora.corpus_documents(name, split)]
                 for split in SPLITS}
    for split, rs in records.items():
        for record in rs:
            for piece in [record.answer, *(answer for _, answer in record.follow_ups)]:
                if len(piece) < 80:
                    continue
                homes = [s for s in SPLITS if any(piece in text for text in documents[s])]
                assert homes == [split], (split, piece[:60], homes)


def test_text_records_have_no_images_and_reach_the_target(text_tokenizer):
    records = user_scale.text_records("heldout", 64, seed=0, tokenizer=text_tokenizer)
    assert all(record.image is None for record in records)
    dataset = build_calibration_dataset(records, text_tokenizer, max_length=2048)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    assert sum(lengths) >= 64 * 250
    assert lengths == [user_scale.record_tokens(record, text_tokenizer) for record in records]


def test_heldout_corpus_passages_are_real_heldout_text(text_tokenizer):
    passages = user_scale.heldout_corpus_passages(text_tokenizer, count=16, tokens=256)
    assert len(passages) == 16 and all(len(p) == 256 for p in passages)
    heldout = [d.text for name in ("brown", "pydocs") for d in corpora.corpus_documents(name, "heldout")]
    for passage in passages:
        text = text_tokenizer.decode(passage)
        assert any(text[:200] in document for document in heldout)
    assert passages == user_scale.heldout_corpus_passages(text_tokenizer, count=16, tokens=256)
