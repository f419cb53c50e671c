import math

import pytest
import torch

from trainers.training.schedules import TemperatureSchedule


def test_linear_then_held():
    tau = TemperatureSchedule(1.0, 0.1, 0.5, total_steps=2000)
    assert tau(0) == 1.0
    assert tau(500) == pytest.approx(0.55)
    assert tau(999) == pytest.approx(1.0 - 0.9 * 999 / 1000)
    assert tau(1000) == tau(1999) == 0.1


def test_no_annealing_and_bad_values():
    assert TemperatureSchedule(1.0, 0.1, 0.0, total_steps=10)(0) == 0.1
    with pytest.raises(ValueError, match="above temperature"):
        TemperatureSchedule(0.1, 1.0, 0.5, 10)


def schedule(total_steps, **settings):
    from configs.schema import OptimizerSettings
    from trainers.training.schedules import learning_rate_schedule

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    return learning_rate_schedule(optimizer, OptimizerSettings(lr=1e-3, **settings), total_steps)


def rates(scheduler, steps):
    """The learning rate of each of ``steps`` optimizer steps, stepping the schedule after each as the trainer does."""
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_constant_without_warm_up_is_the_configured_rate_exactly():
    assert rates(schedule(5), 5) == [1e-3] * 5


def test_warm_up_then_cosine_to_the_floor():
    lrs = rates(schedule(10, scheduler="cosine", warmup_steps=2, min_lr_ratio=0.1), 10)
    assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3])  # linear from 0; the first step runs at 0 (transformers')
    for step in range(2, 10):  # cosine over the 8 steps after the warm-up, from lr down to 0.1 lr
        progress = (step - 2) / 8
        assert lrs[step] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))))
    assert lrs == sorted(lrs[:3]) + sorted(lrs[3:], reverse=True)


def test_warmup_ratio_rounds_up_to_whole_steps():
    from configs.schema import OptimizerSettings
    from trainers.training.schedules import warmup_steps

    assert warmup_steps(OptimizerSettings(warmup_ratio=0.03), 4875) == 147
    assert warmup_steps(OptimizerSettings(warmup_ratio=0.03), 10) == 1
    assert warmup_steps(OptimizerSettings(warmup_steps=7, warmup_ratio=0.0), 10) == 7
    assert rates(schedule(4, warmup_ratio=0.5), 4) == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])
