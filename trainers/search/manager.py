"""The search manager: worker processes on GPU subsets, all pulling trials from one Optuna study.

``python main.py`` with ``manager_settings.mode: optuna`` calls :func:`run_search`, which

1. creates the study (or loads it: a re-run with the same ``study_name`` resumes it) and writes
   the config the workers read (``search_config.yaml`` in the study's folder);
2. starts len(available_gpus) / gpus_per_subtask workers (trainers/search/worker.py), worker i
   with ``CUDA_VISIBLE_DEVICES`` set to the i-th block of ``gpus_per_subtask`` GPUs; with no
   GPUs, ``cpu_workers`` workers with no GPU visible;
3. shows the progress (trials finished / running / failed, best so far) while they run, and
   restarts a worker that died (its trial is failed and queued again once its heartbeat is
   older than ``grace_period``), at most ``MAX_RESTARTS`` times per worker;
4. on SIGINT (Ctrl-C) or SIGTERM, forwards the signal to its workers, lets each record its
   running trial as FAIL ("interrupted by ...") and queue it for the next run (and records any its
   workers left RUNNING the same way), then stops with exit code 128 + the signal's number; in
   every case it writes the best config (or the Pareto front) at the end.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from configs.schema import Config, save_config
from trainers.run_log import RunLog
from trainers.search import interrupts
from trainers.search import study as search

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MAX_RESTARTS = 3  # per worker: a worker that keeps dying is broken, not unlucky
POLL_S = 1.0
STOP_WAIT_S = 60.0  # after Ctrl-C or SIGTERM, how long workers get to record their trials before they are killed


def gpu_subsets(available_gpus: list[int], gpus_per_subtask: int) -> list[list[int]]:
    """Consecutive blocks of ``gpus_per_subtask`` GPUs, one per worker: [0, 1, 2, 3] x 2 -> [[0, 1], [2, 3]]."""
    return [available_gpus[i:i + gpus_per_subtask] for i in range(0, len(available_gpus), gpus_per_subtask)]


def worker_environments(config: Config, base: dict[str, str]) -> list[dict[str, str]]:
    """The environment of each worker: its own CUDA_VISIBLE_DEVICES (empty: the CPU); progress bars that redraw
    once a minute, since they go to the worker's log file; CPU workers share the cores unless OMP_NUM_THREADS says."""
    mg = config.manager_settings
    visible = ([",".join(str(g) for g in subset) for subset in gpu_subsets(mg.available_gpus, mg.gpus_per_subtask)]
               if mg.available_gpus else [""] * mg.cpu_workers)
    threads = base.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // len(visible)))
    return [{**base, "CUDA_VISIBLE_DEVICES": devices, "TQDM_MININTERVAL": "60", "PYTHONUNBUFFERED": "1",
             "OMP_NUM_THREADS": threads} for devices in visible]


@dataclass
class WorkerProcess:
    index: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None
    restarts: int = 0
    pids: list[int] = field(default_factory=list)  # of every process started for this worker

    @property
    def devices(self) -> str:
        return f"GPUs {self.env['CUDA_VISIBLE_DEVICES']}" if self.env["CUDA_VISIBLE_DEVICES"] else "CPU"

    def start(self, config_path: Path) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "trainers.search.worker", "--config", str(config_path), "--worker",
                 str(self.index)], env=self.env, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent if sys.platform == "linux" else None)
        self.pids.append(self.process.pid)

    def tail(self, lines: int = 5) -> str:
        text = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "\n".join(f"    {line}" for line in text[-lines:])


def die_with_parent() -> None:
    """In a worker, before it runs: Linux sends it SIGTERM when the manager dies, even by kill -9 (which the
    manager cannot catch to stop its workers itself). The worker then records its trial interrupted and queues it."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def short_name(key: str) -> str:
    """A searched key without its section: method_settings.merge_ratio -> merge_ratio, ...optimizers.discriminator.lr
    -> discriminator.lr."""
    return key.split(".", 1)[-1].replace("dl_settings.optimizers.", "")


def exit_reason(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


class Monitor:
    """Progress lines: one per finished trial, one status line whenever the counts change."""

    def __init__(self, config: Config, study: optuna.Study, log: RunLog):
        self.settings, self.study, self.log = config.search_settings, study, log
        self.reported: set[int] = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        self.status = ""

    def update(self) -> search.Progress:
        trials = self.study.get_trials(deepcopy=False)
        retried = search.retried_numbers(trials)
        for trial in trials:
            if trial.state.is_finished() and trial.number not in self.reported:
                self.reported.add(trial.number)
                self.log.info(self.describe(trial, trial.number in retried))
        progress = search.progress_of(trials)
        status = (f"[Search] {progress.finished}/{self.settings.n_trials} trials finished ({progress.complete} "
                  f"complete, {progress.pruned} pruned, {progress.failed} failed"
                  + (f", {progress.retried} retried" if progress.retried else "")
                  + f"), {progress.running} running; {self.best()}")
        if status != self.status:
            self.status = status
            self.log.block(status)
        return progress

    def describe(self, trial: optuna.trial.FrozenTrial, retried: bool) -> str:
        took = (f" in {(trial.datetime_complete - trial.datetime_start).total_seconds():.0f} s"
                if trial.datetime_complete and trial.datetime_start else "")
        if trial.state == TrialState.COMPLETE:
            what = search.describe_values(self.settings, trial)
        elif trial.state == TrialState.FAIL:
            what = trial.user_attrs.get("error", "its worker died") + (" (queued again)" if retried else "")
        else:
            what = f"at step {trial.last_step}" if trial.last_step is not None else ""
        params = ", ".join(f"{short_name(k)}={v:.4g}" if isinstance(v, float) else f"{short_name(k)}={v}"
                           for k, v in trial.params.items())
        return f"Trial {trial.number} {trial.state.name}{took}: {what}" + (f"; {params}" if params else "")

    def best(self) -> str:
        best = search.best_trials(self.study)
        if not best:
            return "no best trial yet"
        if len(self.settings.objectives) > 1:
            return f"Pareto front: trials {[t.number for t in best]}"
        return f"best: trial {best[0].number}, {search.describe_values(self.settings, best[0])}"


def run_search(config: Config) -> int:
    """Run (or resume) the study of ``config`` with this machine's workers; an exit code."""
    folder = search.study_folder(config)
    folder.mkdir(parents=True, exist_ok=True)
    settings, mg = config.search_settings, config.manager_settings
    log = RunLog(folder / "search.log")
    try:
        storage = search.open_storage(settings, mg.output_dir)
        study = search.open_study(config, storage)
        config_path = folder / "search_config.yaml"
        save_config(config, config_path)
        workers = [WorkerProcess(i, env, folder / "workers" / f"worker_{i}.log")
                   for i, env in enumerate(worker_environments(config, dict(os.environ)))]
        log.info(f"Study {settings.study_name!r} in {search.storage_label(settings, mg.output_dir)}: "
                 f"{settings.n_trials} trials, objectives {[(o.metric, o.direction) for o in settings.objectives]}"
                 + (f", FLOPs budget {settings.flops_budget:.0%} of unpruned" if settings.flops_budget else ""))
        log.info(f"Trials and results in {folder}; {len(workers)} worker(s) on "
                 + ", ".join(w.devices for w in workers))
        monitor = Monitor(config, study, log)
        if monitor.update().finished >= settings.n_trials:
            log.info(f"The study already has {settings.n_trials} finished trials; raise search_settings.n_trials to "
                     "run more")
            return finish(study, config, log, 0)
        with interrupts.handled_by(interrupts.interrupt):  # SIGTERM stops the search as Ctrl-C does
            code = supervise(workers, config_path, monitor, log, storage)
            return finish(study, config, log, code)
    except search.SearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        log.close()


def supervise(workers: list[WorkerProcess], config_path: Path, monitor: Monitor, log: RunLog, storage) -> int:
    """Run the workers to the end of the study (restarting dead ones); Ctrl-C or SIGTERM stops them cleanly."""
    for worker in workers:
        worker.start(config_path)
    try:
        while True:
            time.sleep(POLL_S)
            monitor.update()
            for worker in workers:
                code = worker.process.poll()
                if code is None or code == 0:
                    continue
                if worker.restarts < MAX_RESTARTS:
                    worker.restarts += 1
                    log.info(f"worker {worker.index} ({worker.devices}) {exit_reason(code)}; restarting it "
                             f"({worker.restarts}/{MAX_RESTARTS}). Its trial is failed and queued again once its "
                             f"heartbeat is older than grace_period. Last lines of {worker.log_path}:\n{worker.tail()}")
                    worker.start(config_path)
            codes = [w.process.poll() for w in workers]
            if all(c is not None for c in codes):
                break
    except KeyboardInterrupt as err:
        signum = interrupts.signal_of(err)
        log.info(f"{interrupts.describe(signum)}: stopping the workers; running trials are recorded FAIL and queued "
                 "for the next run")
        stop(workers, signum)
        left = queue_left_running(monitor.study, storage, {pid for w in workers for pid in w.pids},
                                  monitor.settings.max_retry, signum)
        if left:
            log.info(f"Trials {left} were left RUNNING by their stopped workers: recorded FAIL and queued again")
        monitor.update()
        return 128 + signum
    monitor.update()
    broken = [w for w in workers if w.process.returncode != 0]
    for worker in broken:
        log.info(f"worker {worker.index} ({worker.devices}) {exit_reason(worker.process.returncode)} "
                 f"{MAX_RESTARTS + 1} times; last lines of {worker.log_path}:\n{worker.tail()}")
    return 1 if broken else 0


def stop(workers: list[WorkerProcess], signum: int) -> None:
    """Signal ``signum`` to every live worker (those in the terminal's process group have Ctrl-C already and ignore
    a second once they record their trial), and wait for them."""
    live = [w.process for w in workers if w.process.poll() is None]
    for process in live:
        process.send_signal(signum)
    deadline = time.time() + STOP_WAIT_S
    for process in live:
        try:
            process.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def queue_left_running(study: optuna.Study, storage, pids: set[int], max_retry: int, signum: int) -> list[int]:
    """Record FAIL (interrupted by ``signum``), and queue again, the RUNNING trials of this machine's workers ``pids``
    once they are stopped: a worker killed after STOP_WAIT_S, or one whose clean-up a second signal cut short, left
    them so. Trials of other machines' workers are theirs. The numbers of the trials recorded."""
    host = socket.gethostname()
    mine = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get("worker", {}).get("host") == host and t.user_attrs["worker"].get("pid") in pids]
    return [t.number for t in mine
            if search.fail_and_queue_again(study, storage, search.storage_id(t), search.interrupted(signum), max_retry)]


def finish(study: optuna.Study, config: Config, log: RunLog, code: int) -> int:
    """Write the best config or the Pareto front, and say where."""
    written = search.write_results(study, config)
    if not written:
        log.info("No trial has completed (within the FLOPs budget) yet: no best config written")
    elif len(config.search_settings.objectives) == 1:
        log.info(f"Best config: {written[0]} (run it: python main.py --config {written[0]})")
    else:
        log.info(f"Pareto front: {written[0]}; each trial's config: {written[0].parent / 'pareto'}")
    return code
