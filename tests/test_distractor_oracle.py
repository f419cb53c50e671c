"""scripts/distractor_oracle.py: the distractors leave, nothing else does, and the table comes out."""

import pytest
import torch

from data.collator import VQACollator
from data.synthetic_vqa import SyntheticVQADataset, patch_index, question_objects
from models.llava_backbone import LlavaBackbone
from models.pruned_llava import PrunedLlava
from scripts import distractor_oracle
from tests.helpers import SHIPPED_BACKBONE, llava_like
from trainers.inference.pruned_model import load_pruned


def test_distractor_mask_marks_exactly_the_objects_the_question_is_not_about(shipped_backbone):
    data = SyntheticVQADataset(20, "eval", seed=3)
    samples = [data[i] for i in range(20)]
    mask = distractor_oracle.distractor_mask(samples, shipped_backbone)
    for b, sample in enumerate(samples):
        expected = {patch_index(o) for o in sample.objects if o not in question_objects(sample)}
        assert set(torch.nonzero(mask[b]).flatten().tolist()) == expected
    assert mask.any()


def test_the_asked_objects_map_onto_the_backbones_patch_grid_as_the_distractors_do(shipped_backbone):
    data = SyntheticVQADataset(20, "eval", seed=3)
    samples = [data[i] for i in range(20)]
    asked = distractor_oracle.asked_mask(samples, shipped_backbone)
    for b, sample in enumerate(samples):
        assert set(torch.nonzero(asked[b]).flatten().tolist()) == {patch_index(o) for o in question_objects(sample)}
    # on a grid twice as fine (24 x 24 tokens) each object covers its 2 x 2 block, there as in distractor_mask
    finer = LlavaBackbone(*llava_like(96, 4, text_layers=1))
    fine, coarse = distractor_oracle.asked_mask(samples, finer), asked.view(-1, 12, 12)
    assert torch.equal(fine.view(-1, 24, 24), coarse.repeat_interleave(2, 1).repeat_interleave(2, 2))
    assert not (fine & distractor_oracle.distractor_mask(samples, finer)).any()


def test_removed_before_the_language_model_are_the_distractors_only(shipped_backbone):
    data = SyntheticVQADataset(6, "eval", seed=3)
    samples = [data[i] for i in range(6)]
    batch = VQACollator(shipped_backbone.processor, with_answers=False)(samples)
    selector = distractor_oracle.WithoutDistractors(1)
    selector.drop = distractor_oracle.distractor_mask(samples, shipped_backbone)
    with torch.no_grad():
        out = PrunedLlava(shipped_backbone, merger=selector)(batch["input_ids"], batch["pixel_values"],
                                                             batch["attention_mask"], mode="hard")
    first = (batch["input_ids"] == shipped_backbone.image_token_id).long().argmax(dim=1)
    for b in range(6):
        kept = out.kept_positions[0][b]
        kept = set((kept[kept >= 0] - first[b]).tolist())
        assert kept == set(range(144)) - set(torch.nonzero(selector.drop[b]).flatten().tolist())


def test_the_table_has_every_setup_and_bad_layers_are_refused(capsys):
    distractor_oracle.main(["--backbone", SHIPPED_BACKBONE, "--seed", "3", "--size", "10", "--batch-size", "5",
                            "--layers", "2"])
    out = capsys.readouterr().out
    rows = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["| setup", "| unpruned", "| distractors removed before the LLM",
                    "| distractors removed from layer 2 on"]
    with pytest.raises(SystemExit):
        distractor_oracle.main(["--backbone", SHIPPED_BACKBONE, "--size", "2", "--layers", "0"])


def test_trained_models_get_a_row_and_a_table_of_what_they_hold(tiny_folder, finished_tiny_run, capsys):
    saved = finished_tiny_run / "pruned_final"
    distractor_oracle.main(["--backbone", str(tiny_folder), "--seed", "3", "--size", "6", "--batch-size", "3",
                            "--layers", "--model", str(saved)])
    out = capsys.readouterr().out
    assert f"| {saved} | " in out
    table = out.split(f"{saved}: asked objects / distractors still held")[1]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    model = load_pruned(saved, backbone=str(tiny_folder)).model
    assert [r[0] for r in rows] == ["| the merger", *(f"| pruning before layer {layer}" for layer in sorted(model.stage_of_layer))]
    assert [float(r[3].rstrip(" |")) for r in rows] == [model.merged_tokens, *model.stage_budgets]
    held = [[float(r[1].rstrip("%")), float(r[2].rstrip("%"))] for r in rows]
    assert all(0 <= v <= 100 for row in held for v in row)
    assert all(later[0] <= earlier[0] and later[1] <= earlier[1] for earlier, later in zip(held, held[1:]))  # only drops


def test_a_model_that_cannot_load_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        distractor_oracle.main(["--backbone", SHIPPED_BACKBONE, "--size", "2", "--model", str(tmp_path / "nowhere")])
    assert f"--model {tmp_path / 'nowhere'}" in capsys.readouterr().err
