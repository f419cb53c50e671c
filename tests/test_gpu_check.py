"""scripts/gpu_check.py at the tiny backbone's size on the CPU, so the prepared GPU check cannot rot, and the
largest-batch search of trainers/training/capacity.py."""

import json

import pytest
import torch

from scripts import gpu_check
from trainers.training import capacity
from trainers.training.throughput import PHASES


def test_gpu_check_runs_at_toy_size_and_reports_every_figure(tmp_path):
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--shapes", "tiny", "--device", "cpu", "--batch-size", "2", "--max-batch", "4", "--steps", "1",
                    "--repeats", "1", "--new-tokens", "2", "--json", str(out)])
    results = json.loads(out.read_text())
    assert [row["gradient_checkpointing"] for row in results["training"]] == [False, True]
    for row in results["training"]:
        assert row["batch"] == 2 and row["step_s"] > 0 and row["samples_per_s"] > 0
        assert row["step_s"] == pytest.approx(sum(row[f"{phase}_s"] for phase in PHASES))
    assert results["largest_batch"] == {way: {"batch": 4, "stopped": "--max-batch 4 reached"} for way in ("off", "on")}
    prefill = results["prefill"]
    assert [round(row["vision"][-1]) for row in prefill] == [144, 72, 36, 16]
    assert prefill[0]["whole"] == 1.0 and all(0 < row["whole"] < 1 for row in prefill[1:])
    assert all(row["allowed"] > 1 for row in prefill[1:])


def test_largest_batch_stops_at_the_first_batch_out_of_memory(monkeypatch):
    tried = []

    def fake_step(config, backbone, batch, checkpointing, steps):
        tried.append(batch)
        if batch > 24:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(capacity, "training_figures", fake_step)
    assert capacity.largest_batch(None, None, 12, 96, True) == (24, "batch 48 ran out of memory")
    assert tried == [12, 24, 48]
    assert capacity.largest_batch(None, None, 48, 96, True) == (None, "batch 48 ran out of memory")


def test_largest_batch_lets_other_errors_through(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(capacity, "training_figures", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        capacity.largest_batch(None, None, 12, 96, False)


@pytest.mark.parametrize("args, message", [(["--batch-size", "0"], "must be at least 1"),
                                           (["--batch-size", "16", "--max-batch", "8"], "is below --batch-size"),
                                           (["--shapes", "tiny", "--device", "cuda"] if not torch.cuda.is_available()
                                            else ["--steps", "0"], "CUDA" if not torch.cuda.is_available() else "at least")])
def test_bad_arguments_are_refused_before_any_model_loads(args, message, capsys):
    with pytest.raises(SystemExit) as err:
        gpu_check.main(args)
    assert err.value.code == 2 and message in capsys.readouterr().err
