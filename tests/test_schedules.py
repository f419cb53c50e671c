import pytest

from trainers.schedules import TemperatureSchedule


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
