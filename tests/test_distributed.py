"""Data parallelism: two processes (torchrun, gloo on the CPU) train like one process on the same global batch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main as entry
from data.build import build_datasets
from models import gumbel
from models.llava_backbone import LlavaBackbone
from tests.helpers import main_args, tiny_run_config
from trainers.distributed import DataParallel
from trainers.run_log import RunLog
from trainers.trainer import Trainer

PROJECT_ROOT = Path(__file__).resolve().parent.parent

STEPS = 3

def test_shards_cover_each_global_batch_once():
    batch = list(range(7))
    shards = [DataParallel(rank=r, world_size=3).shard(batch) for r in range(3)]
    assert sum(shards, []) == batch and [len(s) for s in shards] == [2, 2, 3]
    assert DataParallel().shard(batch) == batch


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path, tiny_folder, monkeypatch):
    # tests/noise_free_main.py fixes the training noise, which each process would otherwise draw for itself.
    monkeypatch.setattr(gumbel, "_uniform_open", lambda shape_like, generator=None: torch.full_like(shape_like, 0.5))
    settings = {"trainer_settings.max_steps": STEPS, "trainer_settings.log_every": 1,
                "trainer_settings.save_every": STEPS, "trainer_settings.eval_every": STEPS,
                "data_settings.synthetic_train_size": 24}
    one_args, one = main_args(tmp_path / "one", tiny_folder, **settings)
    assert entry.main(one_args) == 0
    two_args, two = main_args(tmp_path / "two", tiny_folder, **settings)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "tests/noise_free_main.py", *two_args], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr

    differences = []
    for name in ("token_merger", "layer_pruners", "discriminator"):
        a = torch.load(one / "checkpoints" / f"{name}_step_{STEPS}.pt")
        b = torch.load(two / "checkpoints" / f"{name}_step_{STEPS}.pt")
        differences += [(a[k] - b[k]).abs().flatten() for k in a]
    differences = torch.cat(differences)
    # Adam turns a gradient that is zero up to rounding (the merger scorer's output bias: shifting every score
    # changes no choice) into a full step of either sign, so a few elements may differ. Measured: none of 10853
    # elements beyond 1e-4 (all within 8e-7; 1 of 8885 with the simple merger); without the gradient all-reduce, 2501
    # of 8885 by up to 1.6e-2; with a relevance loss averaged over the batch's labelled tokens instead of per sample,
    # 3507 of 10853.
    assert (differences > 1e-4).sum().item() <= differences.numel() // 1000
    log_one = (one / "logs" / "training.log").read_text()
    log_two = (two / "logs" / "training.log").read_text()
    first = lambda log: log[log.index("[Step 1] Losses:"):log.index("[Step 1] Temperature")]
    assert first(log_two) == first(log_one)  # losses averaged over the two shards = the whole batch's
    assert log_two.count("[Step 1] Losses:") == 1 and log_two.count(f"[Eval Step {STEPS}]") == 1  # rank 0 only
    assert run.stdout.count("[INFO] Starting training...") == 1


def test_a_global_batch_that_does_not_split_evenly_is_refused(tmp_path, tiny_folder):
    config = tiny_run_config(tmp_path, tiny_folder, **{"trainer_settings.dl_settings.batch_size": 4})
    backbone = LlavaBackbone.from_pretrained(str(tiny_folder))
    train_set, eval_set = build_datasets(config.data_settings)
    with pytest.raises(ValueError, match=r"batch_size \(4\) is the global batch and must split evenly over the 3 "
                                         r"processes; make it a multiple of 3"):
        Trainer(config, backbone, train_set, eval_set, RunLog(), tmp_path, DataParallel(rank=0, world_size=3))
