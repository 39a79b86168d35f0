"""``qig explain`` and the QIG token weights of one sample, on a tiny Idefics3 (2 layers, 4 image tokens)."""

import pytest
import torch
from PIL import Image

from qig_plugin.attribution import block as attribution_block
from qig_plugin.cli import main
from qig_plugin.data import CalibrationRecord, load_photo
from qig_plugin.explain import explain_sample
from qig_plugin.models import load_processor
from qig_plugin.modifiers import QIGGPTQModifier
from qig_plugin.recipes import shipped_recipes
from qig_plugin.validation import load_recipe_modifiers
from tests.tiny_models import IDEFICS3_IGNORE, TINY_IDEFICS3_IMAGE_SEQ_LEN
from tests.tiny_vlm_folder import build_tiny_vlm_folder

W4_GROUP_64 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
ANSWER = "A black and white space helmet."


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory):
    return build_tiny_vlm_folder(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "astronaut.png"
    load_photo("astronaut").save(path)
    return path


@pytest.fixture(scope="module")
def tiny_vlm(tiny_vlm_dir, photo_path):
    """The tiny VLM in float32, its processor, and one image/prompt/answer sample."""
    from transformers import Idefics3ForConditionalGeneration

    model = Idefics3ForConditionalGeneration.from_pretrained(tiny_vlm_dir, dtype=torch.float32)
    record = CalibrationRecord(Image.open(photo_path).convert("RGB"), "What is she holding?", ANSWER)
    return model.eval(), load_processor(tiny_vlm_dir), record


def test_weights_per_layer_and_group_have_mean_one_and_roles_split_the_tokens(tiny_vlm):
    model, processor, record = tiny_vlm
    recipe = [QIGGPTQModifier(qig_steps=2, ignore=IDEFICS3_IGNORE,
                              config_groups={"group_0": {"targets": ["Linear"], "weights": W4_GROUP_64}})]
    explanation = explain_sample(model, processor, record, recipe)

    assert sorted(explanation.weights) == [(0, "attention"), (0, "mlp"), (1, "attention"), (1, "mlp")]
    seq = len(explanation.tokens)
    for weights in explanation.weights.values():
        assert weights.shape == (seq,) and torch.isfinite(weights).all()
        assert weights.mean().item() == pytest.approx(1.0, rel=1e-5)
        assert weights.std() > 0  # QIG weights differ between tokens
    assert len(explanation.image_positions) == TINY_IDEFICS3_IMAGE_SEQ_LEN
    assert explanation.image.shape == (32, 32, 3)
    answer_text = "".join(t for t, role in zip(explanation.tokens, explanation.roles) if role == "answer")
    assert answer_text.startswith(ANSWER)  # then the template's end of turn
    assert sum(explanation.mass_by_role(1, "mlp").values()) == pytest.approx(1.0)


def test_explain_writes_the_png(tiny_vlm_dir, photo_path, tmp_path, capsys):
    output = tmp_path / "weights.png"
    argv = ["explain", str(tiny_vlm_dir), "--image", str(photo_path), "--prompt", "What is she holding?",
            "--answer", ANSWER, "--scheme", "W8A8", "--output", str(output)]
    assert main(argv) == 0
    with Image.open(output) as picture:
        assert picture.format == "PNG" and picture.width > 800
    assert "layer   1 mlp" in capsys.readouterr().out
    assert main(argv) == 2  # the PNG exists now: refused without --overwrite
    assert list(tmp_path.iterdir()) == [output]


def test_nan_in_the_attribution_exits_2_and_writes_no_png(tiny_vlm_dir, photo_path, tmp_path, capsys):
    from transformers import Idefics3ForConditionalGeneration

    poisoned_dir = tmp_path / "poisoned"
    model = Idefics3ForConditionalGeneration.from_pretrained(tiny_vlm_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.text_model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    model.save_pretrained(poisoned_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja"):
        if (tiny_vlm_dir / name).is_file():
            (poisoned_dir / name).write_bytes((tiny_vlm_dir / name).read_bytes())
    output = tmp_path / "weights.png"
    assert main(["explain", str(poisoned_dir), "--image", str(photo_path), "--prompt", "Hi",
                 "--output", str(output)]) == 2
    assert "NaN or Inf" in capsys.readouterr().err
    assert not output.exists()


def test_explain_takes_the_calibration_groups_settings_and_targets_of_every_shipped_recipe(tiny_vlm, monkeypatch):
    """Each recipe's attribution: its groups' blocks, its qig_* settings, Q(W) only on its targeted linears."""
    model, processor, record = tiny_vlm
    calls = []
    real = attribution_block.attribute_block

    def record_call(block, args, kwargs, weight_args, settings, **options):
        calls.append((block, set(weight_args), settings, options["input_linears"]))
        return real(block, args, kwargs, weight_args, settings, **options)

    monkeypatch.setattr("qig_plugin.explain.attribute_block", record_call)
    layer = model.model.text_model.layers[1]
    for recipe in shipped_recipes():
        modifiers = load_recipe_modifiers(recipe)
        calls.clear()
        explanation = explain_sample(model, processor, record, modifiers)
        assert sorted(explanation.weights) == [(0, "attention"), (0, "mlp"), (1, "attention"), (1, "mlp")], recipe
        assert all(torch.isfinite(w).all() for w in explanation.weights.values())
        qig = [m for m in modifiers if type(m).__name__.startswith("QIG")]
        expected_steps = qig[0].qig_steps if qig else 6
        assert {settings.qig_steps for _, _, settings, _ in calls} == {expected_steps}, recipe
        attention = next(c for c in calls if c[0] is layer.self_attn)
        projections = layer.self_attn
        assert attention[3] == [projections.q_proj, projections.k_proj, projections.v_proj]
        # Q(W) on the recipe's targeted linears of the block only: q/k/v and o_proj, never a vision linear
        assert attention[1] == {projections.q_proj, projections.k_proj, projections.v_proj, projections.o_proj}


@pytest.mark.parametrize("recipe", ["qig_awq_w4a16", "qig_sq_gptq_w8a8", "sq_gptq_w8a8"])
def test_explain_runs_with_recipes_whose_first_modifier_does_not_quantize(tiny_vlm_dir, photo_path, tmp_path, recipe):
    output = tmp_path / "weights.png"
    recipe_path = next(path for path in shipped_recipes() if path.stem == recipe)
    assert main(["explain", str(tiny_vlm_dir), "--image", str(photo_path), "--prompt", "Hi", "--recipe",
                 str(recipe_path), "--output", str(output)]) == 0
    assert output.is_file()
