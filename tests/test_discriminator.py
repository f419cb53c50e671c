import torch

from models.discriminator import Discriminator, adversarial_loss, discriminator_losses, pool_answer_states


def test_pooling_uses_only_answer_positions():
    states = torch.arange(12.0).view(1, 4, 3)
    mask = torch.tensor([[False, True, False, True]])
    torch.testing.assert_close(pool_answer_states(states, mask), (states[0, 1] + states[0, 3])[None] / 2)


def test_losses_train_the_discriminator_and_gradients_flow_to_fake():
    torch.manual_seed(0)
    disc = Discriminator(8, hidden=16)
    real, fake = torch.randn(16, 8) + 2.0, torch.randn(16, 8) - 2.0
    opt = torch.optim.Adam(disc.parameters(), lr=1e-2)
    for _ in range(100):
        losses = discriminator_losses(disc, real, fake)
        opt.zero_grad()
        (losses["real_loss"] + losses["fake_loss"]).backward()
        opt.step()
    losses = discriminator_losses(disc, real, fake)
    assert losses["disc_prob_real"] > 0.9 and losses["disc_prob_fake"] < 0.1
    source = fake.clone().requires_grad_(True)
    adversarial_loss(disc, source).backward()
    assert source.grad.abs().sum() > 0


def test_reset_parameters_changes_every_layer():
    torch.manual_seed(0)
    disc = Discriminator(8, hidden=16)
    for p in disc.parameters():
        torch.nn.init.constant_(p, 0.3)
    disc.reset_parameters()
    assert all(not torch.all(p == 0.3) for p in disc.parameters())
    hidden, logits = torch.randn(2, 5, 8), torch.randn(2, 5, 30)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert Discriminator(30, input_kind="logits").features(hidden, logits, mask).shape == (2, 30)
