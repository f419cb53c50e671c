"""Nothing lost when a signal, a second run or a full disk meets a run: SIGTERM and Ctrl-C save a resumable state,
a folder holds one run at a time, a best save is one unit, and what an interrupted save left is cleaned up."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main as entry
from tests.helpers import main_args
from trainers import checkpoint
from trainers.checkpoint import CheckpointError, Checkpointer, remove_stale
from trainers.training import trainer as trainer_module

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("token_merger", "layer_pruners", "discriminator")
RUN = {"trainer_settings.max_steps": 4, "trainer_settings.eval_every": 2, "trainer_settings.save_every": 4,
       "data_settings.synthetic_train_size": 24, "data_settings.synthetic_eval_size": 8}


def signal_at_micro_batch(monkeypatch, at: list[int], signum=signal.SIGTERM):
    """Send ``signum`` to this process when the trainer computes each micro-batch in ``at`` (counted from 1; one
    listed twice gets it twice)."""
    losses, calls = trainer_module.Trainer.losses, [0]

    def counted(self, *args, **kwargs):
        calls[0] += 1
        for _ in range(at.count(calls[0])):
            os.kill(os.getpid(), signum)
        return losses(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.Trainer, "losses", counted)


def weights(out: Path, step: int) -> dict:
    return {name: torch.load(out / "checkpoints" / f"{name}_step_{step}.pt") for name in MODULES}


def assert_same(a: dict, b: dict) -> None:
    for name in MODULES:
        assert a[name].keys() == b[name].keys() and all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_folder):
    """The uninterrupted run the interrupted ones must end equal to."""
    args, out = main_args(tmp_path_factory.mktemp("straight"), tiny_folder, **RUN)
    assert entry.main(args) == 0
    return weights(out, 4)


def test_sigterm_saves_the_current_step_and_the_resumed_run_is_bit_identical(tmp_path, tiny_folder, straight,
                                                                             monkeypatch, capsys):
    args, out = main_args(tmp_path, tiny_folder, **RUN)
    with monkeypatch.context() as patch:
        signal_at_micro_batch(patch, [3])  # during step 3: it finishes, then the run stops
        assert entry.main(args) == 128 + signal.SIGTERM
    stdout = capsys.readouterr().out
    assert "Stopped by SIGTERM at step 3 of 4" in stdout and "--resume auto" in stdout
    assert (out / "checkpoints" / "training_state_step_3.pt").is_file()
    assert not list(out.rglob("*.tmp"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are the trainer's only while it trains
    assert entry.main([*args, "--resume", "auto"]) == 0
    assert "Resumed from" in capsys.readouterr().out
    assert_same(weights(out, 4), straight)


def test_ctrl_c_during_an_evaluation_keeps_the_steps_trained_since_the_last_save(tmp_path, tiny_folder, straight,
                                                                                 monkeypatch, capsys):
    args, out = main_args(tmp_path, tiny_folder, **RUN)
    batches = trainer_module.batches

    def interrupted_batches(*a, **k):  # the first evaluation (step 2) is asked to stop before its first batch
        os.kill(os.getpid(), signal.SIGINT)
        return batches(*a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "batches", interrupted_batches)
        assert entry.main(args) == 128 + signal.SIGINT
    stdout = capsys.readouterr().out
    assert "Stopped by SIGINT at step 2" in stdout and "[Eval Step 2]" not in stdout
    assert (out / "checkpoints" / "training_state_step_2.pt").is_file()  # save_every is 4: this one is the stop's
    assert entry.main([*args, "--resume", "auto"]) == 0
    assert_same(weights(out, 4), straight)


def test_sigterm_during_a_checkpoint_write_lets_the_write_finish(tmp_path, tiny_folder, monkeypatch, capsys):
    args, out = main_args(tmp_path, tiny_folder, **{**RUN, "trainer_settings.save_every": 2})
    save = torch.save

    def signalled_save(obj, path, *a, **k):
        if Path(path).name == ".token_merger_step_2.pt.tmp":
            os.kill(os.getpid(), signal.SIGTERM)
        return save(obj, path, *a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", signalled_save)
        assert entry.main(args) == 128 + signal.SIGTERM
    assert "Stopped by SIGTERM at step 2" in capsys.readouterr().out
    files = sorted(p.name for p in (out / "checkpoints").iterdir() if "best" not in p.name)
    assert files == sorted([*(f"{m}_step_2.pt" for m in MODULES), "training_state_step_2.pt"]), files  # no .tmp


def test_a_second_ctrl_c_stops_at_once(tmp_path, tiny_folder, monkeypatch, capsys):
    args, out = main_args(tmp_path, tiny_folder, **RUN)
    with monkeypatch.context() as patch:
        signal_at_micro_batch(patch, [1, 1], signal.SIGINT)  # both during step 1
        assert entry.main(args) == 130
    assert "error: interrupted; no training state was saved yet" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


HOLDER = ("import sys; from pathlib import Path; from trainers.training.run_lock import hold_output_dir, sign; "
          "lock = hold_output_dir(Path(sys.argv[1])); sign(lock); print('held', flush=True); sys.stdin.read()")


def test_a_second_run_on_a_folder_in_use_is_refused_and_a_killed_holder_blocks_nothing(tmp_path, tiny_folder, capsys):
    args, out = main_args(tmp_path, tiny_folder, **{**RUN, "trainer_settings.max_steps": 2})
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert entry.main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"is in use by the run of process {holder.pid}" in err
        assert sorted(p.name for p in out.iterdir()) == [".run.lock"]  # the refused run wrote nothing
    finally:
        holder.kill()  # kill -9: the kernel releases its lock
        holder.wait()
    assert entry.main(args) == 0


def test_a_best_save_cut_by_a_full_disk_is_refused_on_read(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    saver = Checkpointer(folder, keep_last=2)
    state = lambda step: {"step": torch.tensor(step)}
    saver.save(1, {m: state(1) for m in MODULES}, state(1), tag="best")
    assert checkpoint.load(folder / "training_state_best.pt")["step"] == 1  # a complete save reads
    save = torch.save

    def full_disk(obj, path, *a, **k):
        if Path(path).name == ".training_state_best.pt.tmp":
            raise RuntimeError("[enforce fail at inline_container.cc] : file write failed")
        return save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="cannot write checkpoint: .*file write failed"):
        saver.save(2, {m: state(2) for m in MODULES}, state(2), tag="best")
    # new module files beside the old state: neither is read as the best
    for name in (*MODULES, "training_state"):
        with pytest.raises(CheckpointError, match="belongs to a save that did not finish \\(step 2"):
            checkpoint.load(folder / f"{name}_best.pt")
    monkeypatch.setattr(torch, "save", save)
    saver.save(3, {m: state(3) for m in MODULES}, state(3), tag="best")
    assert checkpoint.load(folder / "token_merger_best.pt")["step"] == 3
    (folder / "token_merger_best.pt").write_bytes(b"something else")
    with pytest.raises(CheckpointError, match="was changed after its save"):
        checkpoint.load(folder / "token_merger_best.pt")


def test_what_an_interrupted_save_left_is_removed_or_put_back(tmp_path):
    run, folder = tmp_path, tmp_path / "checkpoints"
    folder.mkdir()
    kept = [f"{name}_step_4.pt" for name in (*MODULES, "training_state")]
    for name in [*kept, ".training_state_step_6.pt.tmp", "token_merger_step_6.pt", "layer_pruners_step_6.pt"]:
        (folder / name).write_bytes(b"x")
    (run / ".pruned_best.tmp").mkdir()
    (run / ".pruned_final.old").mkdir()  # the new pruned_final never arrived: the old one goes back
    (run / ".pruned_final.old" / "pruning_config.json").write_text("{}")
    (run / "pruned_best").mkdir()
    (run / ".pruned_best.old").mkdir()  # the swap finished: the old copy goes
    removed = remove_stale(run)
    assert sorted(removed) == sorted([".pruned_best.old", ".pruned_best.tmp", "checkpoints/.training_state_step_6.pt.tmp",
                                      "checkpoints/layer_pruners_step_6.pt", "checkpoints/token_merger_step_6.pt"])
    assert sorted(p.name for p in folder.iterdir()) == sorted(kept)
    assert (run / "pruned_final" / "pruning_config.json").is_file() and (run / "pruned_best").is_dir()


def test_a_resumed_run_says_what_it_cleaned(tmp_path, tiny_folder, capsys):
    args, out = main_args(tmp_path, tiny_folder, **{**RUN, "trainer_settings.max_steps": 2,
                                                    "trainer_settings.save_every": 2})
    assert entry.main(args) == 0
    (out / "checkpoints" / ".training_state_step_3.pt.tmp").write_bytes(b"half")
    capsys.readouterr()
    assert entry.main([*args, "--resume", "auto", "--set", "trainer_settings.max_steps=3"]) == 0
    assert ("Removed what an interrupted save left in " in capsys.readouterr().out
            and not (out / "checkpoints" / ".training_state_step_3.pt.tmp").exists())
