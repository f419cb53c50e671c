"""Discriminator: tells the unpruned backbone's answer representation ("real") from the pruned one's ("fake").

Input: the final hidden state (after the last norm) at the supervised answer positions,
mean-pooled per sample (``input_kind="hidden"``), or the softmax of the output logits there
(``"logits"``, the seed's diagram). An MLP gives one logit per sample: real = 1. Trained with
BCE on detached inputs; the merger and pruners are trained to fool it (non-saturating loss),
aligning the pruned model's outputs with the unpruned model's, as adversarial domain
adaptation aligns two feature distributions (Ganin & Lempitsky 2015).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pool_answer_states(states: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, T, D) states over the positions of (B, T) ``answer_mask`` -> (B, D)."""
    weights = answer_mask.to(states.dtype).unsqueeze(-1)  # (B, T, 1)
    counts = weights.sum(dim=1).clamp_min(1.0)
    return (states * weights).sum(dim=1) / counts


class Discriminator(nn.Module):
    def __init__(self, input_dim: int, hidden: int = 256, input_kind: str = "hidden"):
        super().__init__()
        if input_kind not in ("hidden", "logits"):
            raise ValueError(f"discriminator input must be 'hidden' or 'logits', got {input_kind!r}")
        self.input_kind = input_kind
        self.net = nn.Sequential(nn.LayerNorm(input_dim), nn.Linear(input_dim, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def features(self, hidden: torch.Tensor, logits: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
        states = hidden if self.input_kind == "hidden" else logits.float().softmax(dim=-1)
        return pool_answer_states(states.float(), answer_mask)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled answer states -> (B,) logits, real = positive."""
        return self.net(pooled).squeeze(-1)

    def reset_parameters(self) -> None:
        """Re-initialise every layer (``disc_reinit_prob``)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)):
                module.reset_parameters()


def discriminator_losses(disc: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
    """BCE of the discriminator on detached pooled real/fake inputs, and its mean probabilities. One call of ``disc``
    on both (a data-parallel wrapper expects one forward per backward)."""
    real_logit, fake_logit = disc(torch.cat([real.detach(), fake.detach()])).split([len(real), len(fake)])
    return {
        "real_loss": F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit)),
        "fake_loss": F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)),
        "disc_prob_real": torch.sigmoid(real_logit).mean().detach(),
        "disc_prob_fake": torch.sigmoid(fake_logit).mean().detach(),
    }


def adversarial_loss(disc: Discriminator, fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: -log D(fake), through the discriminator's weights held fixed: gradients flow to
    whatever produced ``fake``, never into the discriminator, so one backward can serve both players."""
    fixed = {name: p.detach() for name, p in disc.named_parameters()}
    logit = torch.func.functional_call(disc, fixed, (fake,))
    return F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))
