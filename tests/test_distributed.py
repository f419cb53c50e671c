"""Data parallelism and gradient accumulation (accelerate): every way of splitting a global batch takes the same step."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main as entry
from models import gumbel
from tests.helpers import main_args
from trainers.training.distributed import shard

PROJECT_ROOT = Path(__file__).resolve().parent.parent

STEPS = 3
# a global batch of 8 over 3 steps; evaluation and checkpoints at the end only
SETTINGS = {"trainer_settings.max_steps": STEPS, "trainer_settings.log_every": 1, "trainer_settings.save_every": STEPS,
            "trainer_settings.eval_every": STEPS, "trainer_settings.dl_settings.batch_size": 8,
            "data_settings.synthetic_train_size": 24}


def test_shards_cover_each_batch_once():
    batch = list(range(7))
    shards = [shard(batch, r, 3) for r in range(3)]
    assert sum(shards, []) == batch and [len(s) for s in shards] == [2, 2, 3]
    assert shard(batch, 0, 1) == batch


def module_weights(out: Path) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value for name in ("token_merger", "layer_pruners", "discriminator")
            for key, value in torch.load(out / "checkpoints" / f"{name}_step_{STEPS}.pt").items()}


def first_losses(out: Path) -> str:
    log = (out / "logs" / "training.log").read_text()
    return log[log.index("[Step 1] Losses:"):log.index("[Step 1] Temperature")]


def evaluation(out: Path) -> list[str]:
    """The last evaluation block's lines, but its wall-clock time."""
    log = (out / "logs" / "training.log").read_text()
    block = log[log.rindex(f"[Eval Step {STEPS}]"):log.index("[Summary]")]
    return [line for line in block.splitlines() if "prefill_ms" not in line]


@pytest.mark.slow
def test_two_processes_with_accumulation_take_the_step_of_one_process(tmp_path, tiny_folder, monkeypatch):
    # tests/noise_free_main.py fixes the training noise, which each process would otherwise draw for itself.
    monkeypatch.setattr(gumbel, "_uniform_open", lambda shape_like, generator=None: torch.full_like(shape_like, 0.5))
    runs = {}
    for accumulation in (1, 4):  # one process: the whole batch at once, and in four micro-batches
        args, runs[accumulation] = main_args(tmp_path / f"one_x{accumulation}", tiny_folder, **SETTINGS, **{
            "trainer_settings.dl_settings.gradient_accumulation_steps": accumulation})
        assert entry.main(args) == 0
    args, runs["2x2"] = main_args(tmp_path / "two_x2", tiny_folder, **SETTINGS,
                                  **{"trainer_settings.dl_settings.gradient_accumulation_steps": 2})
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "tests.noise_free_main", *args], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr

    whole = module_weights(runs[1])
    for name in (4, "2x2"):
        other = module_weights(runs[name])
        worst = max((whole[k] - other[k]).abs().max().item() for k in whole)
        assert worst < 1e-5, (name, worst)
    # measured: with each micro-batch's backward at full weight (no division by the accumulation steps), up to 7e-3
    assert first_losses(runs["2x2"]) == first_losses(runs[1])  # logged losses: means over the whole batch
    log = (runs["2x2"] / "logs" / "training.log").read_text()
    assert log.count("[Step 1] Losses:") == 1 and log.count(f"[Eval Step {STEPS}]") == 1  # rank 0 only
    # the evaluation shared by the two processes (3 of the 6 questions each, gathered) is the one process's
    assert evaluation(runs["2x2"]) == evaluation(runs[1])
    assert run.stdout.count("[INFO] Starting training...") == 1


def test_a_global_batch_that_does_not_split_is_refused_before_anything_is_written(tmp_path, tiny_folder, monkeypatch,
                                                                                  capsys):
    args, out = main_args(tmp_path, tiny_folder, **{"trainer_settings.dl_settings.batch_size": 8,
                                                    "trainer_settings.dl_settings.gradient_accumulation_steps": 2})
    monkeypatch.setenv("WORLD_SIZE", "3")  # as accelerate launch / torchrun set it for each of 3 processes
    for rank in ("0", "1", "2"):
        monkeypatch.setenv("RANK", rank)
        assert entry.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == err.count("error:") == 1  # one line, from rank 0 only
    assert ("batch_size (8) is the global batch and must split evenly over 3 process(es) x 2 accumulation step(s) = 6 "
            "micro-batches; set it to a multiple of 6 (e.g. 6 or 12)") in err
    assert not out.exists()  # nothing written, not even the folder


@pytest.mark.slow
def test_a_kill_in_the_middle_of_an_accumulation_resumes_bit_for_bit(tmp_path, tiny_folder):
    optimizers = "trainer_settings.dl_settings.optimizers"
    settings = {**SETTINGS, "trainer_settings.max_steps": 4, "trainer_settings.save_every": 1,
                "trainer_settings.eval_every": 100, "data_settings.synthetic_train_size": 40,
                "trainer_settings.dl_settings.gradient_accumulation_steps": 2,
                f"{optimizers}.token_merger.scheduler": "cosine", f"{optimizers}.layer_pruners.warmup_steps": 3}

    def run(folder, *extra, kill_at=0):
        args, out = main_args(folder, tiny_folder, *extra, **settings)
        done = subprocess.run([sys.executable, "-m", "tests.killed_main", *args], cwd=PROJECT_ROOT, capture_output=True,
                              text=True, env={**os.environ, "KILL_AT_MICRO_BATCH": str(kill_at)})
        return done, out

    straight, straight_out = run(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    killed, out = run(tmp_path / "killed", kill_at=6)  # steps 1 and 2 saved; step 3's second micro-batch never runs
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (out / "checkpoints").glob("training_state_step_*.pt")) == [
        "training_state_step_1.pt", "training_state_step_2.pt"]
    resumed, _ = run(tmp_path / "killed", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "Resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    for name in ("token_merger", "layer_pruners", "discriminator"):
        a = torch.load(straight_out / "checkpoints" / f"{name}_step_4.pt")
        b = torch.load(out / "checkpoints" / f"{name}_step_4.pt")
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a = torch.load(straight_out / "checkpoints" / "training_state_step_4.pt")
    b = torch.load(out / "checkpoints" / "training_state_step_4.pt")
    assert a["schedulers"] == b["schedulers"]
