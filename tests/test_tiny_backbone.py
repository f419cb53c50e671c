from pathlib import Path

import pytest
import torch

from data.build import batches
from data.collator import VQACollator
from data.synthetic_vqa import SyntheticVQADataset
from models.llava_backbone import LlavaBackbone
from trainers.evaluation import evaluate_accuracy, generate_baseline_answers
from trainers.tiny_backbone import lr_at, main as build_tiny

SHIPPED = Path(__file__).resolve().parents[1] / "backbones" / "tiny-llava"


def test_builder_saves_a_backbone_that_round_trips_offline(tmp_path):
    report = build_tiny(["--out", str(tmp_path / "a"), "--steps", "3", "--batch-size", "4", "--eval-size", "10",
                         "--probe-every", "3", "--text-layers", "2"])
    assert set(report["accuracy"]) >= {"overall", "color_at", "count"}
    assert (tmp_path / "a" / "README.md").read_text().count("|") > 10  # the card's accuracy table

    first = LlavaBackbone.from_pretrained(str(tmp_path / "a"))
    first.model.save_pretrained(tmp_path / "b")
    first.processor.save_pretrained(tmp_path / "b")
    second = LlavaBackbone.from_pretrained(str(tmp_path / "b"))

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
    backbone = LlavaBackbone.from_pretrained(str(SHIPPED))
    assert backbone.num_vision_tokens == 144 and backbone.num_layers == 8
    data = SyntheticVQADataset(100, "eval", seed=0)
    accuracy = evaluate_accuracy(lambda b: generate_baseline_answers(backbone, b, max_new_tokens=3),
                                 batches(data, VQACollator(backbone.processor, with_answers=False), 50),
                                 show_progress=False)
    assert accuracy["overall"] >= 0.85, accuracy
