"""Save a trained pruned model, load it from a script, check shapes before weights, answer questions."""

import json

import pytest
import torch

from data.synthetic_vqa import SyntheticVQADataset
from tests.helpers import llava_like
from trainers.inference.pruned_model import CONFIG_FILE, PrunedModelError, load_pruned


def test_training_writes_loadable_folders_and_the_round_trip_is_exact(finished_tiny_run, tmp_path):
    for saved in ("pruned_best", "pruned_final"):
        assert (finished_tiny_run / saved / CONFIG_FILE).is_file()
    data = SyntheticVQADataset(4, "eval", seed=5)
    images, questions = [s.image for s in data], [s.question for s in data]
    from_run = load_pruned(finished_tiny_run)  # a run folder: its pruned_best/
    first = from_run.answer(images, questions, max_new_tokens=3)
    again = load_pruned(from_run.save_pretrained(tmp_path / "shared"))
    assert again.answer(images, questions, max_new_tokens=3) == first
    for a, b in zip(from_run.model.pruners.parameters(), again.model.pruners.parameters()):
        assert torch.equal(a, b)
    step = load_pruned(finished_tiny_run / "checkpoints" / "training_state_step_4.pt")  # a step
    assert step.model.stage_budgets == from_run.model.stage_budgets
    inputs = from_run.processor(images=images, text=from_run.prompts(questions), padding=True, return_tensors="pt")
    answers, prefill = from_run.generate(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], 3)
    assert answers == first and prefill.vision_tokens_per_layer[-1] == from_run.model.stage_budgets[-1]


def test_a_backbone_of_other_shapes_is_refused_before_its_weights_load(finished_tiny_run, tmp_path, monkeypatch):
    model, processor = llava_like(96, 8, text_layers=6, seed=4)  # 6 decoder layers instead of 4
    other = tmp_path / "other"
    model.save_pretrained(other)
    processor.save_pretrained(other)
    from models.llava_backbone import LlavaBackbone

    monkeypatch.setattr(LlavaBackbone, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("weights loaded")))
    with pytest.raises(PrunedModelError, match=r"other shapes than .*other: num_layers 4 \(saved\) vs 6"):
        load_pruned(finished_tiny_run / "pruned_final", backbone=str(other))


def test_nothing_to_load_is_named(tmp_path):
    with pytest.raises(PrunedModelError, match="does not exist"):
        load_pruned(tmp_path / "absent")
    with pytest.raises(PrunedModelError, match="holds no saved pruned model"):
        load_pruned(tmp_path)
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / CONFIG_FILE).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(PrunedModelError, match="format version 99"):
        load_pruned(saved)


def test_predict_prints_the_answer_and_draws_the_kept_patches(finished_tiny_run, tmp_path, capsys):
    from scripts import predict

    image = tmp_path / "image.png"
    SyntheticVQADataset(1, "eval", seed=5)[0].image.save(image)
    out = tmp_path / "kept.png"
    assert predict.main(["--model", str(finished_tiny_run), "--image", str(image), "--question", "what color ?",
                         "--out", str(out), "--max-new-tokens", "2"]) == 0
    printed = capsys.readouterr().out
    model = load_pruned(finished_tiny_run).model
    counts = " → ".join(str(c) for c in [144, model.merged_tokens, *model.stage_budgets])
    assert "answer: " in printed and f"vision tokens: {counts} (merger" in printed and "saved" in printed
    assert out.read_bytes()[:4] == b"\x89PNG"
    # a folder gets kept_tokens.png in it, a name without a suffix .png, and the line printed names that file
    assert predict.picture_path(tmp_path) == tmp_path / "kept_tokens.png"
    assert predict.picture_path(tmp_path / "new" / "kept") == tmp_path / "new" / "kept.png"
    assert predict.main(["--model", str(tmp_path / "absent"), "--image", str(image), "--question", "q"]) == 2
