import pytest
import torch

from models.layer_pruner import INITIAL_KEEP_LOGIT, build_pruner, hard_keep, stage_budgets


@pytest.mark.parametrize("kind", ["cross_attention", "mlp"])
def test_pruners_start_by_keeping_everything(kind):
    pruner = build_pruner(kind, 16, 8, 2)
    logits = pruner(torch.randn(2, 10, 16), torch.randn(2, 4, 16), torch.ones(2, 4, dtype=torch.bool))
    assert logits.shape == (2, 10)
    torch.testing.assert_close(logits, torch.full((2, 10), INITIAL_KEEP_LOGIT))
    assert torch.sigmoid(logits).min() > 0.95


def test_cross_attention_pruner_reads_the_question():
    torch.manual_seed(0)
    pruner = build_pruner("cross_attention", 16, 8, 2)
    for p in pruner.parameters():
        torch.nn.init.normal_(p, std=0.5)
    vision, mask = torch.randn(1, 10, 16), torch.ones(1, 4, dtype=torch.bool)
    a = pruner(vision, torch.randn(1, 4, 16), mask)
    b = pruner(vision, torch.randn(1, 4, 16), mask)
    assert not torch.allclose(a, b)
    # masked question tokens are ignored
    q = torch.randn(1, 4, 16)
    half = torch.tensor([[True, True, False, False]])
    q2 = q.clone()
    q2[:, 2:] = 100.0
    torch.testing.assert_close(pruner(vision, q, half), pruner(vision, q2, half))


def test_hard_keep_and_budgets():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0], [5.0, 0.0, 1.0, -2.0]])
    assert hard_keep(logits, 2).tolist() == [[1, 3], [0, 2]]
    assert stage_budgets(288, [0.7, 0.75, 0.67]) == [202, 152, 102]
    assert stage_budgets(3, [0.1]) == [1]
    with pytest.raises(ValueError, match="pruner_type"):
        build_pruner("clever", 16, 8, 2)
