"""easy-VQA: splits, labels read off the questions, answer scoring."""

import pytest

from qig_plugin.data import easy_vqa


def test_splits_have_the_documented_sizes_and_validation_is_carved_from_train_by_image():
    assert len(easy_vqa.image_paths("train")) == 4000 and len(easy_vqa.image_paths("test")) == 1000
    assert len(easy_vqa.questions("train")) == 38575 and len(easy_vqa.questions("test")) == 9673
    held = easy_vqa.validation_image_ids()
    assert len(held) == easy_vqa.VALIDATION_IMAGES and held <= set(easy_vqa.image_paths("train"))
    training, validation = easy_vqa.training_questions(), easy_vqa.validation_questions()
    assert len(training) + len(validation) == 38575
    assert not {q.image_id for q in training} & {q.image_id for q in validation}
    assert {q.answer for q in easy_vqa.questions("test")} == set(easy_vqa.ANSWERS)
    assert easy_vqa.questions("test")[0].image().size == (64, 64)


def test_labels_agree_with_every_question():
    labels = easy_vqa.image_labels("train")
    assert sum("shape" in label for label in labels.values()) > 3800
    assert sum("color" in label for label in labels.values()) > 3700
    for q in easy_vqa.questions("train")[:5000]:
        label = labels[q.image_id]
        if q.type == "shape" and "shape" in label:
            assert label["shape"] == q.answer, q
        if q.type == "color" and "color" in label and q.question.startswith("what color"):
            assert label["color"] == q.answer, q


def test_sample_is_seeded_and_drawn_without_replacement():
    first = easy_vqa.sample_questions("test", 100, seed=3)
    assert first == easy_vqa.sample_questions("test", 100, seed=3)
    assert len(set(first)) == 100 and first != easy_vqa.sample_questions("test", 100, seed=4)


@pytest.mark.parametrize(
    ("text", "word"),
    [("yes", "yes"), ("Yes.", "yes"), ("\nrectangle", "rectangle"), ("Circle, red", "circle"), ("", ""), ("42", "")],
)
def test_first_word(text, word):
    assert easy_vqa.first_word(text) == word


def test_accuracy_by_type():
    questions = [
        easy_vqa.Question("test", 0, "what shape is in the image?", "circle"),
        easy_vqa.Question("test", 0, "what color is the shape?", "red"),
        easy_vqa.Question("test", 0, "is there a red shape?", "yes"),
        easy_vqa.Question("test", 0, "is there a circle?", "yes"),
    ]
    accuracy = easy_vqa.accuracy_by_type(questions, ["Circle.", "blue", "yes", "no"])
    assert accuracy == {"all": 0.5, "shape": 1.0, "color": 0.0, "yes/no": 0.5}
    with pytest.raises(ValueError, match="4 questions but 1 answers"):
        easy_vqa.accuracy_by_type(questions, ["yes"])
    with pytest.raises(ValueError, match="not an easy-VQA answer"):
        easy_vqa.question_type("maybe")
