"""Two-stage vision token pruning for LLaVA: the entry point.

    python main.py                                  # configs/vision_token_pruning.yaml (GPU, llava-1.5-7b)
    python main.py --config configs/tiny.yaml       # the embedded CPU default, no download
    python main.py --config configs/tiny.yaml --set trainer_settings.dl_settings.batch_size=8
    python main.py --config configs/tiny.yaml --resume auto    # continue the run in output_dir
    python main.py --config configs/tiny.yaml --set manager_settings.mode=optuna --set search_settings.enable=true
    accelerate launch --num_processes 8 main.py --config configs/llava_1_5_7b_665k.yaml   # data parallel (or torchrun)

CLI -> config (validated, every problem at once) -> checks against the backbone's shape
(before any weight loads) -> run mode: train, eval, or optuna (trainers/search/manager.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no machine this runs on may download: fail fast, never hang

import torch  # noqa: E402

from configs.schema import (ConfigError, Config, batch_split_problem, check_against_backbone,  # noqa: E402
                            check_devices, load_config, save_config, tracker_problems)
from data.instruction_json import BadSampleError  # noqa: E402
from models.backbones import read_backbone_shape  # noqa: E402
from models.llava_backbone import BackboneNotFoundError, BackboneShape  # noqa: E402
from trainers.checkpoint import CheckpointError, Checkpointer, remove_stale  # noqa: E402
from trainers.run_log import RunLog  # noqa: E402
from trainers.search.manager import run_search  # noqa: E402
from trainers.training.distributed import (finish, is_main_launch_process, join_processes,  # noqa: E402
                                          launched_processes, tracker_installed)
from trainers.training.metrics_log import summary  # noqa: E402
from trainers.training.preflight import PreflightError, check_backbone_folder, check_output_dir, load_data, resume_state  # noqa: E402
from trainers.training.run_lock import FolderInUseError, hold_output_dir, sign  # noqa: E402
from trainers.training.signals import TrainingInterrupted  # noqa: E402
from trainers.training.trainer import NonFiniteLossError  # noqa: E402
from trainers.training.world import load_world, make_trainer  # noqa: E402

DEFAULT_CONFIG = "configs/vision_token_pruning.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train learned vision-token pruning (token merger + layer pruners + discriminator) on a "
                    "frozen LLaVA backbone.",
        epilog="docs/configuration.md lists every key.",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument("--resume", metavar="PATH|auto",
                        help="continue from a training_state_step_N.pt, or 'auto' for the latest in output_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="dotted.key=value",
                        help="override one key, typed as in YAML (repeatable), e.g. --set method_settings.merge_ratio=0.4")
    return parser.parse_args(argv)


def prepare(config: Config, config_path: str) -> BackboneShape:
    """Every check of the config that needs no weights: the backbone's files and shape, and the devices."""
    check_backbone_folder(config.backbone_settings.name_or_path)
    shape = read_backbone_shape(config.backbone_settings.name_or_path, config.data_settings.max_vision_tokens,
                                config.data_settings.image_max_size)
    problems = check_against_backbone(config, shape.num_layers, shape.num_vision_tokens, shape.image_size)
    cuda = torch.cuda.is_available()
    problems += check_devices(config, cuda, torch.cuda.device_count() if cuda else None)
    problems += tracker_problems(config.trainer_settings.report_to, tracker_installed)
    if problems:
        raise ConfigError(problems, config_path)
    split = batch_split_problem(config, launched_processes())  # the launch against the config: one line
    if split:
        raise ValueError(split)
    return shape


def run(config: Config, log: RunLog, resume: tuple[Path, dict] | None, out: Path, data,
        processes=None) -> dict[str, float]:
    world = load_world(config, log, data, processes)
    trainer = make_trainer(config, world, log, out)
    if resume is not None:
        trainer.load_training_state(*resume)
    if config.manager_settings.mode == "eval":
        metrics = trainer.evaluate()
        trainer.log_eval(metrics)
        log.block(summary(metrics))
        trainer.close(metrics)
        return metrics
    return trainer.train(handle_signals=True)


def saved_state(out: Path) -> str:
    """Where a stopped run continues from, for its last line."""
    latest = Checkpointer(out / "checkpoints", keep_last=1).latest()
    return (f"the last saved state is {latest} (continue with --resume auto)" if latest is not None
            else "no training state was saved yet")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        shape = prepare(config, args.config)
        out = Path(config.manager_settings.output_dir)
        mode = config.manager_settings.mode
        if launched_processes() > 1 and mode != "train":
            raise ValueError(f"manager_settings.mode {mode!r} runs as one process (the optuna manager starts its own "
                             "workers); start it with python main.py, not accelerate launch or torchrun")
        if mode == "optuna":
            if args.resume is not None:
                raise ValueError("--resume does not apply to optuna mode: running the same search_settings.study_name "
                                 "again resumes the study")
            return run_search(config)
        # Everything that can fail on the user's input is checked here, before the weights load and before
        # anything is written into output_dir. A folder another run is using is refused first.
        check_output_dir(out)
        lock = hold_output_dir(out) if out.is_dir() and is_main_launch_process() else None
        resume = resume_state(args.resume, out, config, fresh_allowed=mode == "eval")
        data = load_data(config, shape.num_vision_tokens, shape.max_positions)
        if lock is None and is_main_launch_process():
            lock = hold_output_dir(out)  # creates the folder: two runs that started together, one gets it
    except (ConfigError, BackboneNotFoundError, PreflightError, BadSampleError, FolderInUseError, ValueError) as err:
        if is_main_launch_process():  # every process finds the same problem: one of them says it
            print(f"error: {err}", file=sys.stderr)
        return 2  # under a launcher, the main process's exit stops the others
    if lock is not None:
        sign(lock)
    stale = remove_stale(out) if lock is not None else []
    processes = join_processes()
    torch.manual_seed(config.manager_settings.seed)
    if processes.is_main_process:  # an evaluation writes its own config: the run's resolved_config.yaml stays the run's
        save_config(config, out / ("eval_config.yaml" if config.manager_settings.mode == "eval" else "resolved_config.yaml"))
    log = RunLog(out / "logs" / "training.log" if processes.is_main_process else None, echo=processes.is_main_process)
    if stale:
        log.info(f"Removed what an interrupted save left in {out}: {', '.join(stale)}")
    try:
        run(config, log, resume, out, data, processes)
        finish()
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:  # SIGTERM or Ctrl-C: the state at the current step is saved (logged)
        return err.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C: at once
        print(f"error: interrupted; {saved_state(out)}", file=sys.stderr)
        return 130
    except BadSampleError as err:  # an image found broken only when read in full, under on_bad_sample: error
        print(f"error: {err}; {saved_state(out)}", file=sys.stderr)
        return 2
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except torch.cuda.OutOfMemoryError as err:
        batch = config.trainer_settings.dl_settings.batch_size
        print(f"error: CUDA out of memory ({str(err).splitlines()[0]}). Lower trainer_settings.dl_settings.batch_size "
              f"(now {batch}) or data_settings.eval_batch_size (now {config.data_settings.eval_batch_size}), or set "
              "trainer_settings.gradient_checkpointing: true and trainer_settings.mixed_precision: bf16; resume with "
              "--resume auto", file=sys.stderr)
        return 1
    finally:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
