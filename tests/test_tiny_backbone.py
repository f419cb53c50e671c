from pathlib import Path

import pytest
import torch

from data.build import batches
from data.collator import VQACollator
from data.synthetic_vqa import SyntheticVQADataset
from data.synthetic_vqa import ROW_NAMES, make_sample, patch_labels
from models.backbones import load_backbone
from trainers.inference.evaluation import evaluate_accuracy, generate_baseline_answers
from scripts.pretrain_tiny_backbone import (background_visibility, hide_background, lr_at, main as build_tiny,
                                    patch_word_targets)

SHIPPED = Path(__file__).resolve().parents[1] / "backbones" / "tiny-llava"


def test_builder_saves_a_backbone_that_round_trips_offline(tmp_path):
    report = build_tiny(["--out", str(tmp_path / "a"), "--steps", "3", "--batch-size", "4", "--eval-size", "10",
                         "--probe-every", "3", "--text-layers", "2"])
    assert set(report["accuracy"]) >= {"overall", "color_at", "count"}
    assert (tmp_path / "a" / "README.md").read_text().count("|") > 10  # the card's accuracy table

    first = load_backbone(str(tmp_path / "a"))
    first.model.save_pretrained(tmp_path / "b")
    first.processor.save_pretrained(tmp_path / "b")
    second = load_backbone(str(tmp_path / "b"))

    data = SyntheticVQADataset(2, "eval", seed=0)
    batch_a = VQACollator(first.processor)([data[0], data[1]])
    batch_b = VQACollator(second.processor)([data[0], data[1]])
    assert torch.equal(batch_a["input_ids"], batch_b["input_ids"])
    assert torch.equal(batch_a["pixel_values"], batch_b["pixel_values"])
    with torch.no_grad():
        assert torch.equal(first(batch_a["input_ids"], batch_a["pixel_values"], batch_a["attention_mask"]),
                           second(batch_b["input_ids"], batch_b["pixel_values"], batch_b["attention_mask"]))


def test_learning_rate_schedule():
    assert lr_at(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert lr_at(10, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, warmup=10) == pytest.approx(0.05)


def test_shipped_backbone_answers_held_out_questions():
    backbone = load_backbone(str(SHIPPED))
    assert backbone.num_vision_tokens == 144 and backbone.num_layers == 8
    data = SyntheticVQADataset(100, "eval", seed=0)
    accuracy = evaluate_accuracy(lambda b: generate_baseline_answers(backbone, b, max_new_tokens=3),
                                 batches(data, VQACollator(backbone.processor, with_answers=False), 50),
                                 show_progress=False)
    assert accuracy["overall"] >= 0.6, accuracy  # the majority answer scores 0.10


def test_background_curriculum_hides_only_background_image_tokens():
    assert [background_visibility(s, 100, 0.25, 0.6) for s in (0, 25, 60, 99)] == [0.0, 0.0, 1.0, 1.0]
    assert background_visibility(40, 100, 0.25, 0.6) == pytest.approx(15 / 35)
    image = torch.tensor([[False, True, True, True, False]])
    colors = torch.tensor([[0, 3, 0]])  # patch order: background, object, background
    mask = torch.ones(1, 5, dtype=torch.long)
    hidden = hide_background(mask, image, colors, 0.0, torch.Generator().manual_seed(0))
    assert hidden.tolist() == [[1, 0, 1, 0, 1]]
    assert hide_background(mask, image, colors, 1.0, torch.Generator()) is mask


def test_alignment_targets_name_colour_shape_and_row(processor):
    sample = make_sample(0, "eval", 3)
    colors, shapes = (torch.from_numpy(a)[None] for a in patch_labels(sample.objects))
    targets = patch_word_targets(colors, shapes, processor.tokenizer, position_words=True)
    tok = processor.tokenizer
    for obj in sample.objects:
        k = obj.patch[0] * 12 + obj.patch[1]
        words = [tok.convert_ids_to_tokens(int(t[0, k])) for t in targets]
        assert words == [obj.color, obj.shape, ROW_NAMES[obj.region[0]]]
    assert all((t[colors == 0] == -100).all() for t in targets)


def test_dataloader_workers_do_not_change_the_result(tmp_path):
    args = ["--steps", "2", "--batch-size", "4", "--eval-size", "4", "--probe-every", "2", "--text-layers", "2",
            "--curriculum-start", "0.0", "--curriculum-end", "1.0"]  # the curriculum draws random masks each step
    build_tiny(["--out", str(tmp_path / "w0"), *args])
    build_tiny(["--out", str(tmp_path / "w2"), "--workers", "2", *args])
    a = load_backbone(str(tmp_path / "w0")).model.state_dict()
    b = load_backbone(str(tmp_path / "w2")).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
