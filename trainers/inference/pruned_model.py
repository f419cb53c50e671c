"""A trained pruned model you can save, share, load and run from your own script.

    from trainers.inference.pruned_model import load_pruned
    pruned = load_pruned("outputs", device="cuda", dtype="bfloat16")   # a run folder, a saved folder or a step
    answers = pruned.answer([image], ["What is in the picture?"])

A saved folder holds ``pruning_modules.safetensors`` (the token merger's and the layer pruners'
weights) and ``pruning_config.json`` (the method settings, the backbone it was trained on and that
backbone's shapes, the project version). Training writes one for the best evaluation
(``pruned_best/``) and one at the end (``pruned_final/``). Loading accepts such a folder, a run
folder (its ``pruned_best/``, else its best or latest training state) or a ``training_state_*.pt``
file, and checks the backbone's shapes against the saved ones before any weight is loaded.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from huggingface_hub import ModelHubMixin, snapshot_download
from safetensors.torch import load_file, save_file
from transformers.utils import cached_file

from configs.schema import Config, MethodSettings, config_from_dict, config_to_dict
from data.collator import build_prompt
from models.backbones import load_backbone, read_backbone_shape
from models.llava_backbone import LlavaBackbone
from models.pruned_llava import PrunedLlava, PrunedOutput
from trainers.checkpoint import STATE, Checkpointer, load
from trainers.inference.build import build_pruned_model
from trainers.inference.evaluation import generate_pruned

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "pruning_config.json", "pruning_modules.safetensors", "README.md"
SHAPE_KEYS = ("num_layers", "hidden_size", "vision_hidden_size", "num_vision_tokens")


class PrunedModelError(ValueError):
    pass


def backbone_shapes(backbone: LlavaBackbone) -> dict[str, int]:
    return {"num_layers": backbone.num_layers, "hidden_size": backbone.hidden_size,
            "vision_hidden_size": backbone.vision_hidden_size, "num_vision_tokens": backbone.num_vision_tokens}


def backbone_record(name_or_path: str) -> dict:
    """How a saved model names its backbone: a hub id as given; a local folder by its absolute path, with the hub id
    when the folder is a Hugging Face cache snapshot (``models--ORG--NAME/snapshots/...``)."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return {"name_or_path": name_or_path, "hub_id": name_or_path}
    snapshot = re.search(r"models--([^/]+)--([^/]+)/snapshots/", str(path.resolve()))
    return {"name_or_path": str(path.resolve()), "hub_id": f"{snapshot[1]}/{snapshot[2]}" if snapshot else None}


def save_pretrained(model: PrunedLlava, config: Config, folder: str | Path, evaluation: dict | None = None) -> Path:
    """Write the merger's and pruners' weights, everything needed to rebuild them and a model card (``README.md``)
    into ``folder``, readable by others (0644). ``evaluation``: the metrics of its last evaluation, for the card.

    One unit: the files go into a temporary folder that then takes the place of the previous one (kept as
    ``.NAME.old`` between the two renames, and put back by trainers/checkpoint.remove_stale if the second never
    happened)."""
    folder = Path(folder)
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"layer_pruners.{k}": v for k, v in model.pruners.state_dict().items()}
    if model.merger is not None:
        tensors.update({f"token_merger.{k}": v for k, v in model.merger.state_dict().items()})
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE))
    meta = {"format_version": FORMAT_VERSION, "method_settings": config_to_dict(config)["method_settings"],
            "backbone": {**backbone_record(model.backbone.config.name_or_path or config.backbone_settings.name_or_path),
                         **backbone_shapes(model.backbone)},
            "pruning_layers": sorted(model.stage_of_layer), "stage_budgets": model.stage_budgets,
            "merged_tokens": model.merged_tokens, "temperature": model.temperature,
            "evaluation": {k: float(v) for k, v in (evaluation or {}).items()}, "config": config_to_dict(config)}
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    (tmp / CARD_FILE).write_text(model_card(meta))
    for path in (tmp, *tmp.iterdir()):  # others on a shared disk read it, whatever this process's umask
        path.chmod(0o755 if path.is_dir() else 0o644)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


CARD_METRICS = ("accuracy_hard", "accuracy_baseline", "accuracy_soft", "flops_reduction", "vision_flops_reduction",
                "avg_vision_tokens_per_layer", "prefill_ms_per_sample")


def model_card(meta: dict) -> str:
    """The folder's README.md: what the model is, its token schedule, its last evaluation and how to load it."""
    backbone, method = meta["backbone"], meta["method_settings"]
    hub_id = backbone.get("hub_id")
    front = ["---", "library_name: vision-token-pruning", "tags:", "- vision-token-pruning", "- llava",
             "- token-pruning", *([f"base_model: {hub_id}"] if hub_id else []), "---", ""]
    evaluation = meta.get("evaluation") or {}
    rows = [f"| {k} | {evaluation[k]:.4g} |" for k in CARD_METRICS if k in evaluation]
    schedule = " → ".join(str(n) for n in [backbone["num_vision_tokens"], meta["merged_tokens"], *meta["stage_budgets"]])
    lines = [
        "# Learned vision-token pruning modules", "",
        f"A token merger ({method['merger_type']}) and {len(meta['pruning_layers'])} layer pruners "
        f"({method['pruner_type']}) trained on a frozen backbone: **{hub_id or backbone['name_or_path']}** "
        f"({backbone['num_layers']} decoder layers, {backbone['num_vision_tokens']} vision tokens per image). The "
        "backbone's weights are not in this folder.", "",
        f"- Vision tokens, hard mode: {schedule} (the merger, then the pruners before decoder layers "
        f"{', '.join(str(layer) for layer in meta['pruning_layers'])})",
        f"- Merger temperature at inference: {meta['temperature']:g}", "",
        "## Last evaluation", "",
        *(["| metric | value |", "|---|---|", *rows] if rows else ["No evaluation was recorded with this folder."]), "",
        "## How to load it", "",
        "```python",
        "from trainers.inference.pruned_model import PrunedModel",
        "model = PrunedModel.from_pretrained(\"<this folder or hub repo>\", device=\"cuda\", dtype=\"bfloat16\")",
        "# backbone=\"<folder or hub id>\" when the backbone is elsewhere on this machine",
        "print(model.answer([image], [\"What is in the picture?\"]))",
        "```", "",
        f"`{CONFIG_FILE}` holds the full training configuration; `{WEIGHTS_FILE}` the modules' weights.", ""]
    return "\n".join(front + lines)


@dataclass
class _Saved:
    config: Config
    backbone_shape: dict[str, int] | None
    weights: dict[str, dict[str, torch.Tensor]]  # module name -> state_dict
    temperature: float  # the one training ended at (the config's temperature_min where older files hold none)
    evaluation: dict[str, float] = field(default_factory=dict)  # its last evaluation's metrics (saved folders)


def saved_meta(folder: Path) -> dict:
    """The ``pruning_config.json`` of a folder written by :func:`save_pretrained`, its format version checked, and
    its weights file checked whole (its header and the length it announces), before any weight loads."""
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as err:
        raise PrunedModelError(f"cannot read {folder / CONFIG_FILE} ({err}): save the model again") from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise PrunedModelError(f"{folder / CONFIG_FILE} has format version {meta.get('format_version')}, this code "
                               f"reads {FORMAT_VERSION}: load it with the project version that saved it")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise PrunedModelError(f"{weights} is missing: {folder} holds no whole saved model; save it again, or load the "
                               "run's checkpoints/training_state_*.pt")
    try:
        with safe_open(str(weights), "pt"):
            pass
    except Exception as err:  # safetensors raises its own error type for a short or foreign file
        raise PrunedModelError(f"{weights} cannot be read ({err}): it is truncated or not a safetensors file; save "
                               "the model again, or load the run's checkpoints/training_state_*.pt") from err
    return meta


def _read(path: Path) -> _Saved:
    """The saved modules behind ``path``: a saved folder, a run folder or a training-state file."""
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        meta = saved_meta(path)
        tensors = load_file(str(path / WEIGHTS_FILE))
        weights: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            module, name = key.split(".", 1)
            weights.setdefault(module, {})[name] = value
        config = config_from_dict(meta["config"], str(path / CONFIG_FILE))
        return _Saved(config, meta["backbone"], weights, meta.get("temperature", config.method_settings.temperature_min),
                      meta.get("evaluation") or {})
    if path.is_dir():
        for candidate in (path / "pruned_best", path / "checkpoints" / f"{STATE}_best.pt"):
            if candidate.exists():
                return _read(candidate)
        latest = Checkpointer(path / "checkpoints", keep_last=1).latest()
        if latest is not None:
            return _read(latest)
        raise PrunedModelError(f"{path} holds no saved pruned model ({CONFIG_FILE}), no pruned_best/ and no "
                               "checkpoints/: give a folder written by save_pretrained, a run's output_dir or a "
                               f"{STATE}_step_N.pt")
    if path.is_file():
        state = load(path)
        if not isinstance(state, dict) or "modules" not in state or "config" not in state:
            raise PrunedModelError(f"{path} is not a training state: give a {STATE}_*.pt, a run folder or a saved folder")
        config = config_from_dict(state["config"], str(path))
        return _Saved(config, None, state["modules"], state.get("temperature", config.method_settings.temperature_min))
    raise PrunedModelError(f"{path} does not exist: give a saved pruned-model folder, a run's output_dir or a "
                           f"{STATE}_step_N.pt")


class PrunedModel(ModelHubMixin, library_name="vision-token-pruning",
                  tags=["vision-token-pruning", "llava", "token-pruning"]):
    """A backbone with trained pruning modules and its processor: answers questions about images.

    Hugging Face conventions (``huggingface_hub.ModelHubMixin``): ``PrunedModel.from_pretrained(folder or repo id,
    backbone=None, device="cpu", dtype=None)``, ``save_pretrained(folder)`` and ``push_to_hub(repo_id)``; a saved
    folder holds the modules' weights, their config and a model card. The backbone is not in it: it loads from the
    folder or hub id the model was trained on, or from ``backbone``."""

    def __init__(self, model: PrunedLlava, config: Config, evaluation: dict[str, float] | None = None):
        self.model, self.config = model.eval(), config
        self.evaluation = evaluation or {}  # the metrics of its last evaluation, carried into what it saves
        self._hub_mixin_config = None  # the mixin would write `config` as config.json: pruning_config.json holds it
        self.backbone = model.backbone
        self.processor = model.backbone.processor

    def _save_pretrained(self, save_directory: Path) -> None:
        save_pretrained(self.model, self.config, save_directory, self.evaluation)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, backbone: str | LlavaBackbone | None = None,
                        device: str = "cpu", dtype: str | None = None, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False, force_download: bool = False) -> "PrunedModel":
        """A saved folder, a run's output_dir or a ``training_state_*.pt`` (:func:`load_pruned`), or a hub repo id
        (its files from the local cache or downloaded), on ``backbone`` (default: the one it was trained on)."""
        return cls._from_pretrained(model_id=str(pretrained_model_name_or_path), revision=revision, cache_dir=cache_dir,
                                    force_download=force_download, local_files_only=local_files_only, token=token,
                                    backbone=backbone, device=device, dtype=dtype)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir, force_download: bool,
                         local_files_only: bool, token, backbone: str | LlavaBackbone | None = None,
                         device: str = "cpu", dtype: str | None = None, **unused) -> "PrunedModel":
        folder = Path(model_id)
        if not folder.exists():  # a hub repo: its files, from the cache or downloaded
            folder = Path(snapshot_download(model_id, revision=revision, cache_dir=cache_dir, token=token,
                                            force_download=force_download, local_files_only=local_files_only))
        return load_pruned(folder, backbone, device, dtype)

    @property
    def method(self) -> MethodSettings:
        return self.config.method_settings

    def prompts(self, questions: list[str]) -> list[str]:
        """The training prompt (LLaVA-1.5's), or the processor's chat template when it has one."""
        template = getattr(self.processor, "chat_template", None)
        if not template:
            return [build_prompt(q, getattr(self.processor, "image_token", "<image>")) for q in questions]
        return [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True) for q in questions]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int = 16, mode: str = "hard", **image_inputs) -> tuple[list[str], PrunedOutput]:
        """Greedy answers for what the processor returns, and the prefill's output (tokens per layer, masks);
        ``image_inputs``: the processor's other image outputs the backbone reads (LLaVA-NeXT: ``image_sizes``)."""
        batch = {"input_ids": input_ids, "pixel_values": pixel_values, "attention_mask": attention_mask, **image_inputs}
        return generate_pruned(self.model, batch, mode, self.model.temperature, max_new_tokens)

    def answer(self, images: list, questions: list[str], max_new_tokens: int = 16, mode: str = "hard") -> list[str]:
        inputs = self.processor(images=images, text=self.prompts(questions), padding=True, return_tensors="pt")
        extra = {key: inputs[key] for key in self.model.backbone.image_input_keys}
        return self.generate(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                             max_new_tokens, mode, **extra)[0]


def load_pruned(path: str | Path, backbone: str | LlavaBackbone | None = None, device: str = "cpu",
                dtype: str | None = None) -> PrunedModel:
    """The pruned model saved at ``path`` (module docstring) on ``backbone`` (default: the one it was trained on).

    The backbone's shapes are read from its config.json and checked against the saved ones before its
    weights load."""
    saved = _read(Path(path))
    config = saved.config
    if not isinstance(backbone, LlavaBackbone):
        name = backbone or saved_backbone(saved, Path(path))
        bounds = (config.data_settings.max_vision_tokens, config.data_settings.image_max_size)  # as in training
        if saved.backbone_shape is not None:
            shape = read_backbone_shape(name, *bounds)
            _check_shapes(saved.backbone_shape, {"num_layers": shape.num_layers,
                                                 "num_vision_tokens": shape.num_vision_tokens}, name)
        settings = config.backbone_settings
        backbone = load_backbone(name, dtype or settings.dtype, settings.attn_implementation, device)
        backbone.apply_bounds(*bounds)
    if saved.backbone_shape is not None:
        _check_shapes(saved.backbone_shape, backbone_shapes(backbone), backbone.config.name_or_path)
    model = build_pruned_model(config.method_settings, backbone)
    load_modules(model, saved.weights)
    model.temperature = saved.temperature
    return PrunedModel(model, config, saved.evaluation)


def saved_backbone(saved: _Saved, path: Path) -> str:
    """The backbone a saved model was trained on, as found on this machine: its folder, else its hub id in the local
    cache; otherwise one line that says what to pass."""
    record = saved.backbone_shape or {"name_or_path": saved.config.backbone_settings.name_or_path, "hub_id": None}
    name, hub_id = record["name_or_path"], record.get("hub_id")
    if Path(name).expanduser().is_dir():
        return name
    if hub_id is not None:
        try:
            cached_file(hub_id, "config.json", local_files_only=True)
            return hub_id
        except OSError:
            pass
    fetch = f", or download it first: hf download {hub_id}" if hub_id else ""
    raise PrunedModelError(f"the backbone {path} was trained on is not on this machine ({name}): pass backbone= "
                           f"(load_pruned / PrunedModel.from_pretrained) with its folder or hub id{fetch}")


def load_modules(model: PrunedLlava, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load the pruners' and (when the model has one) the merger's state_dicts from ``weights`` (module name ->
    state_dict, as a training state's ``modules`` or a saved folder holds them)."""
    model.pruners.load_state_dict(weights["layer_pruners"])
    if model.merger is not None:
        model.merger.load_state_dict(weights["token_merger"])


def read_saved_modules(folder: Path, backbone: LlavaBackbone) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """The module state_dicts of a folder written by :func:`save_pretrained`, checked against ``backbone``'s shapes,
    and the temperature its training ended at."""
    saved = _read(folder)
    _check_shapes(saved.backbone_shape, backbone_shapes(backbone), backbone.config.name_or_path)
    return saved.weights, saved.temperature


def _check_shapes(saved: dict, actual: dict, name: str) -> None:
    wrong = [f"{k} {saved[k]} (saved) vs {actual[k]}" for k in SHAPE_KEYS if k in actual and saved.get(k) != actual[k]]
    if wrong:
        raise PrunedModelError(f"the pruning modules were trained on a backbone of other shapes than {name}: "
                               f"{'; '.join(wrong)}; load them on the backbone they were trained on "
                               f"({saved.get('name_or_path')})")
