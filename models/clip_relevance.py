"""An instruction's relevance to each vision token read from a CLIP text tower, as CDPruner's paper reads it.

CDPruner (Zhang et al. 2025) embeds the instruction with the text tower of the CLIP whose vision tower the MLLM uses,
embeds each vision token with that CLIP's image head (the vision tower's post-layernorm and visual projection,
applied to the features LLaVA selects), and takes their cosine. Its reference code then ranks the tokens by the
*negated* cosine: on OpenAI's CLIP, patch-text similarity is known to be higher on background than on the objects a
text names (the "opposite visualisation" of Li et al. 2023, "CLIP Surgery"). Which way round a tower is, is a
measured property of that tower, not of the method: a CLIP's config may carry it as ``patch_text_sign`` (+1: the
patches a text names are the nearer; -1: the farther). scripts/pretrain_tiny_backbone.py measures it on held-out
scenes and saves it with the tiny CLIP; a CLIP without it gets the paper's -1.

Where the CLIP comes from: a backbone folder with a ``clip/`` sub-folder (the tiny backbone ships one,
scripts/pretrain_tiny_backbone.py) or any saved ``CLIPModel`` folder whose vision tower is the backbone's (for
llava-1.5: openai/clip-vit-large-patch14-336, whose tower llava-1.5 keeps frozen). llava-hf checkpoints ship no
text tower; without one CDPruner compares the projected tokens with the instruction's word embeddings instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, CLIPModel

from models.flops import similarity_flops, vision_tower_flops

CLIP_FOLDER = "clip"  # the sub-folder of a backbone folder that holds its CLIP
PAPER_SIGN = -1  # CDPruner's reference code negates the cosine (OpenAI's CLIP: background is nearer to the text)
# The words a prompt ends its instruction with before the answer (llava-1.5's " ASSISTANT:", a chat template's
# "assistant" once its special tokens are skipped; a word-level tokenizer decodes "ASSISTANT :"): not part of what
# the user asked, so not given to the text tower.
ROLE_MARKER = re.compile(r"\s*(ASSISTANT\s*:|assistant)\s*$")


class ClipTextRelevance(nn.Module):
    """Each vision token's relevance to the instruction: the cosine between its CLIP image embedding and the
    instruction's CLIP text embedding, times the tower's ``patch_text_sign`` (higher: more relevant).

    Holds the CLIP's text tower, text projection and image head (not its vision encoder: the backbone runs that);
    ``prompt_tokenizer`` decodes the instruction's ids back to text for ``clip_tokenizer``.
    """

    def __init__(self, clip: CLIPModel, clip_tokenizer, prompt_tokenizer):
        super().__init__()
        self.text_model, self.text_projection = clip.text_model, clip.text_projection
        self.post_layernorm, self.visual_projection = clip.vision_model.post_layernorm, clip.visual_projection
        self.clip_tokenizer, self.prompt_tokenizer = clip_tokenizer, prompt_tokenizer
        text = clip.config.text_config
        self.max_length = text.max_position_embeddings
        self.text_shape = (text.hidden_size, text.intermediate_size, text.num_hidden_layers)
        self.vision_width = clip.config.vision_config.hidden_size
        self.sign = getattr(clip.config, "patch_text_sign", PAPER_SIGN)
        if self.sign not in (1, -1):
            raise ValueError(f"the CLIP's patch_text_sign must be 1 or -1, got {self.sign!r}")

    def texts(self, question_ids: torch.Tensor, question_mask: torch.Tensor) -> list[str]:
        """(B, Tq) the instruction's ids in the prompt's tokenizer, (B, Tq) the real ones -> its B texts, without the
        answer's role marker."""
        return [ROLE_MARKER.sub("", self.prompt_tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)).strip()
                for ids, mask in zip(question_ids, question_mask)]

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """B texts -> (B, P) their CLIP text embeddings (cut to the tower's longest text, as CLIP's tokenizer cuts)."""
        device = self.text_projection.weight.device
        ids = self.clip_tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                  return_tensors="pt").to(device)
        return self.text_projection(self.text_model(**ids).pooler_output)

    def patch_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, Dv) vision features as LLaVA selects them -> (B, N, P) their CLIP image embeddings."""
        return self.visual_projection(self.post_layernorm(features))

    def forward(self, features: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
        """(B, N, Dv) features, (B, Tq) instruction ids and mask -> (B, N) each token's cosine to its instruction,
        times ``sign``."""
        if features.shape[-1] != self.vision_width:
            raise ValueError(f"the CLIP's image head takes {self.vision_width}-wide features, the backbone's are "
                             f"{features.shape[-1]}: use the CLIP whose vision tower the backbone runs")
        text = F.normalize(self.text_embeddings(self.texts(question_ids, question_mask)).float(), dim=-1)  # (B, P)
        patches = F.normalize(self.patch_embeddings(features.to(self.visual_projection.weight.dtype)).float(), dim=-1)
        return self.sign * (patches @ text[:, :, None])[:, :, 0]

    def flops(self, n: int, n_text: int) -> int:
        """Multiply-adds: the text tower on n_text tokens and its projection, the image head on n tokens, and the
        n cosines. (The prompt's instruction tokens stand for the CLIP tokenizer's: its start and end tokens, and
        the role marker left out, make them close but not equal.)"""
        d, m, layers = self.text_shape
        p = self.text_projection.out_features
        return (vision_tower_flops(n_text, d, m, layers) + d * p + n * self.vision_width * p
                + similarity_flops(n, 1, p))


def clip_folder_of(backbone_path: str | Path) -> Path | None:
    """The ``clip/`` folder saved beside a backbone (scripts/pretrain_tiny_backbone.py writes one), or None."""
    folder = Path(backbone_path) / CLIP_FOLDER
    return folder if (folder / "config.json").is_file() else None


def load_clip_relevance(folder: str | Path, prompt_tokenizer, vision_width: int) -> ClipTextRelevance:
    """A ClipTextRelevance of the CLIPModel and tokenizer saved in ``folder`` (local files only), checked against the
    backbone's ``vision_width``."""
    try:
        clip = CLIPModel.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except OSError as err:
        raise FileNotFoundError(f"no CLIPModel and tokenizer in {str(folder)!r} ({err}); give the folder of a saved "
                                "CLIPModel whose vision tower the backbone uses") from err
    if clip.config.vision_config.hidden_size != vision_width:
        raise ValueError(f"the CLIP in {str(folder)!r} has {clip.config.vision_config.hidden_size}-wide vision "
                         f"features, the backbone {vision_width}: it is not the CLIP of this backbone's tower")
    return ClipTextRelevance(clip, tokenizer, prompt_tokenizer).eval().requires_grad_(False)
