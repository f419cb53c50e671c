"""A search worker: one process on one GPU subset (or the CPU) that runs trials until the study is done.

    python -m trainers.search.worker --config outputs/optuna/<study>/search_config.yaml --worker 0

The manager (trainers/search/manager.py) starts one per GPU subset with ``CUDA_VISIBLE_DEVICES`` set,
so the worker's GPUs are cuda:0, cuda:1, ... Each worker loads the backbone and the data (and
evaluates the unpruned baseline) once and then, in a loop: under this machine's claim lock it fails trials whose heartbeat stopped
(queuing them again), counts the study, and claims a trial (a queued retry first); it trains
that trial in its own folder, reporting every evaluation for pruning, and tells the study the
result. A trial that raises is recorded FAIL with its error and the worker goes on. SIGINT (Ctrl-C)
or SIGTERM, whatever the worker is doing when it comes, records its trial FAIL ("interrupted by
..."), queues it again for the next run, and stops the worker (exit code 128 + the signal's number).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
import traceback

import optuna
import torch
from optuna.trial import TrialState

from configs.schema import Config, config_to_dict, load_config, save_config
from trainers.run_log import RunLog
from trainers.search import interrupts
from trainers.search import study as search
from trainers.training.world import BackboneAndData, load_world, make_trainer

IDLE_POLL_S = 2.0  # how often an idle worker looks for retries while the last trials run elsewhere


class Worker:
    def __init__(self, config: Config, index: int):
        self.config, self.index = config, index
        self.settings = config.search_settings
        self.folder = search.study_folder(config)
        self.storage = search.open_storage(self.settings, config.manager_settings.output_dir)
        self.study = search.open_study(config, self.storage)
        self.world: BackboneAndData | None = None
        self.world_key = None
        self.accuracy_baseline: float | None = None  # the frozen backbone's, on the world's eval set
        self.claimed: optuna.Trial | None = None  # claimed and not yet told: what an interrupt records

    def say(self, message: str) -> None:
        print(f"[worker {self.index}] {message}", flush=True)

    # ------------------------------------------------------------------ claiming
    def claim(self) -> optuna.Trial | None | bool:
        """A trial to run, None to wait (the last trials run elsewhere), False when the study is done. A signal does
        not cut a claim: the trial is asked for, beating, marked this worker's and ``claimed``, or not asked for."""
        with search.claim_lock(self.folder), interrupts.deferred_interrupts():
            optuna.storages.fail_stale_trials(self.study)
            progress = search.progress_of(self.study.get_trials(deepcopy=False))
            if progress.finished >= self.settings.n_trials:
                return False
            if progress.waiting == 0 and progress.finished + progress.running >= self.settings.n_trials:
                return None
            self.study.sampler = search.make_sampler(
                self.settings, search.claim_seed(self.config.manager_settings.seed, progress.total - progress.waiting))
            self.claimed = trial = self.study.ask()
            self.storage.record_heartbeat(search.storage_id(trial))  # alive from the claim on
            # whose it is, so that the manager can record it if this worker is stopped before it does
            trial.set_user_attr("worker", {"index": self.index, "host": socket.gethostname(), "pid": os.getpid(),
                                           "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")})
            return trial

    def run(self) -> int:
        """Run trials until the study is done (0). On SIGINT or SIGTERM, record the claimed trial interrupted, queue
        it again, and re-raise."""
        self.say(f"pid {os.getpid()}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}")
        try:
            while True:
                trial = self.claim()
                if trial is False:
                    self.say("study complete")
                    return 0
                if trial is None:
                    time.sleep(IDLE_POLL_S)
                    continue
                self.run_trial(trial)
        except KeyboardInterrupt as err:
            # Later signals (the manager forwards one) must not cut the record short. One that lands before these
            # lines still can: the manager then records the trial the same way once this worker has exited.
            for signum in interrupts.STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
            self.record_interrupted(interrupts.signal_of(err))
            raise

    def record_interrupted(self, signum: int) -> None:
        if self.claimed is not None and search.fail_and_queue_again(
                self.study, self.storage, search.storage_id(self.claimed), search.interrupted(signum),
                self.settings.max_retry):
            self.say(f"trial {self.claimed.number} FAIL: interrupted by {interrupts.describe(signum)}, queued again")

    # ------------------------------------------------------------------ one trial
    def world_for(self, config: Config, log: RunLog) -> BackboneAndData:
        """The backbone and data, loaded once and kept while the trials' backbone and data settings agree."""
        key = (config.backbone_settings, repr(config.data_settings), config.manager_settings.gpus_per_subtask)
        if self.world is None or key != self.world_key:
            self.world, self.world_key = load_world(config, log), key
            self.accuracy_baseline = None
        return self.world

    def report(self, trial: optuna.Trial, step: int, last_step: int, metrics: dict[str, float]) -> None:
        """Intermediate results: every evaluation's metrics, and the objective for pruning (one objective).

        The last evaluation is the trial's result, so a trial that got there completes."""
        trial.set_user_attr(f"eval_step_{step}", {k: float(v) for k, v in metrics.items()})
        if len(self.settings.objectives) == 1:
            trial.report(float(metrics[self.settings.objectives[0].metric]), step)
            if step < last_step and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}")

    def run_trial(self, trial: optuna.Trial) -> None:
        folder = search.trial_folder(self.config, trial.number)
        retry_of = self.storage.get_trial(search.storage_id(trial)).system_attrs.get("failed_trial")
        self.say(f"trial {trial.number} starts" + (f" (retry of trial {retry_of})" if retry_of is not None else ""))
        trial.set_user_attr("folder", str(folder))
        started = time.time()
        log = None
        with search.Heartbeat(self.storage, search.storage_id(trial), self.settings.heartbeat_interval):
            try:
                config = search.trial_config(self.config, search.suggest(trial, self.settings.search_space), folder)
                trial.set_user_attr(search.CONFIG_ATTR, config_to_dict(config))
                save_config(config, folder / "resolved_config.yaml")
                log = RunLog(folder / "logs" / "training.log", echo=False)
                world = self.world_for(config, log)
                torch.manual_seed(config.manager_settings.seed)
                trainer = make_trainer(config, world, log, folder)
                trainer.accuracy_baseline = self.accuracy_baseline  # evaluated once per worker, not once per trial
                metrics = trainer.train(on_eval=lambda step, m: self.report(trial, step, trainer.total_steps, m))
                self.accuracy_baseline = trainer.accuracy_baseline
                trial.set_user_attr("metrics", {k: float(v) for k, v in metrics.items()})
                if self.settings.flops_budget is not None:
                    trial.set_constraint("flops_budget", search.flops_ratio(metrics) - self.settings.flops_budget)
                self.finish(trial, TrialState.COMPLETE, search.objective_values(self.settings, metrics))
            except optuna.TrialPruned as err:
                self.finish(trial, TrialState.PRUNED, message=str(err))
            except Exception as err:
                text = traceback.format_exc()
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "error.txt").write_text(text)
                if log is not None:
                    log.block(text)
                trial.set_user_attr("error", f"{err.__class__.__name__}: {err}")
                self.finish(trial, TrialState.FAIL, message=f"{err.__class__.__name__}: {err} (see {folder / 'error.txt'})")
            finally:
                if log is not None:
                    log.close()
        self.say(f"trial {trial.number} took {time.time() - started:.1f} s")

    def finish(self, trial: optuna.Trial, state: TrialState, values: list[float] | None = None,
               message: str = "") -> None:
        with interrupts.deferred_interrupts():  # told and forgotten together: an interrupt then has nothing to record
            try:
                self.study.tell(trial, values, state=state)
            except optuna.exceptions.UpdateFinishedTrialError:
                self.claimed = None
                self.say(f"trial {trial.number} was taken for dead (no heartbeat for {self.settings.grace_period} s) "
                         "and queued again; this result is dropped")
                return
            self.claimed = None
        self.say(f"trial {trial.number} {state.name}" + (f": {values}" if values else "") + (f" {message}" if message else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One worker of an Optuna search (started by main.py's optuna mode).")
    parser.add_argument("--config", required=True, help="the study's search_config.yaml")
    parser.add_argument("--worker", type=int, default=0, help="this worker's index (for logs)")
    args = parser.parse_args(argv)
    for signum in interrupts.STOP_SIGNALS:
        signal.signal(signum, interrupts.interrupt)
    try:
        return Worker(load_config(args.config), args.worker).run()
    except KeyboardInterrupt as err:
        signum = interrupts.signal_of(err)
        print(f"[worker {args.worker}] stopped by {interrupts.describe(signum)}", flush=True)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
