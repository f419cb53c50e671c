"""Every check a run can make before the backbone's weights load, each failing with one line and its fix.

``python main.py`` calls these in order after the config loads: the backbone folder (config,
processor and tokenizer files), the output folder (a folder, writable), the checkpoint to resume
(readable, a training state, trained with a config this run can continue), and the data (every
record and image of the files; every training conversation within the model's positions, a long one
cut to whole turns). Nothing in the output folder is written until all of them have passed, so a run
that fails here changes nothing there.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from tqdm import tqdm
from transformers import AutoConfig
from transformers.utils import cached_file

from configs.schema import Config, config_differences
from data.build import build_datasets, unlabelled_data_problem
from data.collator import adds_special_tokens, render_conversation
from data.instruction_json import SHOWN_PROBLEMS, LlavaInstructionDataset
from models.backbones import backbone_class
from trainers.checkpoint import MODULES, STATE, CheckpointError, Checkpointer, load
from trainers.inference.pruned_model import CONFIG_FILE, saved_meta


class PreflightError(ValueError):
    """A user error found before any weight loads: ``what (where): fix``."""

    def __init__(self, what: str, where: str, fix: str):
        super().__init__(f"{what} ({where}): {fix}")


# ----------------------------------------------------------------------------- backbone files
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def check_backbone_folder(name_or_path: str) -> None:
    """A local backbone folder must hold a config.json and the processor's and tokenizer's files."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return  # a model id: read_backbone_shape looks it up in the local cache and says where it looked
    if not (folder / "config.json").is_file():
        raise PreflightError("the backbone folder has no config.json", str(folder),
                             "point backbone_settings.name_or_path at a folder written by save_pretrained (a llava-hf "
                             "checkpoint), or run the CPU default: python main.py --config configs/tiny.yaml")
    missing = [kind for kind, names in (("image processor", PROCESSOR_FILES), ("tokenizer", TOKENIZER_FILES))
               if not any((folder / name).is_file() for name in names)]
    if missing:
        raise PreflightError(f"the backbone folder has no {' and no '.join(missing)} files", str(folder),
                             "save the processor beside the weights (processor.save_pretrained(folder)), or copy "
                             f"{', '.join(PROCESSOR_FILES + TOKENIZER_FILES[:2])} from the checkpoint you downloaded")


# ----------------------------------------------------------------------------- the output folder
def check_output_dir(out: Path) -> None:
    """``out`` is (or can become) a folder this process can write; nothing is created (a refused run leaves no trace)."""
    if out.exists() and not out.is_dir():
        raise PreflightError("manager_settings.output_dir is a file, not a folder", str(out),
                             "choose another output_dir, or move the file away")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PreflightError("manager_settings.output_dir is not writable", str(existing),
                             "choose an output_dir on a writable disk, or fix the folder's permissions")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise PreflightError(f"cannot write in manager_settings.output_dir ({err.strerror or err})", str(existing),
                             "choose an output_dir on a writable disk with free space") from err


# ----------------------------------------------------------------------------- resuming
# Keys a resumed run must share with the run it continues: the modules and optimizer states it restores (a restored
# optimizer keeps its saved learning rate, so a new one would silently not apply), the batch size its step counts
# and the data and backbone they were trained on. A longer run (epochs, max_steps, a larger synthetic set) and other
# logging, evaluation and checkpoint cadences are allowed.
RESUME_KEYS = ("method_settings", "trainer_settings.dl_settings.batch_size", "trainer_settings.dl_settings.optimizers",
               "trainer_settings.mixed_precision", "backbone_settings.name_or_path", "manager_settings.seed",
               "data_settings.source", "data_settings.train_json", "data_settings.image_folder", "data_settings.seed")


def resume_differences(saved: dict, config: Config) -> list[str]:
    """'key: saved -> now' for every key of RESUME_KEYS on which the checkpoint's config and this one differ."""
    return config_differences(saved, config, RESUME_KEYS)


def resume_state(resume: str | None, out: Path, config: Config,
                 fresh_allowed: bool = False) -> tuple[Path, dict] | None:
    """The training state ``--resume`` names (``auto``: the latest readable step of ``out``), loaded and checked.

    Without ``--resume``, a folder that already holds a run is refused (nothing is overwritten), unless
    ``fresh_allowed`` (eval mode evaluates untrained modules without touching the run's checkpoints)."""
    if resume is None:
        existing = Checkpointer(out / "checkpoints", keep_last=1).latest()
        if existing is not None and not fresh_allowed:
            raise PreflightError(f"the output folder already holds a run (up to {existing.name})", str(out),
                                 "pass --resume auto to continue it, or set manager_settings.output_dir to a new "
                                 "folder (nothing was overwritten)")
        return None
    if resume == "auto":
        path, state = latest_readable(out / "checkpoints")
    elif fresh_allowed and Path(resume).is_dir():  # eval mode: a saved pruned-model folder or another run's folder
        path, state = _eval_source(Path(resume))
    else:
        path = Path(resume)
        if not path.is_file():
            raise PreflightError("no such file", f"--resume {resume}",
                                 "give a training_state_step_N.pt, or --resume auto for the latest in output_dir")
        state = _read_state(path)
    differences = resume_differences(state["config"], config)
    moved = [d for d in differences if d.startswith("backbone_settings.name_or_path:")]
    if moved:
        old, new = state["config"]["backbone_settings"]["name_or_path"], config.backbone_settings.name_or_path
        saved_identity = state.get("backbone_identity")
        if saved_identity is not None and saved_identity == backbone_identity(new):
            differences.remove(moved[0])  # the same backbone in another folder: the run continues on it
        elif not differences[1:] and not Path(old).exists():
            raise PreflightError(f"the checkpoint's backbone folder {old} no longer exists, and {new} is "
                                 + ("not the same backbone (its config.json or weight files differ)"
                                    if saved_identity is not None else "not known to be the same (this checkpoint "
                                    "was written before backbones were identified)"), str(path),
                                 f"put the backbone back at {old} (a symbolic link will do), or start a new output_dir")
    if differences:
        raise PreflightError("the checkpoint was trained with another config: " + "; ".join(differences), str(path),
                             "resume with the config of that run (its resolved_config.yaml), or start a new output_dir")
    return path, state


SAMPLED = 1 << 20  # bytes read at each end of a weight file: its header and some of its tensors, for any size


def backbone_identity(name_or_path: str) -> dict | None:
    """What makes a backbone the same wherever its folder is: its config.json (less the fields that name the folder
    or the writer's version), and each weight file's size and the SHA-256 of its first and last MiB (a 7B checkpoint
    is not read whole). None when it cannot be found locally."""
    try:
        config_file = Path(cached_file(name_or_path, "config.json", local_files_only=True))
    except OSError:
        return None
    config = {k: v for k, v in json.loads(config_file.read_text()).items()
              if k not in ("_name_or_path", "transformers_version")}
    weights = {}
    for file in sorted(config_file.parent.iterdir()):
        if file.suffix in (".safetensors", ".bin"):
            size = file.stat().st_size
            with open(file, "rb") as f:
                head = f.read(SAMPLED)
                f.seek(max(size - SAMPLED, 0))
                weights[file.name] = f"{size}:{hashlib.sha256(head + f.read()).hexdigest()}"
    return {"config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
            "weight_files": weights}


def latest_readable(folder: Path) -> tuple[Path, dict]:
    """The newest training state of ``folder`` that can be read; an unreadable (truncated) newer one is passed over."""
    checkpointer = Checkpointer(folder, keep_last=1)
    problems = []
    for step in reversed(checkpointer.steps()):
        path = folder / f"{STATE}_step_{step}.pt"
        try:
            return path, _read_state(path)
        except PreflightError as err:
            problems.append(str(err))
    if problems:
        raise PreflightError("no readable training state", f"--resume auto in {folder}",
                             "every step failed to load (" + "; ".join(problems) + "); start a new output_dir")
    raise PreflightError("no training_state_step_N.pt to resume", f"--resume auto in {folder}",
                         "start without --resume, or point manager_settings.output_dir at the run to continue")


def _eval_source(folder: Path) -> tuple[Path, dict]:
    """What eval mode evaluates for ``--resume FOLDER``: a folder written by save_pretrained (its config and the folder
    itself as ``saved_folder``; the weights load with the model), or a run's output_dir (its latest readable step)."""
    if (folder / CONFIG_FILE).is_file():
        meta = saved_meta(folder)  # PrunedModelError: one line that names the file and the fix
        return folder, {"config": meta["config"], "saved_folder": str(folder)}
    if (folder / "checkpoints").is_dir():
        return latest_readable(folder / "checkpoints")
    raise PreflightError(f"the folder holds no saved pruned model ({CONFIG_FILE}) and no checkpoints/", str(folder),
                         "give a pruned_best/ or pruned_final/ folder, a run's output_dir or a training_state_step_N.pt")


def _read_state(path: Path) -> dict:
    try:
        state = load(path)
    except CheckpointError as err:
        raise PreflightError("the checkpoint cannot be read (truncated or not a checkpoint)", str(path),
                             f"resume from an earlier step's {STATE}_step_N.pt ({err.__cause__.__class__.__name__})") from err
    if not isinstance(state, dict) or not {"step", "modules", "optimizers", "config"} <= set(state):
        module = next((m for m in MODULES if path.name.startswith(m)), None)
        if module is not None:
            raise PreflightError(f"the file is the {module} module's state_dict, not a training state", str(path),
                                 f"resume from {path.name.replace(module, STATE, 1)} beside it, which also holds the "
                                 "optimizers, the step and the config")
        raise PreflightError("the file is not a training state", str(path), f"resume from a {STATE}_step_N.pt")
    return state


# ----------------------------------------------------------------------------- data
def load_data(config: Config, num_vision_tokens: int, max_positions: int | None):
    """(train, eval) data sets, every record and image header checked, conversations within the model's positions,
    and relevance boxes on some training sample if relevance_weight asks for them."""
    train_set, eval_set = build_datasets(config.data_settings)  # BadSampleError: 'what (where): fix' as well
    unlabelled = unlabelled_data_problem(config.method_settings.relevance_weight, train_set)
    if unlabelled:
        raise ValueError(unlabelled)
    if max_positions is not None:
        for dataset in (train_set, eval_set):
            if isinstance(dataset, LlavaInstructionDataset):
                check_prompt_lengths(dataset, config.backbone_settings.name_or_path, num_vision_tokens, max_positions)
    return train_set, eval_set


def check_prompt_lengths(dataset, name_or_path: str, num_vision_tokens: int, max_positions: int) -> None:
    """Every training conversation (every turn as data/collator.py renders it, the image as its vision tokens) fits
    ``max_positions``. A longer one keeps the longest run of whole turns that fits, as LLaVA truncates long
    conversations (counted in ``dataset.truncated``); a record whose first turn alone does not fit is a bad record."""
    records = dataset.records
    processor = _load_processor(name_or_path)
    lengths = _training_lengths(processor, [r.turns for r in records], num_vision_tokens)
    long = [i for i, n in enumerate(lengths) if n > max_positions]
    if not long:
        return
    # Only the long conversations are measured again, one run of turns at a time.
    prefixes = [(i, k) for i in long for k in range(1, len(records[i].turns))]
    prefix_lengths = dict(zip(prefixes, _training_lengths(processor, [records[i].turns[:k] for i, k in prefixes],
                                                          num_vision_tokens)))
    kept = [len(r.turns) for r in records]
    for i in long:
        kept[i] = sum(prefix_lengths[i, k] <= max_positions for k in range(1, len(records[i].turns)))
    too_long = [(records[i].id, prefix_lengths.get((i, 1), lengths[i])) for i in long if kept[i] == 0]
    if too_long and dataset.on_bad_sample == "error":
        named = "; ".join(f"sample {sample_id!r} takes {n} tokens" for sample_id, n in too_long[:SHOWN_PROBLEMS])
        more = f"; and {len(too_long) - SHOWN_PROBLEMS} more" if len(too_long) > SHOWN_PROBLEMS else ""
        raise PreflightError(f"{len(too_long)} sample(s) need more positions than the model has for their first turn "
                             f"alone, with its {num_vision_tokens} vision tokens (the backbone's "
                             f"max_position_embeddings is {max_positions}): {named}{more}", str(dataset.json_path),
                             "shorten them, or set data_settings.on_bad_sample: skip to leave them out")
    dataset.keep_turns(kept, f"the first turn is longer than the backbone's {max_positions} positions")


def _load_processor(name_or_path: str):
    """The backbone's processor (its chat template, image token and tokenizer), as the backbone will load it."""
    config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    return backbone_class(config.model_type, name_or_path).load_processor(name_or_path, local_files_only=True)


def _training_lengths(processor, conversations: list, num_vision_tokens: int, batch: int = 4096) -> list[int]:
    """The positions each conversation's training text takes once the processor has replaced its image token by the
    vision tokens; tokenized in batches with the fast tokenizer, as a file holds up to 665K records."""
    tokenizer, lengths = processor.tokenizer, []
    for start in tqdm(range(0, len(conversations), batch), desc="measuring conversations", unit="batch",
                      disable=len(conversations) < 10 * batch):
        texts = [render_conversation(processor, turns) for turns in conversations[start:start + batch]]
        ids = tokenizer(texts, add_special_tokens=adds_special_tokens(tokenizer, texts[0]))["input_ids"]
        lengths += [len(row) - 1 + num_vision_tokens for row in ids]
    return lengths
