import torch

from trainers.inference.timing import speedups, stopwatch, timed_rounds


def test_speedups_are_medians_of_per_round_ratios():
    # per fn, its seconds in rounds 1-3; the third round is a slow spell for every fn alike, which per-round ratios ignore
    rounds = [[1.0, 1.0, 5.0], [0.5, 0.5, 2.5], [0.25, 1.0, 2.5]]
    assert speedups(rounds) == [1.0, 2.0, 2.0]


def test_timed_rounds_runs_every_setting_once_per_round_after_a_warm_up():
    calls = []
    rounds = timed_rounds([lambda: calls.append("a"), lambda: calls.append("b")], 3, torch.device("cpu"))
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert [len(r) for r in rounds] == [3, 3] and all(t >= 0 for r in rounds for t in r)
    assert stopwatch(lambda: 7, torch.device("cpu"))[0] == 7
