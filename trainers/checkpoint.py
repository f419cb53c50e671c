"""Checkpoints: per-module state_dicts the seed guide loads, plus one full training state per save.

Files in ``outputs/checkpoints/``:

- ``token_merger_step_N.pt``, ``layer_pruners_step_N.pt``, ``discriminator_step_N.pt``: plain
  ``state_dict``s (``token_merger.load_state_dict(torch.load(path))`` works);
- ``training_state_step_N.pt``: everything an exact resume needs (the three modules, the
  three optimizers, step, temperature, RNG states, data position, resolved config);
- ``*_best.pt``: the same four files of the best evaluation so far by the configured metric, and
  ``best_manifest.json``, which makes them one unit (below).

Every file is written to a temporary name and moved into place with ``os.replace``, so a
crash leaves either the old file or the new one, never half of one. A step's training state is
written last: its presence marks the step complete. The best files replace the previous best,
so a save that stops half-way (a full disk) would leave new module files beside an old state:
the manifest is marked incomplete before they are written and complete, with each file's
SHA-256, after, and reading a best file checks it. Old steps are deleted only after the new
step's four files are complete (keep-last-K rotation). Loading uses ``weights_only=True``.
What an interrupted save leaves (temporary files, a step's module files without its state) is
removed at the next start (:func:`remove_stale`, while the run holds its folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

MODULES = ("token_merger", "layer_pruners", "discriminator")
STATE = "training_state"
_STEP_FILE = re.compile(rf"^{STATE}_step_(\d+)\.pt$")
_MODULE_STEP_FILE = re.compile(rf"^(?:{'|'.join(MODULES)})_step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    pass


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` through a temporary file: a failure (a full disk, a lost mount) leaves the old
    file and no temporary one, and says so."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError from its writer
        tmp.unlink(missing_ok=True)
        reason = str(err).splitlines()[0] if str(err) else err.__class__.__name__
        raise CheckpointError(f"cannot write checkpoint: {reason} ({path}): free space on that disk or choose another "
                              "manager_settings.output_dir; the checkpoints written before are intact") from err


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_path(folder: Path, tag: str) -> Path:
    return folder / f"{tag}_manifest.json"


def check_unit(path: Path) -> None:
    """A tagged file (``*_best.pt``) must belong to the last complete save of its tag: its manifest says the save
    finished and holds this file's SHA-256. Step files and files of runs written before manifests pass."""
    match = re.match(rf"^(?:{'|'.join((*MODULES, STATE))})_([a-z]+)\.pt$", path.name)
    manifest = manifest_path(path.parent, match.group(1)) if match else None
    if manifest is None or not manifest.is_file():
        return
    record = json.loads(manifest.read_text())
    if not record.get("complete"):
        raise CheckpointError(f"{path} belongs to a save that did not finish (step {record.get('step')}: the disk was "
                              f"full or the run stopped while writing): its *_{match.group(1)}.pt files do not belong "
                              "together. Resume from a training_state_step_N.pt instead")
    if record["sha256"].get(path.name) != _sha256(path):
        raise CheckpointError(f"{path} was changed after its save (its SHA-256 is not the one in {manifest.name}): "
                              "resume from a training_state_step_N.pt instead")


def load(path: str | Path) -> Any:
    """A checkpoint file, read with ``weights_only=True``; a tagged one (``*_best.pt``) checked against its save's
    manifest first."""
    check_unit(Path(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # a truncated or foreign file: say which one and what to do
        raise CheckpointError(f"cannot read checkpoint {path}: {err.__class__.__name__}: {err}. "
                              "Resume from an earlier step (training_state_step_N.pt) instead.") from err


class Checkpointer:
    def __init__(self, folder: str | Path, keep_last: int):
        self.folder = Path(folder)
        self.keep_last = keep_last

    def save(self, step: int, module_states: dict[str, dict], training_state: dict, tag: str | None = None) -> Path:
        """Write the four files of ``step`` (or of ``tag``, e.g. "best", as one unit: see the module's docstring);
        then rotate old steps."""
        self.folder.mkdir(parents=True, exist_ok=True)
        suffix = tag or f"step_{step}"
        manifest = manifest_path(self.folder, tag) if tag else None
        if manifest is not None:
            _atomic_write(manifest, lambda tmp: tmp.write_text(json.dumps({"step": step, "complete": False})))
        written = []
        for name in MODULES:
            if name in module_states:
                written.append(self.folder / f"{name}_{suffix}.pt")
                atomic_save(module_states[name], written[-1])
        state_path = self.folder / f"{STATE}_{suffix}.pt"
        atomic_save(training_state, state_path)  # last: its presence marks the step as complete
        if manifest is not None:
            record = {"step": step, "complete": True, "sha256": {p.name: _sha256(p) for p in (*written, state_path)}}
            _atomic_write(manifest, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
        if tag is None:
            self._rotate()
        return state_path

    def steps(self) -> list[int]:
        """Steps whose training state is complete, ascending."""
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _STEP_FILE.match(p.name)))

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.folder / f"{STATE}_step_{steps[-1]}.pt" if steps else None

    def _rotate(self) -> None:
        for step in self.steps()[: -self.keep_last]:
            for name in (*MODULES, STATE):
                (self.folder / f"{name}_step_{step}.pt").unlink(missing_ok=True)


def remove_stale(run_folder: Path) -> list[str]:
    """Remove what interrupted saves left in a run folder, and name it: temporary files and folders (``.*.tmp``), the
    module files of a step whose training state was never written, and a saved folder's previous copy (``.X.old``),
    put back where the new one never arrived. Only while this run holds the folder (trainers/training/run_lock.py)."""
    removed = []
    checkpoints = run_folder / "checkpoints"
    complete = set(Checkpointer(checkpoints, keep_last=1).steps())
    for folder in (run_folder, checkpoints):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            step = _MODULE_STEP_FILE.match(path.name)
            if path.name.startswith(".") and path.name.endswith(".tmp") or (step and int(step.group(1)) not in complete):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed.append(str(path.relative_to(run_folder)))
            elif path.name.startswith(".") and path.name.endswith(".old") and path.is_dir():
                current = path.with_name(path.name[1:-len(".old")])
                if current.exists():
                    shutil.rmtree(path)
                    removed.append(str(path.relative_to(run_folder)))
                else:
                    path.rename(current)
    return removed


def rng_state() -> dict:
    """Every RNG a step draws from, as tensors and plain numbers (loadable with weights_only=True)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
    }
    if torch.cuda.is_available():  # the Gumbel noise is drawn on the device, from each GPU's own generator
        state["cuda"] = torch.cuda.get_rng_state_all()
        state["cuda_current"] = torch.cuda.get_rng_state()  # this process's device: a data-parallel rank's
    return state


def restore_rng_state(state: dict, data_parallel: bool = False) -> None:
    """``state`` back into every generator. ``data_parallel``: each process restores its own device's generator from
    rank 0's (ranks draw the same noise amounts from the same seed on their own device, so their states agree)."""
    torch.set_rng_state(state["torch"])
    if data_parallel and "cuda_current" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_current"])
    elif "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            raise CheckpointError(f"the checkpoint holds the RNG states of {len(state['cuda'])} GPU(s), this process "
                                  f"sees {torch.cuda.device_count()}: an exact resume needs the same GPUs "
                                  "(CUDA_VISIBLE_DEVICES)")
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"]))
