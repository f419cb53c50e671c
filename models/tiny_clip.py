"""The tiny backbone's CLIP, and two checks that a vision tower behaves like CLIP's where pruning methods read it.

llava-1.5 takes its vision tower from CLIP, trained contrastively against captions, so its CLS token summarises the
image and its text tower embeds an instruction near the patches it speaks of. The tiny backbone is built the same
way: :func:`build_clip` wraps the tiny LLaVA's own vision tower (the same module, not a copy) with a small text tower
over the word-level vocabulary and the two projections, and the contrastive stage trains it before the LLaVA stage.

The checks, measured on patches whose objects are known:
- :func:`cls_attention_share`: the share of the CLS token's attention that falls on the objects' patches. VisionZip
  and VisPruner keep the patches the CLS token attends to most ("dominant" tokens); on a tower where the CLS token
  summarises the image they are the objects.
- :func:`text_patch_ranking`: how often a text's embedding is nearer to a patch it names than to another. CDPruner's
  relevance is the cosine between the instruction's CLIP text embedding and each patch's CLIP image embedding
  (:func:`patch_embeddings`: LLaVA's features through CLIP's post-layernorm and visual projection, as its code does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

# name -> CLIPTextConfig keyword arguments of the text tower (the vision tower is the LLaVA's: models/tiny_llava.SHAPES)
TEXT_SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=128),  # the longest caption (9 objects, 6 colour counts) is 95 tokens
    "toy": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=128),
}
TOWER_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                    "patch_size", "num_channels")


def clip_config(tokenizer, vision_config: CLIPVisionConfig, text_shapes: str = "tiny") -> CLIPConfig:
    """A CLIPConfig of ``vision_config`` (the LLaVA's tower) and a ``TEXT_SHAPES[text_shapes]`` text tower over
    ``tokenizer``'s vocabulary, pooled at its end token; the joint space is the tower's ``projection_dim`` wide."""
    text = CLIPTextConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          projection_dim=vision_config.projection_dim, **TEXT_SHAPES[text_shapes])
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision_config.to_dict(),
                      projection_dim=vision_config.projection_dim)


def share_vision_tower(clip: CLIPModel, vision_tower: torch.nn.Module) -> CLIPModel:
    """``clip`` with ``vision_tower`` (a LLaVA's ``model.model.vision_tower``) as its vision model: training one
    trains the other, and the CLIP saved beside the LLaVA holds the tower the LLaVA runs."""
    ours, theirs = clip.config.vision_config, vision_tower.config
    differ = {k: (getattr(ours, k), getattr(theirs, k)) for k in TOWER_SHAPE_KEYS if getattr(ours, k) != getattr(theirs, k)}
    if differ:
        raise ValueError(f"the CLIP's vision config and the LLaVA's tower disagree (CLIP, LLaVA): {differ}; build the "
                         "CLIP from the LLaVA's vision config (clip_config)")
    clip.vision_model = vision_tower
    return clip


def build_clip(tokenizer, vision_tower: torch.nn.Module, text_shapes: str = "tiny") -> CLIPModel:
    """A random-init text tower and projections around ``vision_tower`` (seed torch first for a fixed one)."""
    return share_vision_tower(CLIPModel(clip_config(tokenizer, vision_tower.config, text_shapes)), vision_tower)


def patch_embeddings(clip: CLIPModel, features: torch.Tensor) -> torch.Tensor:
    """(B, N, Dv) vision features, as LLaVA selects them -> (B, N, P) their CLIP image embeddings (CDPruner's)."""
    return clip.visual_projection(clip.vision_model.post_layernorm(features))


def cls_attention_share(cls_attention: torch.Tensor, on_objects: torch.Tensor) -> torch.Tensor:
    """(B, N) the CLS token's attention to each patch, (B, N) bool the object patches -> (B,) the share of the
    attention to patches that goes to object patches: sum_{i in objects} a_i / sum_i a_i (the CLS token's attention
    to itself is left out). Attention spread evenly gives the objects' share of the patches."""
    if cls_attention.shape != on_objects.shape:
        raise ValueError(f"CLS attention {tuple(cls_attention.shape)} and object mask {tuple(on_objects.shape)} differ")
    return (cls_attention * on_objects).sum(dim=1) / cls_attention.sum(dim=1)


def text_patch_ranking(text: torch.Tensor, patches: torch.Tensor, named: torch.Tensor,
                       others: torch.Tensor) -> torch.Tensor:
    """(B, P) text embeddings, (B, N, P) patch embeddings, (B, N) bool the patches each text names, (B, N) bool the
    patches they are ranked against -> (B,) the share of (named, other) pairs in which the named patch is the nearer
    to the text by cosine (a tie counts half). 0.5 is chance: a text whose embedding says nothing of the patches."""
    pairs = named[:, :, None] & (others & ~named)[:, None, :]  # (B, N, N): i named, j another
    usable = pairs.flatten(1).any(dim=1)
    if not usable.all():
        raise ValueError(f"rows {(~usable).nonzero().flatten().tolist()} have no (named, other) pair: leave them out")
    cosine = (F.normalize(patches, dim=-1) @ F.normalize(text, dim=-1)[:, :, None])[:, :, 0]  # (B, N)
    diff = cosine[:, :, None] - cosine[:, None, :]  # (B, N, N)
    right = ((diff > 0).float() + 0.5 * (diff == 0).float()) * pairs
    return right.sum(dim=(1, 2)) / pairs.sum(dim=(1, 2))
