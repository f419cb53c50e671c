"""trainers/inference/flops_match.py: the learned rows' stage rule and the schedule that fits a FLOPs target."""

import pytest

from models.layer_pruner import stage_budgets
from trainers.inference.flops_match import STAGE_KEEP, matched_schedule, stage_ratios


@pytest.mark.parametrize("stage_keep", [STAGE_KEEP, 0.6, 0.9])
@pytest.mark.parametrize("keep, stages", [(36, 3), (72, 3), (16, 3), (29, 3), (36, 1), (5, 2)])
def test_stage_ratios_keep_the_stage_share_or_end_at_the_budget(keep, stages, stage_keep):
    for merged in range(keep, 145):
        ratios = stage_ratios(merged, keep, stages, stage_keep)
        budgets = stage_budgets(merged, ratios)
        assert len(ratios) == stages and budgets[-1] <= keep
        if stage_budgets(merged, [stage_keep] * stages)[-1] > keep:
            assert budgets[-1] == keep  # pruned harder than the stage share only as far as the budget needs
        else:
            assert ratios == [stage_keep] * stages
    assert stage_ratios(40, 36, 0, stage_keep) == []


def test_matched_schedule_takes_the_most_merged_tokens_within_the_flops_target():
    def mean_tokens(merged, ratios):  # a cost that grows with every stage's count, like the FLOPs
        return sum([merged, *stage_budgets(merged, ratios)]) / (1 + len(ratios)) / 144

    for keep, target in [(36, 0.3), (36, 0.5), (16, 0.2), (72, 0.45), (72, 2.0)]:
        merged, ratios = matched_schedule(144, keep, 3, mean_tokens, target)
        assert mean_tokens(merged, ratios) <= target and stage_budgets(merged, ratios)[-1] <= keep
        if merged < 144:  # one more merged token would cost more than the target
            assert mean_tokens(merged + 1, stage_ratios(merged + 1, keep, 3)) > target
    with pytest.raises(ValueError, match="no learned schedule keeping at most 36 tokens fits 10.0% of the unpruned"):
        matched_schedule(144, 36, 3, mean_tokens, 0.1)
    # a gentler stage share keeps fewer tokens at the merger and more after the last stage at the same cost
    gentle, steep = (matched_schedule(144, 72, 3, mean_tokens, 0.45, keep) for keep in (0.9, 0.6))
    assert gentle[0] < steep[0] and stage_budgets(*gentle)[-1] > stage_budgets(*steep)[-1]


@pytest.mark.parametrize("keep, target", [(72, 0.6), (72, 0.75), (36, 0.5), (16, 0.9)])
def test_flops_left_with_every_token_merged_go_to_the_stages(keep, target):
    def mean_tokens(merged, ratios):
        return sum([merged, *stage_budgets(merged, ratios)]) / (1 + len(ratios)) / 144

    merged, ratios = matched_schedule(144, keep, 3, mean_tokens, target, 0.5)
    end = stage_budgets(merged, ratios)[-1]
    assert merged == 144 and mean_tokens(merged, ratios) <= target and end <= keep
    if end < keep:  # the stages keep more than the rule's share, up to the target: 1/200 more costs too much
        assert ratios[0] > 0.5
        assert mean_tokens(144, stage_ratios(144, keep, 3, ratios[0] + 0.5 / 200 + 1e-9)) > target
    else:  # the budget binds first
        assert ratios == stage_ratios(144, keep, 3, 1.0)


def test_the_stages_keep_the_rule_share_while_the_merger_is_short_of_every_token():
    def mean_tokens(merged, ratios):
        return sum([merged, *stage_budgets(merged, ratios)]) / (1 + len(ratios)) / 144

    merged, ratios = matched_schedule(144, 72, 3, mean_tokens, 0.3, 0.5)
    assert merged < 144 and ratios == [0.5] * 3
