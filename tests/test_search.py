"""The Optuna search: storage, heartbeats and signals, results, and whole studies run by the manager's workers."""

import fcntl
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import optuna
import pytest
import yaml
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

import main as entry
from configs.schema import SearchSettings, apply_overrides, config_from_dict, config_to_dict, load_config, save_config
from tests.helpers import tiny_run_config
from trainers.search import interrupts
from trainers.search import study as search
from trainers.search import worker as search_worker
from trainers.search.manager import PROJECT_ROOT, gpu_subsets, queue_left_running, run_search, worker_environments

SPACE = ("{method_settings.task_loss_weight: {type: float, low: 10, high: 50, log: true},"
         " method_settings.merge_ratio: {type: float, low: 0.4, high: 0.6}}")


def search_config(tmp_path, folder, **overrides):
    """A study of tiny trials (4 steps, 6 eval questions) that runs on the CPU."""
    settings = {"manager_settings.mode": "optuna", "search_settings.enable": "true", "backbone_settings.device": "auto",
                "search_settings.study_name": "test", "search_settings.n_trials": 3, "search_settings.pruner": "none",
                "search_settings.flops_budget": "null", "search_settings.search_space": SPACE,
                "search_settings.heartbeat_interval": 1, "search_settings.grace_period": 3, **overrides}
    return tiny_run_config(tmp_path, folder, **settings)


def with_overrides(config, **overrides):
    return config_from_dict(apply_overrides(config_to_dict(config), [f"{k}={v}" for k, v in overrides.items()]))


def study_of(config):
    return search.open_study(config, search.open_storage(config.search_settings, config.manager_settings.output_dir))


# ----------------------------------------------------------------------------- GPU subsets
def test_each_worker_gets_its_own_block_of_gpus(tmp_path, tiny_folder):
    assert gpu_subsets([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    assert gpu_subsets([4, 5, 6, 7, 0, 1], 3) == [[4, 5, 6], [7, 0, 1]]
    config = search_config(tmp_path, tiny_folder, **{"manager_settings.available_gpus": [0, 1, 2, 3],
                                                     "manager_settings.gpus_per_subtask": 2})
    envs = worker_environments(config, {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})
    assert [env["CUDA_VISIBLE_DEVICES"] for env in envs] == ["0,1", "2,3"]
    assert all(env["PATH"] == "/bin" for env in envs)
    cpu = search_config(tmp_path, tiny_folder, **{"manager_settings.cpu_workers": 3})
    assert [env["CUDA_VISIBLE_DEVICES"] for env in worker_environments(cpu, {})] == ["", "", ""]  # no GPU visible


# ----------------------------------------------------------------------------- storage and heartbeats
def test_a_trial_whose_heartbeat_stopped_is_failed_and_queued_again(tmp_path):
    storage = search.HeartbeatJournalStorage(tmp_path / "journal.log", heartbeat_interval=1, grace_period=1,
                                             stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask()
    x = trial.suggest_float("x", 0, 1)
    storage.record_heartbeat(trial._trial_id)
    optuna.storages.fail_stale_trials(study)
    assert study.trials[0].state == TrialState.RUNNING  # beating: alive
    time.sleep(1.3)
    optuna.storages.fail_stale_trials(study)
    first, retry = study.trials
    assert first.state == TrialState.FAIL and retry.state == TrialState.WAITING
    assert retry.params == {"x": x} and retry.system_attrs["failed_trial"] == 0

    study.ask()  # the retry starts; it carries its predecessor's old heartbeat but is alive from its start
    optuna.storages.fail_stale_trials(study)
    assert study.trials[1].state == TrialState.RUNNING
    time.sleep(1.3)
    optuna.storages.fail_stale_trials(study)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]  # max_retry 1: not queued again
    assert search.progress_of(study.trials).failed == 1 and search.progress_of(study.trials).retried == 1


def test_trials_stopped_workers_left_running_are_failed_and_queued_by_the_manager(tmp_path):
    # A worker killed after the stop wait, or whose clean-up a second Ctrl-C cut short, leaves its trial RUNNING: the
    # manager records those of its own workers (this host, their pids), and no other machine's or process's.
    storage = search.HeartbeatJournalStorage(tmp_path / "journal.log", heartbeat_interval=1, grace_period=600)
    study = optuna.create_study(storage=storage, study_name="s")
    owners = {"mine": (socket.gethostname(), 101), "other pid": (socket.gethostname(), 202),
              "other host": (socket.gethostname() + "-elsewhere", 101), "finished": (socket.gethostname(), 101)}
    trials = {}
    for name, (host, pid) in owners.items():
        trials[name] = study.ask()
        trials[name].suggest_float("x", 0, 1)
        trials[name].set_user_attr("worker", {"host": host, "pid": pid})
    study.ask()  # claimed, its worker not yet recorded: the heartbeat check's, on the next run
    study.tell(trials["finished"], 1.0)
    assert queue_left_running(study, storage, {101, 303}, max_retry=1, signum=signal.SIGINT) == [trials["mine"].number]
    states = {name: study.trials[t.number].state for name, t in trials.items()}
    assert states == {"mine": TrialState.FAIL, "other pid": TrialState.RUNNING, "other host": TrialState.RUNNING,
                      "finished": TrialState.COMPLETE}
    assert study.trials[trials["mine"].number].user_attrs["error"].startswith("interrupted by SIGINT (Ctrl-C)")
    (retry,) = [t for t in study.trials if t.state == TrialState.WAITING]
    assert retry.system_attrs["failed_trial"] == trials["mine"].number and retry.params == trials["mine"].params
    assert queue_left_running(study, storage, {101}, max_retry=1, signum=signal.SIGINT) == []  # recorded once


def test_database_urls(tmp_path):
    sqlite = search.open_storage(SearchSettings(storage=f"sqlite:///{tmp_path / 'study.db'}"), tmp_path)
    assert isinstance(sqlite, RDBStorage) and sqlite.get_heartbeat_interval() == 60
    postgres = SearchSettings(storage="postgresql://user:secret@127.0.0.1:1/studies")
    with pytest.raises(search.SearchError) as err:
        search.open_storage(postgres, tmp_path)
    assert "search_settings.storage postgresql://user:***@127.0.0.1:1/studies" in str(err.value)
    assert "secret" not in str(err.value)
    # SQLAlchemy 2 imports psycopg (3) for postgresql://: the advice names the package that provides it
    assert "driver 'psycopg' is not installed" in str(err.value) and "pip install 'psycopg[binary]'" in str(err.value)


# ----------------------------------------------------------------------------- signals and the journal's lock
@pytest.fixture
def search_signal_handlers():
    """The test installs the search's SIGINT and SIGTERM handlers; the ones it found are put back after it."""
    previous = {signum: signal.getsignal(signum) for signum in interrupts.STOP_SIGNALS}
    for signum in interrupts.STOP_SIGNALS:
        signal.signal(signum, interrupts.interrupt)
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def signals_sent_inside_the_journal_lock(monkeypatch) -> list[int]:
    """A list: a signal put in it is sent to this process by the main thread's next journal write, from inside the
    journal's lock, where Python raises at the next bytecode unless the write holds it back. No timing involved."""
    pending = []
    acquire = search.JournalLock.acquire

    def acquire_and_send(lock):
        acquire(lock)
        if pending and threading.current_thread() is threading.main_thread():  # not a heartbeat's write
            os.kill(os.getpid(), pending.pop())
        return True

    monkeypatch.setattr(search.JournalLock, "acquire", acquire_and_send)
    return pending


def lock_is_free(journal) -> bool:
    """Whether no process holds the lock of ``journal`` (asked without waiting)."""
    with open(search.JournalLock(journal).path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_inside_a_journal_write_is_raised_once_the_write_is_done(tmp_path, monkeypatch, signum,
                                                                         search_signal_handlers):
    journal = tmp_path / "journal.log"
    trial = optuna.create_study(storage=search.HeartbeatJournalStorage(journal, 1, 600), study_name="s").ask()
    signals_sent_inside_the_journal_lock(monkeypatch).append(signum)
    with pytest.raises(interrupts.Interrupted) as err:
        trial.set_user_attr("written", True)
    assert err.value.signum == signum
    # The write completed, and released the lock: a fresh reader sees it, and there is nothing left behind.
    assert search.HeartbeatJournalStorage(journal, 1, 600).get_trial(trial._trial_id).user_attrs == {"written": True}
    assert lock_is_free(journal)
    assert sorted(os.listdir(tmp_path)) == ["journal.log", "journal.log.flock"]


def test_a_worker_signalled_inside_a_storage_write_records_its_trial_interrupted(tmp_path, tiny_folder, monkeypatch,
                                                                               search_signal_handlers):
    # SIGTERM while the worker writes its first evaluation into the study, from inside the journal's lock (where an
    # interrupted clean-up once failed on the lock and recorded that failure instead): the write completes, and the
    # trial records the interruption and is queued again.
    config = search_config(tmp_path, tiny_folder, **{"trainer_settings.max_steps": 4, "trainer_settings.eval_every": 2})
    path = search.study_folder(config) / "search_config.yaml"
    save_config(config, path)
    signals = signals_sent_inside_the_journal_lock(monkeypatch)
    report = search_worker.Worker.report

    def report_under_sigterm(worker, trial, step, last_step, metrics):
        signals.append(signal.SIGTERM)
        report(worker, trial, step, last_step, metrics)

    monkeypatch.setattr(search_worker.Worker, "report", report_under_sigterm)
    assert search_worker.main(["--config", str(path)]) == 128 + signal.SIGTERM
    first, retry = study_of(config).get_trials()
    assert first.state == TrialState.FAIL and first.user_attrs["error"].startswith("interrupted by SIGTERM;")
    assert "eval_step_2" in first.user_attrs  # the write the signal landed in
    assert retry.state == TrialState.WAITING and retry.system_attrs["failed_trial"] == 0
    assert retry.params == first.params
    assert lock_is_free(search.journal_path(config.search_settings, config.manager_settings.output_dir))


HOLD_THE_LOCK = """
import sys
from trainers.search.study import JournalLock
JournalLock(sys.argv[1]).acquire()
with open(sys.argv[1], "ab") as journal:
    journal.write(b'{"op_code": 4, "worker_id": "cut sh')  # a line the kill cuts short
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_process_killed_inside_the_journal_lock_does_not_hold_up_the_next_run(tmp_path, tiny_folder):
    config = search_config(tmp_path, tiny_folder)
    study_of(config).enqueue_trial({"method_settings.merge_ratio": 0.5})
    journal = search.journal_path(config.search_settings, config.manager_settings.output_dir)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(journal)], cwd=PROJECT_ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    assert not lock_is_free(journal)
    holder.kill()  # kill -9 inside the lock, half way through a line
    holder.wait()
    assert lock_is_free(journal)
    # The next run of the study: claims the queued trial and tells its result at once, and the journal stays readable.
    study = study_of(config)
    trial = study.ask()
    trial.suggest_float("method_settings.merge_ratio", 0.4, 0.6)
    study.tell(trial, 0.5)
    (told,) = study_of(config).get_trials()
    assert told.state == TrialState.COMPLETE and told.params == {"method_settings.merge_ratio": 0.5}
    assert journal.read_bytes().endswith(b"\n")


# ----------------------------------------------------------------------------- results
def completed(study, number, values, config, feasible=True):
    attrs = {"constraints:flops_budget": -0.1 if feasible else 0.2}
    study.add_trial(optuna.create_trial(
        values=values, params={"method_settings.merge_ratio": 0.4 + number / 100},
        distributions={"method_settings.merge_ratio": optuna.distributions.FloatDistribution(0.4, 0.6)},
        user_attrs={search.CONFIG_ATTR: config_to_dict(search.trial_config(config, {}, f"t{number}"))},
        system_attrs=attrs))


def test_best_config_respects_the_flops_budget(tmp_path, tiny_folder):
    config = search_config(tmp_path, tiny_folder, **{"search_settings.flops_budget": 0.5})
    study = study_of(config)
    completed(study, 0, [0.6], config)
    completed(study, 1, [0.9], config, feasible=False)  # better but over the budget
    completed(study, 2, [0.7], config)
    (path,) = search.write_results(study, config)
    assert "Best trial #2" in path.read_text()
    best = load_config(path)
    assert best.manager_settings.mode == "train" and not best.search_settings.enable
    assert best.manager_settings.output_dir == str(search.study_folder(config) / "best_run")


def test_two_objectives_write_the_pareto_front(tmp_path, tiny_folder):
    config = search_config(tmp_path, tiny_folder, **{"search_settings.objectives":
                                                     "[{metric: accuracy_hard}, {metric: flops_reduction}]"})
    study = study_of(config)
    for number, values in enumerate([[0.7, 0.5], [0.6, 0.4], [0.5, 0.7], [0.7, 0.6]]):
        completed(study, number, values, config)
    front, *configs = search.write_results(study, config)
    entries = yaml.safe_load(front.read_text())
    assert [e["trial"] for e in entries] == [2, 3]  # 0 and 1 are dominated by 3
    assert entries[1]["values"] == {"accuracy_hard": 0.7, "flops_reduction": 0.6}
    assert [load_config(p).manager_settings.mode for p in configs] == ["train", "train"]


def test_a_study_with_other_objectives_is_not_resumed(tmp_path, tiny_folder):
    study_of(search_config(tmp_path, tiny_folder))
    other = search_config(tmp_path, tiny_folder, **{"search_settings.objectives": "[{metric: accuracy_soft}]"})
    with pytest.raises(search.SearchError, match="choose another search_settings.study_name"):
        study_of(other)


# ----------------------------------------------------------------------------- whole studies
@pytest.mark.slow
def test_two_workers_on_gpu_subsets_finish_resume_and_write_a_best_config_that_runs(tmp_path, tiny_folder, capsys):
    # Four fake GPUs, two per subtask: two workers, told apart by CUDA_VISIBLE_DEVICES (they train on the CPU).
    config = search_config(tmp_path, tiny_folder, **{"manager_settings.available_gpus": [0, 1, 2, 3],
                                                     "manager_settings.gpus_per_subtask": 2})
    study = study_of(config)
    study.enqueue_trial({"method_settings.merge_ratio": 1.5})  # its config is invalid: the trial raises
    assert run_search(config) == 0
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert "merge_ratio: 1.5 is out of range" in trials[0].user_attrs["error"]
    assert (search.trial_folder(config, 0) / "error.txt").exists()
    folder = search.study_folder(config)
    worker_logs = sorted((folder / "workers").glob("worker_*.log"))
    assert ["CUDA_VISIBLE_DEVICES=0,1" in p.read_text() for p in worker_logs] == [True, False]
    assert ["CUDA_VISIBLE_DEVICES=2,3" in p.read_text() for p in worker_logs] == [False, True]
    assert {t.user_attrs["worker"]["cuda_visible_devices"] for t in trials} <= {"0,1", "2,3"}
    for trial in trials[1:]:
        out = search.trial_folder(config, trial.number)
        assert load_config(out / "resolved_config.yaml").method_settings.task_loss_weight == pytest.approx(
            trial.params["method_settings.task_loss_weight"])
        assert (out / "checkpoints" / "token_merger_step_4.pt").exists()
        assert any((out / "logs" / "tensorboard").iterdir()) and "[Eval Step 4]" in (out / "logs" / "training.log").read_text()
        assert trial.values == [trial.user_attrs["metrics"]["accuracy_hard"]]
    printed = capsys.readouterr().out
    assert "[Search] 3/3 trials finished (2 complete, 0 pruned, 1 failed), 0 running; best: trial" in printed

    # The same study name again, with a larger budget (and one worker): only the missing trial runs.
    assert run_search(with_overrides(config, **{"search_settings.n_trials": 4, "manager_settings.available_gpus": [0, 1]})) == 0
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3] and trials[3].state == TrialState.COMPLETE
    assert len({t.user_attrs["metrics"]["accuracy_baseline"] for t in trials[1:]}) == 1  # one backbone, one eval set

    best_path = folder / "best_config.yaml"
    top = max(t.values[0] for t in trials[1:])
    assert any(f"Best trial #{t.number} " in best_path.read_text() for t in trials[1:] if t.values[0] == top)
    assert entry.main(["--config", str(best_path)]) == 0
    assert (folder / "best_run" / "checkpoints" / "training_state_step_4.pt").exists()


def wait_for_running_trial(study, searching):
    """A trial that has started training (its worker is recorded and its config, written once all its parameters
    are drawn: they are suggested one by one), polled for as long as ``searching()`` says the search runs: no
    deadline, so a busy machine only makes it slower."""
    while searching():
        running = [t for t in study.get_trials() if t.state == TrialState.RUNNING and "worker" in t.user_attrs
                   and search.CONFIG_ATTR in t.user_attrs]
        if running:
            return running[0]
        time.sleep(0.05)
    raise AssertionError("the search ended before any trial was seen running")


@pytest.mark.slow
def test_a_killed_worker_s_trial_is_failed_and_run_again(tmp_path, tiny_folder):
    # 32 steps, so that the trial seen running is still training when the kill lands (with 8 it could finish first);
    # the retry must finish, so no endless trial here, unlike the Ctrl-C test
    config = search_config(tmp_path, tiny_folder, **{"search_settings.n_trials": 2, "trainer_settings.max_steps": 32,
                                                     "trainer_settings.dl_settings.epochs": 4,
                                                     "trainer_settings.eval_every": 32})
    study = study_of(config)
    result = {}
    manager = threading.Thread(target=lambda: result.update(code=run_search(config)))
    manager.start()
    victim = wait_for_running_trial(study, manager.is_alive)
    os.kill(victim.user_attrs["worker"]["pid"], signal.SIGKILL)
    manager.join()
    assert result["code"] == 0  # the manager restarted the worker and the study finished
    trials = study.get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert trials[victim.number].state == TrialState.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert search.progress_of(trials).finished == 2
    others = [t.params for t in trials if t.number not in (victim.number, retry.number)]
    assert others and victim.params not in others  # fresh trials draw fresh parameters


def interrupt_a_search(tmp_path, tiny_folder, signum: int, whole_group: bool) -> None:
    """Start a search, send ``signum`` to its manager (``whole_group``: to its workers too, as a terminal's Ctrl-C
    does) once a trial runs, and check that the search stops with 128 + signum, that trial recorded interrupted by
    that signal and queued again, and no trial left RUNNING."""
    # Trials that cannot finish before the signal, however fast the machine: only the signal ends the one seen
    # running (with 8 steps it could complete between being seen and the signal, and the test failed on a fast run).
    config = search_config(tmp_path, tiny_folder, **{"trainer_settings.dl_settings.epochs": 1_000_000,
                                                     "trainer_settings.max_steps": "null", "trainer_settings.eval_every": 8})
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    study = study_of(config)
    # Its own process group, like a terminal's foreground job. SIGINT at its default too, as in a terminal: a
    # background job of a non-interactive shell (a CI script) ignores SIGINT, and a child would inherit that.
    process = subprocess.Popen([sys.executable, "main.py", "--config", str(path)], cwd=PROJECT_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    victim = wait_for_running_trial(study, lambda: process.poll() is None)
    if whole_group:
        os.killpg(process.pid, signum)
    else:
        os.kill(process.pid, signum)
    out, _ = process.communicate()
    assert process.returncode == 128 + signum, out
    trials = study.get_trials()
    assert trials[victim.number].state == TrialState.FAIL
    assert trials[victim.number].user_attrs["error"].startswith(f"interrupted by {interrupts.describe(signum)};")
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert [t.system_attrs["failed_trial"] for t in queued] == [victim.number]
    assert not [t for t in trials if t.state == TrialState.RUNNING]


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_queues_the_running_trial(tmp_path, tiny_folder):
    interrupt_a_search(tmp_path, tiny_folder, signal.SIGINT, whole_group=True)  # the terminal's foreground group


@pytest.mark.slow
def test_sigterm_to_the_manager_stops_the_search_as_ctrl_c_does(tmp_path, tiny_folder):
    interrupt_a_search(tmp_path, tiny_folder, signal.SIGTERM, whole_group=False)  # kill <pid>: it forwards SIGTERM


def test_main_refuses_what_optuna_mode_does_not_take(tmp_path, tiny_folder, capsys, monkeypatch):
    config = search_config(tmp_path, tiny_folder)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    assert entry.main(["--config", str(path), "--resume", "auto"]) == 2
    assert "running the same search_settings.study_name again resumes the study" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert entry.main(["--config", str(path)]) == 2
    assert "not accelerate launch or torchrun" in capsys.readouterr().err


@pytest.mark.slow
def test_workers_die_with_a_killed_manager(tmp_path, tiny_folder):
    config = search_config(tmp_path, tiny_folder, **{"trainer_settings.max_steps": 200, "trainer_settings.eval_every": 200,
                                                     "data_settings.synthetic_train_size": 800})
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    study = study_of(config)
    process = subprocess.Popen([sys.executable, "main.py", "--config", str(path)], cwd=PROJECT_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    victim = wait_for_running_trial(study, lambda: process.poll() is None)
    worker = victim.user_attrs["worker"]["pid"]
    process.kill()  # kill -9: the manager cannot stop its workers itself
    process.wait()
    assert gone_within(worker, 600), f"worker {worker} still runs 10 minutes after its manager was killed"


def gone_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` (not a child of this one) exits within ``seconds``: woken by its exit through a pidfd,
    not polled. The bound only turns a worker that would never die into a failure instead of a hung suite; a worker
    that dies does so in well under a second (SIGTERM from the kernel when its manager dies)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], seconds)[0])
    finally:
        os.close(fd)


def test_a_ctrl_c_that_python_swallowed_does_not_leave_the_worker_deaf_to_the_next():
    previous = signal.signal(signal.SIGINT, interrupts.interrupt)
    try:
        try:  # where Python swallows it: a weakref callback, a destructor ("Exception ignored in ...")
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode; the sleep only gives the signal time to arrive
        except KeyboardInterrupt:
            pass
        assert signal.getsignal(signal.SIGINT) is interrupts.interrupt
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGINT, previous)
