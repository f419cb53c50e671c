"""The Optuna study of a search: storage, search space, trial configs, progress and results.

Storage (``search_settings.storage``):

- ``null`` (default): Optuna's ``JournalStorage`` on the file ``<output_dir>/optuna/journal.log``.
  Every change is appended under a file lock (:class:`JournalLock`, which a killed process does
  not leave behind), so any number of processes on one machine can share it;
  ``optuna-dashboard outputs/optuna/journal.log`` reads it.
- a database URL (``postgresql://user:password@host/db``, ``mysql://...``, ``sqlite:///file.db``):
  Optuna's ``RDBStorage``, for workers on several machines.

Dead workers: a running trial writes a heartbeat every ``heartbeat_interval`` seconds. A
RUNNING trial whose last heartbeat is older than ``grace_period`` belongs to a dead process;
the next worker that claims a trial marks it FAIL and, up to ``max_retry`` times, queues it
again with the same parameters (Optuna's ``RetryHeartbeatStaleTrialCallback``). ``RDBStorage``
has heartbeats built in; Optuna 5.0's ``JournalStorage`` does not, so
:class:`HeartbeatJournalStorage` adds them, keeping the heartbeat as a trial system attribute.

Signals: every storage call runs whole, with SIGINT and SIGTERM held until it returns
(trainers/search/interrupts.py), so a Ctrl-C writes a trial's state completely or not at all.

Folders: ``<output_dir>/optuna/<study_name>/`` holds one ``trial_NNNN/`` per trial (resolved
config, logs, TensorBoard, checkpoints, ``error.txt`` when it failed), the manager's
``search.log``, each worker's output in ``workers/``, and the results: ``best_config.yaml``
(one objective) or ``pareto_front.yaml`` with ``pareto/trial_NNNN.yaml`` (several), each a
config that ``python main.py --config`` runs as is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
# Optuna's private pieces this module relies on, each checked against Optuna 5.0.0 (requirements pin >=5,<6):
# the heartbeat interface RDBStorage implements and the journal's lock interface (neither re-exported), and the
# storage id of a trial (trial_id).
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import BaseJournalFileLock
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from configs.schema import Config, SearchParam, SearchSettings, apply_search_params
from trainers.search.interrupts import deferred_interrupts, describe, interrupt_safe

HEARTBEAT_ATTR = "heartbeat"
CONFIG_ATTR = "config"  # the trial's resolved config, so that any machine can write the best one out
optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# Workers claim trials with ask/tell (to count the study under a lock) and run the heartbeat themselves.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


class SearchError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- storage
class JournalLock(BaseJournalFileLock):
    """The journal's write lock: an flock on ``<journal>.flock``, which the kernel drops when its holder exits, even
    by kill -9 (always possible inside the lock). Optuna's default lock is a symlink made, then renamed away: a process
    killed inside it leaves it behind, and every later write waits 30 s before breaking it. Taking this lock also
    drops the part of a line such a process may have written last (readers apply whole lines only, and a line
    appended after it would make the journal unreadable)."""

    def __init__(self, journal: str | Path):
        self.journal = Path(journal)
        self.path = Path(f"{journal}.flock")
        self._fd: int | None = None

    def acquire(self) -> bool:
        if self._fd is not None:  # a hold an exception cut off before its release (the storage writes one at a time)
            self.release()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            drop_torn_line(self.journal)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        os.close(fd)  # which drops the flock


def drop_torn_line(journal: Path) -> None:
    """Cut the journal back to its last whole line (under the lock: no writer is half way)."""
    with open(journal, "rb+") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.seek(0)
            f.truncate(f.read().rfind(b"\n") + 1)


@interrupt_safe
class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal file with Optuna's heartbeat protocol: stale RUNNING trials are failed and retried."""

    def __init__(self, path: str | Path, heartbeat_interval: int, grace_period: int, stale_trial_callback=None):
        super().__init__(JournalFileBackend(str(path), lock_obj=JournalLock(path)))
        self.path = Path(path)
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            # A retried trial carries its predecessor's heartbeat: it is alive from the moment it started.
            started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
            if now - max(trial.system_attrs.get(HEARTBEAT_ATTR, 0.0), started) > self.grace_period:
                stale.append(storage_id(trial))
        return stale

    def get_heartbeat_interval(self) -> int:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self.stale_trial_callback


@interrupt_safe
class InterruptSafeRDBStorage(RDBStorage):
    """Optuna's RDBStorage, each call run whole (trainers/search/interrupts.py)."""


# The module SQLAlchemy imports for a URL -> the pip package that provides it (SQLAlchemy 2.x maps postgresql:// to
# psycopg 3 and mysql:// to mysqlclient).
DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
                   "pymysql": "PyMySQL"}


def sqlalchemy_version() -> str:
    import sqlalchemy

    return sqlalchemy.__version__


def storage_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The trial's id in its storage (what storages and heartbeats take), which Optuna keeps private as
    ``_trial_id`` on both Trial and FrozenTrial (checked against Optuna 5.0.0)."""
    return trial._trial_id


def study_folder(config: Config) -> Path:
    return Path(config.manager_settings.output_dir) / "optuna" / config.search_settings.study_name


def storage_label(settings: SearchSettings, output_dir: str | Path) -> str:
    """Where the study lives, for messages (database passwords hidden)."""
    if settings.storage and "://" in settings.storage:
        return make_url(settings.storage).render_as_string(hide_password=True)
    return str(journal_path(settings, output_dir))


def journal_path(settings: SearchSettings, output_dir: str | Path) -> Path:
    return Path(settings.storage) if settings.storage else Path(output_dir) / "optuna" / "journal.log"


def open_storage(settings: SearchSettings, output_dir: str | Path):
    """The study's storage with heartbeats and retries of dead trials (module docstring)."""
    retry = RetryHeartbeatStaleTrialCallback(max_retry=settings.max_retry)
    if settings.storage and "://" in settings.storage:
        where = storage_label(settings, output_dir)
        try:
            return InterruptSafeRDBStorage(settings.storage, heartbeat_interval=settings.heartbeat_interval,
                                           grace_period=settings.grace_period, heartbeat_stale_trial_callback=retry)
        except ImportError as err:  # Optuna wraps SQLAlchemy's ModuleNotFoundError for the driver
            missing = err
            while missing is not None and not isinstance(missing, ModuleNotFoundError):
                missing = missing.__cause__ or missing.__context__
            if missing is None:
                raise SearchError(f"search_settings.storage {where}: {err}") from err
            package = DRIVER_PACKAGES.get(missing.name or "", missing.name)
            raise SearchError(f"search_settings.storage {where}: its database driver {missing.name!r} is not installed "
                              f"(SQLAlchemy {sqlalchemy_version()} picks it for this URL); install it: pip install "
                              f"'{package}', or name the driver you have in the URL (postgresql+psycopg2://... with "
                              "pip install psycopg2-binary)") from err
        except Exception as err:  # sqlalchemy's connection errors: say which database and what failed
            raise SearchError(f"search_settings.storage {where}: cannot open the database "
                              f"({err.__class__.__name__}: {str(err).splitlines()[0]}); check the URL, the server "
                              "and the credentials") from err
    path = journal_path(settings, output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    return HeartbeatJournalStorage(path, settings.heartbeat_interval, settings.grace_period, retry)


# ----------------------------------------------------------------------------- the study
def make_sampler(settings: SearchSettings, seed: int) -> optuna.samplers.BaseSampler:
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(settings: SearchSettings) -> optuna.pruners.BasePruner:
    if settings.pruner == "none" or len(settings.objectives) > 1:  # Optuna reports one value per step
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=settings.pruner_startup_trials,
                                       n_warmup_steps=settings.pruner_warmup_steps)


def claim_seed(seed: int, started: int) -> int:
    """The sampler's seed for the claim made when ``started`` trials of the study had started (run or finished).

    Every claim starts one more trial (a queued one or a new one), so under the claim lock each
    gets its own seed: workers that shared one seed would propose the same parameters, and a
    resumed study would repeat its first trials.
    """
    return (seed * 1_000_003 + started) % 2**32


def open_study(config: Config, storage) -> optuna.Study:
    """Create the study, or load it under the same name (a re-run resumes it)."""
    s = config.search_settings
    study = optuna.create_study(study_name=s.study_name, storage=storage,
                                directions=[o.direction for o in s.objectives],
                                sampler=make_sampler(s, config.manager_settings.seed), pruner=make_pruner(s),
                                load_if_exists=True)
    objectives = [[o.metric, o.direction] for o in s.objectives]
    recorded = study.user_attrs.get("objectives")
    if recorded is None:
        study.set_user_attr("objectives", objectives)
        study.set_user_attr("flops_budget", s.flops_budget)
    elif recorded != objectives:
        raise SearchError(f"study {s.study_name!r} optimises {recorded}, but this config asks for {objectives}; "
                          "choose another search_settings.study_name, or use the objectives the study was made with")
    return study


@contextlib.contextmanager
def claim_lock(folder: Path):
    """One worker of this machine at a time counts the study and claims a trial, so none runs beyond n_trials."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "claim.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Heartbeat:
    """A thread that records the trial's heartbeat every ``interval`` seconds while the trial runs."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.storage.record_heartbeat(self.trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # taken for dead and failed by another worker: its retry runs elsewhere
            self._stop.wait(self.interval)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def interrupted(signum: int) -> str:
    """The error recorded for a trial stopped by signal ``signum``."""
    return f"interrupted by {describe(signum)}; queued to run again on the next run of the study"


def fail_and_queue_again(study: optuna.Study, storage, trial_id: int, error: str, max_retry: int) -> bool:
    """Record a RUNNING trial FAIL with ``error`` and queue it again with the same parameters (at most ``max_retry``
    times), as the heartbeat check does for a dead worker's trial; all of it or nothing, whatever signal comes. False
    when the trial had finished already."""
    with deferred_interrupts():
        try:
            storage.set_trial_user_attr(trial_id, "error", error)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        RetryHeartbeatStaleTrialCallback(max_retry)(study, storage.get_trial(trial_id))
        return True


# ----------------------------------------------------------------------------- the search space
def choice_label(choice: Any) -> Any:
    """Optuna's categorical choices are scalars; a list choice (pruning layers) is stored as its YAML text."""
    if choice is None or isinstance(choice, (bool, int, float, str)):
        return choice
    return yaml.safe_dump(choice, default_flow_style=True).strip()


def suggest(trial: optuna.Trial, space: dict[str, SearchParam]) -> dict[str, Any]:
    """The trial's value for every key of the search space (a retried trial gets its predecessor's)."""
    values = {}
    for key, p in space.items():
        if p.type == "float":
            values[key] = trial.suggest_float(key, p.low, p.high, log=p.log, step=p.step)
        elif p.type == "int":
            values[key] = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            labels = [choice_label(c) for c in p.choices]
            values[key] = p.choices[labels.index(trial.suggest_categorical(key, labels))]
    return values


def trial_config(config: Config, params: dict[str, Any], folder: str | Path) -> Config:
    """What one trial runs: the search's config with the trial's values, as one training run into ``folder`` (on the
    GPUs its worker sees)."""
    trial = apply_search_params(config, params)
    manager = dataclasses.replace(trial.manager_settings, mode="train", output_dir=str(folder), available_gpus=[])
    return dataclasses.replace(
        trial, manager_settings=manager,
        search_settings=dataclasses.replace(trial.search_settings, enable=False))


def trial_folder(config: Config, number: int) -> Path:
    return study_folder(config) / f"trial_{number:04d}"


def objective_values(settings: SearchSettings, metrics: dict[str, float]) -> list[float]:
    return [float(metrics[o.metric]) for o in settings.objectives]


def flops_ratio(metrics: dict[str, float]) -> float:
    """Pruned over unpruned LLM prefill FLOPs."""
    return 1.0 - metrics["flops_reduction"]


# ----------------------------------------------------------------------------- progress and results
@dataclass(frozen=True)
class Progress:
    complete: int
    pruned: int
    failed: int  # failed for good: a failure that was queued again is not counted
    retried: int
    running: int
    waiting: int
    total: int  # trials in the storage, whatever their state

    @property
    def finished(self) -> int:
        """Trials that count against n_trials."""
        return self.complete + self.pruned + self.failed


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def progress_of(trials: list[FrozenTrial]) -> Progress:
    count = lambda state: sum(t.state == state for t in trials)
    retried = retried_numbers(trials)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    return Progress(count(TrialState.COMPLETE), count(TrialState.PRUNED),
                    sum(t.number not in retried for t in failed), sum(t.number in retried for t in failed),
                    count(TrialState.RUNNING), count(TrialState.WAITING), len(trials))


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial (one objective) or the Pareto front (several); feasible trials only under a FLOPs budget."""
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: t.number)
    try:
        return [study.best_trial]
    except ValueError:  # nothing complete (or nothing within the budget) yet
        return []


def describe_values(settings: SearchSettings, trial: FrozenTrial) -> str:
    text = ", ".join(f"{o.metric}={v:.4g}" for o, v in zip(settings.objectives, trial.values or []))
    metrics = trial.user_attrs.get("metrics", {})
    if settings.flops_budget is not None and "flops_reduction" in metrics:
        text += f" (FLOPs {flops_ratio(metrics):.1%} of unpruned, budget {settings.flops_budget:.0%})"
    return text


def ready_to_run(trial: FrozenTrial, output_dir: Path) -> dict:
    """A trial's resolved config as a plain training run into ``output_dir``."""
    data = dict(trial.user_attrs[CONFIG_ATTR])
    data["manager_settings"] = {**data["manager_settings"], "mode": "train", "output_dir": str(output_dir)}
    data["search_settings"] = {**data["search_settings"], "enable": False}
    return data


def write_config(data: dict, path: Path, header: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    path.write_text(comment + yaml.safe_dump(data, sort_keys=False))


def write_results(study: optuna.Study, config: Config) -> list[Path]:
    """best_config.yaml (one objective) or pareto_front.yaml + pareto/trial_NNNN.yaml (several); the paths written."""
    settings, folder = config.search_settings, study_folder(config)
    best = [t for t in best_trials(study) if CONFIG_ATTR in t.user_attrs]
    if not best:
        return []
    if len(settings.objectives) == 1:
        trial = best[0]
        path = folder / "best_config.yaml"
        write_config(ready_to_run(trial, folder / "best_run"), path,
                     f"Best trial #{trial.number} of study {settings.study_name!r}: "
                     f"{describe_values(settings, trial)}\nparams: {trial.params}\n"
                     f"Run it: python main.py --config {path}")
        return [path]
    front = []
    for trial in best:
        path = folder / "pareto" / f"trial_{trial.number:04d}.yaml"
        write_config(ready_to_run(trial, folder / "pareto" / f"run_{trial.number:04d}"), path,
                     f"Pareto-optimal trial #{trial.number} of study {settings.study_name!r}: "
                     f"{describe_values(settings, trial)}\nRun it: python main.py --config {path}")
        front.append({"trial": trial.number,
                      "values": {o.metric: v for o, v in zip(settings.objectives, trial.values)},
                      "params": trial.params, "config": str(path)})
    path = folder / "pareto_front.yaml"
    path.write_text(yaml.safe_dump(front, sort_keys=False))
    return [path] + [Path(entry["config"]) for entry in front]
