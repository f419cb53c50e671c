"""VisionZip: dominant tokens by the CLS token's attention, plus merged contextual tokens, before the projector.

Yang et al. 2024, "VisionZip: Longer is Better but Not Necessary in Vision Language Models".
The vision encoder's CLS token concentrates its attention on a few patches; those "dominant"
tokens are kept. The rest are folded into a few "contextual" tokens: targets picked at a uniform
stride among the remaining tokens, every other remaining token assigned to its most similar
target by the attention keys, and each target averaged with the tokens assigned to it.

What differs here:
- the CLS attention and keys are those of the encoder layer that produces LLaVA's features
  (the penultimate layer for llava-1.5), averaged over heads, recomputed through the adapter
  (LlavaBackbone.vision_features_with_attention) rather than read from an eager tower;
- the dominant / contextual split follows the paper's LLaVA-1.5 setting (54 + 10 of 64 tokens):
  about 10/64 of the budget is contextual, at least one when the budget allows two tokens;
- a contextual token is the plain mean of its target and the tokens assigned to it (the official
  code adds the target to the mean of the others);
- every token keeps a patch position (a contextual token its target's), so RoPE positions follow
  the image layout, and the output is in spatial order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.baselines.base import PreProjectorSelector, gather_tokens

CONTEXTUAL_SHARE = 10 / 64  # VisionZip's LLaVA-1.5 setting: 54 dominant + 10 contextual tokens


def contextual_count(num_keep: int) -> int:
    return 0 if num_keep < 2 else max(1, round(num_keep * CONTEXTUAL_SHARE))


class VisionZip(PreProjectorSelector):
    reads_vision_attention = True

    def __init__(self, num_keep: int, key_dim: int):
        super().__init__(num_keep)
        self.num_contextual = contextual_count(num_keep)
        self.num_dominant = num_keep - self.num_contextual
        self.key_dim = key_dim

    def flops(self, n: int, k: int | None = None, n_text: int = 0) -> int:
        """Similarities of the remaining tokens to the contextual targets (the CLS attention is the tower's own)."""
        return (n - self.num_dominant - self.num_contextual) * self.num_contextual * self.key_dim

    def select(self, features: torch.Tensor, vision_attention) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = features.shape
        dominant = vision_attention.cls_attention.topk(self.num_dominant, dim=1).indices  # (B, Kd)
        if self.num_contextual == 0:
            return gather_tokens(features, dominant), dominant
        rest_mask = torch.ones(B, N, dtype=torch.bool, device=features.device).scatter(1, dominant, False)
        rest = rest_mask.nonzero()[:, 1].view(B, -1)  # (B, N - Kd) patch indices, ascending
        step = max(1, rest.shape[1] // self.num_contextual)
        is_target = torch.zeros(rest.shape[1], dtype=torch.bool, device=features.device)
        is_target[torch.arange(0, rest.shape[1], step, device=features.device)[:self.num_contextual]] = True
        targets, others = rest[:, is_target], rest[:, ~is_target]  # (B, Kc), (B, M)
        keys = F.normalize(vision_attention.keys, dim=-1)  # (B, N, Dv)
        similarity = gather_tokens(keys, others) @ gather_tokens(keys, targets).transpose(1, 2)  # (B, M, Kc)
        assign = F.one_hot(similarity.argmax(dim=-1), self.num_contextual).to(features.dtype)  # (B, M, Kc)
        sums = gather_tokens(features, targets) + assign.transpose(1, 2) @ gather_tokens(features, others)  # (B, Kc, Dv)
        contextual = sums / (1 + assign.sum(dim=1)).unsqueeze(-1)  # (B, Kc, Dv)
        return torch.cat([gather_tokens(features, dominant), contextual], dim=1), torch.cat([dominant, targets], dim=1)
