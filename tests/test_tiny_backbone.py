import math
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, CLIPModel

from data.build import batches
from data.captions import caption_rng, clip_processor, scene_caption
from data.collator import VQACollator
from data.synthetic_vqa import SyntheticVQADataset
from data.synthetic_vqa import COLORS, ROW_NAMES, SHAPES, SceneObject, make_sample, patch_labels, vocabulary
from models.backbones import load_backbone
from models.tiny_clip import TEXT_SHAPES, build_clip, cls_attention_share, text_patch_ranking
from models.tiny_llava import build_llava
from trainers.inference.evaluation import evaluate_accuracy, generate_baseline_answers
from scripts.pretrain_tiny_backbone import (CaptionedScenes, background_visibility, build, clip_step, hide_background,
                                            lr_at, main as build_tiny, parse_args, patch_word_targets)

SHIPPED = Path(__file__).resolve().parents[1] / "backbones" / "tiny-llava"


def test_builder_saves_a_backbone_that_round_trips_offline(tmp_path):
    report = build_tiny(["--out", str(tmp_path / "a"), "--steps", "3", "--batch-size", "4", "--eval-size", "10",
                         "--probe-every", "3", "--text-layers", "2", "--check-size", "10"])
    assert set(report["accuracy"]) >= {"overall", "color_at", "count"}
    card = (tmp_path / "a" / "README.md").read_text()
    assert card.count("|") > 10  # the card's accuracy table
    assert "No CLIP stage" in card and not (tmp_path / "a" / "clip").exists()  # --clip-steps 0: one stage, as before
    assert set(report["tower_checks"]["after the LLaVA stage"]) == {"scenes", "cls_on_objects", "objects_share"}

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
            "--check-size", "4", "--curriculum-start", "0.0", "--curriculum-end", "1.0"]  # random masks each step
    build_tiny(["--out", str(tmp_path / "w0"), *args])
    build_tiny(["--out", str(tmp_path / "w2"), "--workers", "2", *args])
    a = load_backbone(str(tmp_path / "w0")).model.state_dict()
    b = load_backbone(str(tmp_path / "w2")).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_captions_name_every_object_and_count_in_the_vocabulary(processor):
    sample = make_sample(0, "train", 7)
    caption = scene_caption(sample.objects, caption_rng(0, "train", 7))
    assert caption == scene_caption(sample.objects, caption_rng(0, "train", 7))
    assert set(caption.split()) <= set(vocabulary())
    for obj in sample.objects:
        assert f"a {obj.color} {obj.shape} in the {ROW_NAMES[obj.region[0]]} row" in caption
    for color in {o.color for o in sample.objects}:
        assert f" {color} object" in caption.replace(f"{color} objects", f"{color} object")
    # the longest caption: an object in each of the 9 regions, every colour counted, fits the text tower
    colors = [*COLORS, *list(COLORS)[:3]]
    crowded = tuple(SceneObject(c, SHAPES[i % 4], (i // 3, i % 3), (i // 3 * 4, i % 3 * 4)) for i, c in enumerate(colors))
    ids = clip_processor().tokenizer(scene_caption(crowded, caption_rng(0, "train", 0)))["input_ids"]
    tok = processor.tokenizer
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert len(ids) <= TEXT_SHAPES["tiny"]["max_position_embeddings"]


def test_clip_stage_lowers_the_contrastive_loss_and_trains_the_llava_tower(processor):
    torch.manual_seed(0)
    llava = build_llava(processor.tokenizer, "toy", text_layers=1)
    clip = build_clip(processor.tokenizer, llava.model.vision_tower, "toy")
    tower_before = {k: v.clone() for k, v in llava.model.vision_tower.state_dict().items()}
    batch = CaptionedScenes(clip_processor(), Namespace(clip_steps=1, clip_batch_size=8, seed=0))[0]
    optimizer = torch.optim.AdamW(clip.parameters(), lr=1e-3)
    losses = [clip_step(clip, optimizer, batch, 1e-3) for _ in range(60)]
    # chance is log(8): the towers first agree on one embedding for all, then tell the 8 pairs apart
    assert min(losses[-10:]) < 0.6 * math.log(8) < losses[0], losses
    assert clip.vision_model is llava.model.vision_tower
    assert not torch.equal(tower_before["encoder.layers.0.self_attn.q_proj.weight"],
                           llava.model.vision_tower.encoder.layers[0].self_attn.q_proj.weight)


def test_cls_attention_share_is_one_on_objects_and_the_area_when_spread():
    objects = torch.zeros(2, 144, dtype=torch.bool)
    objects[:, [5, 40, 99]] = True
    concentrated = torch.zeros(2, 144)
    concentrated[:, [5, 40]] = torch.tensor([0.3, 0.1])  # the rest goes to the CLS token itself
    assert cls_attention_share(concentrated, objects).tolist() == pytest.approx([1.0, 1.0])
    spread = torch.full((2, 144), 1 / 145)
    assert cls_attention_share(spread, objects).tolist() == pytest.approx([3 / 144] * 2)
    random = torch.distributions.Dirichlet(torch.ones(145)).sample((4000,))[:, 1:]  # (4000, 144), CLS left out
    assert cls_attention_share(random, objects[:1].expand(4000, -1)).mean().item() == pytest.approx(3 / 144, rel=0.05)
    with pytest.raises(ValueError, match="differ"):
        cls_attention_share(spread, objects[:, :100])


def test_text_patch_ranking_counts_the_pairs_a_named_patch_wins():
    patches = torch.eye(4)[None].repeat(2, 1, 1)  # (2, 4, 4): patch i points along axis i
    text = torch.tensor([[0.1, 0.0, 1.0, 0.0], [1.0, 0.5, 0.0, 0.2]])
    named = torch.tensor([[False, False, True, False], [False, True, False, False]])
    every = torch.ones(2, 4, dtype=torch.bool)
    # row 1: patch 2 beats the 3 others; row 2: patch 1 beats patches 2 and 3, loses to patch 0
    assert text_patch_ranking(text, patches, named, every).tolist() == pytest.approx([1.0, 2 / 3])
    first_only = torch.tensor([[True, False, False, False]] * 2)
    assert text_patch_ranking(text, patches, named, first_only).tolist() == pytest.approx([1.0, 0.0])
    assert text_patch_ranking(torch.zeros(2, 4), patches, named, every).tolist() == [0.5, 0.5]  # ties count half
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        text_patch_ranking(text, patches, torch.tensor([[True, False, False, False], [True] * 4]), every)


def test_builder_with_a_clip_stage_ships_the_text_tower_and_the_checks(tmp_path):
    common = ["--batch-size", "4", "--eval-size", "4", "--text-layers", "2", "--check-size", "20", "--probe-every", "1"]
    report = build_tiny(["--out", str(tmp_path / "c"), "--clip-steps", "2", "--clip-batch-size", "8",
                         "--clip-warmup", "1", "--steps", "1", "--freeze-vision", *common])
    checks = report["tower_checks"]
    assert list(checks) == ["before this phase", "after the CLIP stage", "after the LLaVA stage"]
    assert checks["after the CLIP stage"]["cls_on_objects"] != checks["before this phase"]["cls_on_objects"]
    assert checks["after the LLaVA stage"] == checks["after the CLIP stage"]  # --freeze-vision: the tower stays CLIP's
    assert {"question_over_patches", "question_over_objects", "image_to_caption"} <= set(checks["after the CLIP stage"])
    assert report["phases"][-1]["clip_steps"] == 2 and report["clip_wall_time_s"] > 0
    card = (tmp_path / "c" / "README.md").read_text()
    assert "| after the CLIP stage |" in card and "its objects over other objects" in card and "CLIP (`clip/`)" in card

    clip = CLIPModel.from_pretrained(tmp_path / "c" / "clip", local_files_only=True)
    tokenizer = AutoProcessor.from_pretrained(tmp_path / "c" / "clip", local_files_only=True).tokenizer
    tower = load_backbone(str(tmp_path / "c")).vision_tower.state_dict()
    assert all(torch.equal(v, tower[k]) for k, v in clip.vision_model.state_dict().items())
    sign = 1 if checks["after the LLaVA stage"]["question_over_patches"] >= 0.5 else -1  # measured, saved, carded
    assert clip.config.patch_text_sign == sign and f"`patch_text_sign: {sign}`" in card
    ids = tokenizer(["is there a red circle ?", "how many ?"], padding=True, return_tensors="pt")
    assert ids["input_ids"][1, 4] == tokenizer.eos_token_id and ids["attention_mask"][1, -1] == 0  # end token, right pad
    assert clip.get_text_features(**ids).pooler_output.shape == (2, clip.config.projection_dim)

    report = build_tiny(["--init-from", str(tmp_path / "c"), "--out", str(tmp_path / "d"), "--steps", "1", *common])
    again = CLIPModel.from_pretrained(tmp_path / "d" / "clip", local_files_only=True)
    assert torch.equal(again.text_projection.weight, clip.text_projection.weight)  # a further phase keeps the text tower
    assert [p["clip_steps"] for p in report["phases"]] == [2, 0]
    with pytest.raises(SystemExit):  # a one-stage build over a folder that holds a CLIP would leave it mismatched
        parse_args(["--out", str(tmp_path / "c")])


def test_fresh_vision_keeps_only_the_language_model_and_needs_one_to_keep(tmp_path):
    """llava-1.5's order: a new tower (the CLIP stage trains it from scratch) and projector, a pretrained LM."""
    build_tiny(["--out", str(tmp_path / "a"), "--steps", "1", "--batch-size", "4", "--eval-size", "4",
                "--text-layers", "2", "--check-size", "4"])
    saved = load_backbone(str(tmp_path / "a")).model.state_dict()
    run = build(parse_args(["--init-from", str(tmp_path / "a"), "--fresh-vision", "--out", str(tmp_path / "b"),
                            "--clip-steps", "1", "--check-size", "4"]))
    fresh = run.model.state_dict()
    same = lambda prefix: [torch.equal(v, saved[k]) for k, v in fresh.items() if k.startswith(prefix)]
    assert all(same("model.language_model.")) and all(same("lm_head."))
    assert not any(same("model.multi_modal_projector.")) and not any(same("model.vision_tower.vision_model.encoder."))
    assert run.clip.vision_model is run.model.model.vision_tower  # the CLIP stage trains the new tower
    with pytest.raises(SystemExit):
        parse_args(["--fresh-vision", "--out", str(tmp_path / "c")])
