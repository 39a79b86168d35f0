"""Training the default model's vision tower and connector on easy-VQA, the language model frozen."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from qig_plugin.data import easy_vqa
from qig_plugin.models.train_vision import (
    PAIRS,
    ChatLayout,
    Trainer,
    TrainSettings,
    _batch_indices,
    augment,
    main,
    pair_index,
)
from tests.tiny_models import tiny_idefics3

TINY_SETTINGS = TrainSettings(
    prompt_steps=2, prompt_batch=4, vision_steps=2, vision_batch=4, eval_every=1, eval_questions=8, checkpoint_every=1
)


def _frozen_state(model) -> dict[str, torch.Tensor]:
    return {
        name: tensor.clone()
        for name, tensor in model.state_dict().items()
        if not name.startswith(("model.vision_model.", "model.connector."))
    }


def test_batches_cover_each_epoch_once_and_do_not_depend_on_the_step_they_resume_from():
    epoch = [i for step in range(5) for i in _batch_indices(0, "answer", step, 4, 20)]
    assert sorted(epoch) == list(range(20))
    assert _batch_indices(0, "answer", 7, 4, 20) == _batch_indices(0, "answer", 7, 4, 20)
    assert _batch_indices(0, "answer", 5, 4, 20) != _batch_indices(1, "answer", 5, 4, 20)
    assert len(_batch_indices(0, "answer", 4, 6, 20)) == 6  # a batch across the epoch boundary


def test_augment_is_seeded_and_only_mirrors():
    pixels = torch.rand(8, 3, 64, 64)
    first = augment(pixels, torch.Generator().manual_seed(3))
    assert torch.equal(first, augment(pixels, torch.Generator().manual_seed(3)))
    mirrored = [torch.equal(a, p.flip(2)) for a, p in zip(first, pixels)]
    assert all(m or torch.equal(a, p) for m, a, p in zip(mirrored, first, pixels)) and any(mirrored)
    assert not all(mirrored)


def test_every_image_pair_has_a_row_and_unknown_labels_have_none():
    assert len(PAIRS) == len(easy_vqa.COLORS) * len(easy_vqa.SHAPES)
    assert PAIRS[pair_index({"color": "teal", "shape": "triangle"})] == ("teal", "triangle")
    assert pair_index({"color": "teal"}) is None and pair_index({"shape": "circle"}) is None
    labels = easy_vqa.image_labels("train")
    known = sum(pair_index(label) is not None for label in labels.values())
    assert 0.85 * len(labels) < known < len(labels)  # about 10% of images lack the shape or the colour


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_idefics3(tmp_path_factory.mktemp("tiny"))


def test_chat_layout_puts_the_image_first_and_ends_with_the_answer(tiny):
    layout = ChatLayout(tiny.processor)
    tokenizer = tiny.processor.tokenizer
    ids, answer_start = layout.suffix("what color is the shape?", "teal")
    assert tokenizer.decode(ids[answer_start:]) == "teal<|im_end|>"
    image = tokenizer.convert_tokens_to_ids("<image>")
    assert ids[layout.image_offset : layout.image_offset + layout.image_seq_len] == [image] * layout.image_seq_len
    prompt, prompt_length = layout.suffix("what color is the shape?")
    assert prompt == ids[:answer_start] and prompt_length == answer_start
    text = tokenizer.decode(layout.prefix_ids + ids)
    assert text.endswith("what color is the shape?<|im_end|>\n<|im_start|>assistant\nteal<|im_end|>")


def test_prompt_steps_lower_the_loss_and_touch_only_the_prompts(tiny, tmp_path):
    trainer = Trainer(TINY_SETTINGS, tmp_path, model=tiny.model, processor=tiny.processor)
    frozen = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}
    every_pair = list(range(len(PAIRS)))
    prompts = trainer.prompts(every_pair).detach().clone()
    batch = trainer.prompt_questions[:8]
    losses = [trainer.prompt_step(batch)["loss"] for _ in range(6)]
    assert all(after < before for before, after in zip(losses, losses[1:])), losses
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, frozen[name]), name
    touched = {PAIRS.index((labels["color"], labels["shape"])) for labels in (trainer.labels[q.image_id] for q in batch)}
    own_changed = {row for row in every_pair if trainer.prompts.own[row].abs().sum() > 0}
    assert own_changed == touched
    assert not torch.equal(trainer.prompts(every_pair), prompts)


def test_vision_steps_regress_the_prompts_and_touch_only_the_vision_tower_and_connector(tiny, tmp_path):
    trainer = Trainer(TINY_SETTINGS, tmp_path, model=tiny.model, processor=tiny.processor)
    trainer.start_stage("vision")
    frozen = _frozen_state(trainer.model)
    vision_before = {k: v.clone() for k, v in trainer.vision_weights().items()}
    prompts = {name: tensor.clone() for name, tensor in trainer.prompts.state_dict().items()}
    losses = [trainer.vision_step()["loss"] for _ in range(4)]
    trainer.step = 0  # the same batch again: its regression loss has fallen
    assert trainer.vision_step()["loss"] < losses[0]
    assert all(torch.equal(tensor, prompts[name]) for name, tensor in trainer.prompts.state_dict().items())
    for name, tensor in _frozen_state(trainer.model).items():
        assert torch.equal(tensor, frozen[name]), name
    changed = [name for name, tensor in trainer.vision_weights().items() if not torch.equal(tensor, vision_before[name])]
    assert any(name.startswith("connector.") for name in changed)
    assert any(name.startswith("vision_model.encoder.") for name in changed)


def test_training_checkpoints_and_resumes(tiny, tmp_path):
    work_dir = tmp_path / "work"
    trainer = Trainer(TINY_SETTINGS, work_dir, model=tiny.model, processor=tiny.processor)
    final = trainer.run()
    assert set(final) >= {"val_all", "val_yes/no_balanced", "val_prompt_all", "shape_head", "color_head"}
    log = [json.loads(line) for line in (work_dir / "train.log").read_text().splitlines()]
    assert [(r["stage"], r.get("step")) for r in log] == [
        ("prompts", 1), ("prompts", 2), ("vision", 1), ("vision", 2), ("done", None)
    ]
    resumed = Trainer(TINY_SETTINGS, work_dir, model=tiny.model, processor=tiny.processor)
    assert (resumed.stage, resumed.step) == ("vision", TINY_SETTINGS.vision_steps)
    every_pair = list(range(len(PAIRS)))
    assert torch.equal(resumed.prompts(every_pair), trainer.prompts(every_pair))
    for name, tensor in resumed.vision_weights().items():
        assert torch.equal(tensor, trainer.vision_weights()[name]), name
    with pytest.raises(RuntimeError, match="other settings"):
        Trainer(dataclasses.replace(TINY_SETTINGS, seed=1), work_dir, model=tiny.model, processor=tiny.processor)


@pytest.mark.slow
def test_a_few_prompt_steps_through_the_real_language_model_lower_the_answer_loss(default_model_dir, tmp_path):
    """The real language model, frozen, from the word-embedding prompts that training starts from."""
    from qig_plugin.models import load_model, load_processor

    trainer = Trainer(
        TrainSettings(), tmp_path, model=load_model(default_model_dir), processor=load_processor(default_model_dir)
    )
    batch = trainer.prompt_questions[:8]
    losses = [trainer.prompt_step(batch)["loss"] for _ in range(5)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_command_line_rejects_unknown_settings(capsys):
    with pytest.raises(SystemExit):
        main(["--no-such-setting", "1"])
    assert "unrecognized arguments" in capsys.readouterr().err
