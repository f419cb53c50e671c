"""CDPruner reading a CLIP text tower (models/clip_relevance.py): the paper's sign, the instruction's text, the
cosines against CLIPModel's own, its FLOPs against torch's counter, and the fallback when a backbone has none."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer, CLIPModel

from data.collator import VQACollator
from data.synthetic_vqa import SyntheticVQADataset
from models.backbones import load_backbone
from models.baselines import build_baseline
from models.baselines.cdpruner import CDPruner
from models.clip_relevance import PAPER_SIGN, ClipTextRelevance, clip_folder_of, load_clip_relevance
from scripts.pretrain_tiny_backbone import main as build_tiny


class FixedScore(nn.Module):
    """A text tower whose relevance score for each token is given."""

    def __init__(self, score: torch.Tensor):
        super().__init__()
        self.score = score

    def forward(self, features, question_ids, question_mask):
        return self.score


def test_cdpruner_with_a_text_tower_keeps_the_most_relevant_of_orthogonal_tokens():
    """Orthogonal tokens (every set is as diverse as any other), so the DPP keeps the two of highest relevance."""
    n, keep = 6, 2
    features = torch.eye(n)[None]  # (1, 6, 6), projected by the identity
    score = torch.tensor([[0.3, -0.2, 0.9, -0.5, 0.1, 0.4]])
    pruner = CDPruner(keep, lambda x: x, n, n, text_relevance=FixedScore(score))
    assert pruner.reads_question_ids
    out = pruner(features, question=torch.zeros(1, 3, n), question_mask=torch.ones(1, 3, dtype=torch.bool),
                 question_ids=torch.zeros(1, 3, dtype=torch.long))
    assert sorted(out.positions[0].tolist()) == [2, 5]
    with pytest.raises(ValueError, match="question_ids"):
        pruner(features, question=torch.zeros(1, 3, n), question_mask=torch.ones(1, 3, dtype=torch.bool))


@pytest.mark.parametrize("sign", [None, 1, -1])
def test_the_towers_sign_orients_the_cosine_and_the_paper_sign_is_the_default(clip_backbone, sign):
    """A CLIP whose config records no patch_text_sign gets the reference code's -1 (relevance = -cosine)."""
    backbone, folder = clip_backbone
    clip = CLIPModel.from_pretrained(folder / "clip", local_files_only=True)
    if sign is None:
        clip.config.__dict__.pop("patch_text_sign", None)
    else:
        clip.config.patch_text_sign = sign
    relevance = ClipTextRelevance(clip, AutoTokenizer.from_pretrained(folder / "clip", local_files_only=True),
                                  backbone.processor.tokenizer)
    assert relevance.sign == (PAPER_SIGN if sign is None else sign) and PAPER_SIGN == -1
    ids = backbone.processor.tokenizer("is there a red circle ?", add_special_tokens=False, return_tensors="pt")
    features = torch.randn(1, backbone.num_vision_tokens, backbone.vision_hidden_size)
    with torch.no_grad():
        text = clip.get_text_features(**relevance.clip_tokenizer(["is there a red circle ?"], return_tensors="pt"))
        patches = clip.visual_projection(clip.vision_model.post_layernorm(features))
        score = relevance(features, ids["input_ids"], torch.ones_like(ids["input_ids"], dtype=torch.bool))
    cosine = F.cosine_similarity(patches, text.pooler_output[:, None, :], dim=-1)
    torch.testing.assert_close(score, relevance.sign * cosine, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def clip_backbone(tmp_path_factory):
    """A tiny backbone built with a (two-step) CLIP stage, so that it ships clip/."""
    out = tmp_path_factory.mktemp("clip_backbone") / "tiny"
    build_tiny(["--out", str(out), "--clip-steps", "2", "--clip-batch-size", "8", "--clip-warmup", "1", "--steps", "1",
                "--batch-size", "4", "--eval-size", "4", "--text-layers", "2", "--check-size", "10",
                "--freeze-vision"])
    return load_backbone(str(out)), out


def test_cdpruner_reads_the_clip_beside_the_backbone_and_matches_clipmodel(clip_backbone):
    """On a backbone with clip/, CDPruner embeds each prompt's question (its words, no template) with that CLIP, and
    the cosines are CLIPModel's own: get_text_features of the question against the image head on LLaVA's features."""
    backbone, folder = clip_backbone
    model = build_baseline("cdpruner", backbone, 36, [])
    relevance = model.merger.text_relevance
    assert relevance is not None and clip_folder_of(folder) == folder / "clip"
    data = SyntheticVQADataset(3, "eval", seed=5)
    samples = [data[i] for i in range(3)]
    batch = VQACollator(backbone.processor, with_answers=False)(samples)
    seen = {}
    relevance.register_forward_hook(lambda module, args, out: seen.update(args=args, out=out))
    with torch.no_grad():
        model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], mode="hard")
    features, question_ids, question_mask = seen["args"]
    assert relevance.texts(question_ids, question_mask) == [s.question.strip() for s in samples]

    clip = CLIPModel.from_pretrained(folder / "clip", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder / "clip", local_files_only=True)
    with torch.no_grad():
        text = clip.get_text_features(**tokenizer([s.question for s in samples], padding=True,
                                                  return_tensors="pt")).pooler_output
        patches = clip.visual_projection(clip.vision_model.post_layernorm(backbone.image_features(
            batch["pixel_values"]).features))
    expected = relevance.sign * (F.normalize(patches, dim=-1) @ F.normalize(text, dim=-1)[:, :, None])[:, :, 0]
    torch.testing.assert_close(seen["out"], expected, rtol=1e-4, atol=1e-5)


def test_clip_relevance_flops_match_the_flop_counter(clip_backbone):
    """Eager attention: torch's counter does not see the CPU's fused attention kernel."""
    backbone, folder = clip_backbone
    clip = CLIPModel.from_pretrained(folder / "clip", local_files_only=True, attn_implementation="eager")
    relevance = ClipTextRelevance(clip, AutoTokenizer.from_pretrained(folder / "clip", local_files_only=True),
                                  backbone.processor.tokenizer)
    question = "what color is the circle in the top row ?"
    ids = backbone.processor.tokenizer(question, add_special_tokens=False, return_tensors="pt")["input_ids"]
    features = torch.randn(1, backbone.num_vision_tokens, backbone.vision_hidden_size)
    n_clip = len(relevance.clip_tokenizer(question)["input_ids"])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        relevance(features, ids, torch.ones_like(ids, dtype=torch.bool))
    assert counter.get_total_flops() // 2 == relevance.flops(backbone.num_vision_tokens, n_clip)


def test_a_backbone_without_a_clip_keeps_the_word_embedding_relevance(tiny_folder):
    backbone = load_backbone(str(tiny_folder))
    assert clip_folder_of(backbone.model.name_or_path) is None
    assert build_baseline("cdpruner", backbone, 36, []).merger.text_relevance is None


def test_a_clip_of_another_tower_is_refused_by_name(clip_backbone, tmp_path):
    backbone, folder = clip_backbone
    with pytest.raises(ValueError, match="not the CLIP of this backbone's tower"):
        load_clip_relevance(folder / "clip", backbone.processor.tokenizer, backbone.vision_hidden_size + 1)
    with pytest.raises(FileNotFoundError, match="CLIPModel"):
        load_clip_relevance(tmp_path, backbone.processor.tokenizer, backbone.vision_hidden_size)
    assert isinstance(CLIPModel.from_pretrained(folder / "clip", local_files_only=True), CLIPModel)
