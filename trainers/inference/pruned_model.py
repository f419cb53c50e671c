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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from configs.schema import Config, MethodSettings, config_from_dict, config_to_dict
from data.collator import build_prompt
from models.backbones import load_backbone, read_backbone_shape
from models.llava_backbone import LlavaBackbone
from models.pruned_llava import PrunedLlava, PrunedOutput
from trainers.checkpoint import STATE, Checkpointer, load
from trainers.inference.build import build_pruned_model
from trainers.inference.evaluation import generate_pruned

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "pruning_config.json", "pruning_modules.safetensors"
SHAPE_KEYS = ("num_layers", "hidden_size", "vision_hidden_size", "num_vision_tokens")


class PrunedModelError(ValueError):
    pass


def backbone_shapes(backbone: LlavaBackbone) -> dict[str, int]:
    return {"num_layers": backbone.num_layers, "hidden_size": backbone.hidden_size,
            "vision_hidden_size": backbone.vision_hidden_size, "num_vision_tokens": backbone.num_vision_tokens}


def save_pretrained(model: PrunedLlava, config: Config, folder: str | Path) -> Path:
    """Write the merger's and pruners' weights and everything needed to rebuild them into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"layer_pruners.{k}": v for k, v in model.pruners.state_dict().items()}
    if model.merger is not None:
        tensors.update({f"token_merger.{k}": v for k, v in model.merger.state_dict().items()})
    tmp = folder / f".{WEIGHTS_FILE}.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    tmp.replace(folder / WEIGHTS_FILE)
    meta = {"format_version": FORMAT_VERSION, "method_settings": config_to_dict(config)["method_settings"],
            "backbone": {"name_or_path": config.backbone_settings.name_or_path, **backbone_shapes(model.backbone)},
            "pruning_layers": sorted(model.stage_of_layer), "stage_budgets": model.stage_budgets,
            "merged_tokens": model.merged_tokens, "config": config_to_dict(config)}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return folder


@dataclass
class _Saved:
    config: Config
    backbone_shape: dict[str, int] | None
    weights: dict[str, dict[str, torch.Tensor]]  # module name -> state_dict


def saved_meta(folder: Path) -> dict:
    """The ``pruning_config.json`` of a folder written by :func:`save_pretrained`, its format version checked."""
    meta = json.loads((folder / CONFIG_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise PrunedModelError(f"{folder / CONFIG_FILE} has format version {meta.get('format_version')}, this code "
                               f"reads {FORMAT_VERSION}: load it with the project version that saved it")
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
        return _Saved(config_from_dict(meta["config"], str(path / CONFIG_FILE)), meta["backbone"], weights)
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
        return _Saved(config_from_dict(state["config"], str(path)), None, state["modules"])
    raise PrunedModelError(f"{path} does not exist: give a saved pruned-model folder, a run's output_dir or a "
                           f"{STATE}_step_N.pt")


class PrunedModel:
    """A backbone with trained pruning modules and its processor: answers questions about images."""

    def __init__(self, model: PrunedLlava, config: Config):
        self.model, self.config = model.eval(), config
        self.backbone = model.backbone
        self.processor = model.backbone.processor

    @property
    def method(self) -> MethodSettings:
        return self.config.method_settings

    def save_pretrained(self, folder: str | Path) -> Path:
        return save_pretrained(self.model, self.config, folder)

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
        return generate_pruned(self.model, batch, mode, self.config.method_settings.temperature_min, max_new_tokens)

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
        name = backbone or config.backbone_settings.name_or_path
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
    return PrunedModel(model, config)


def load_modules(model: PrunedLlava, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load the pruners' and (when the model has one) the merger's state_dicts from ``weights`` (module name ->
    state_dict, as a training state's ``modules`` or a saved folder holds them)."""
    model.pruners.load_state_dict(weights["layer_pruners"])
    if model.merger is not None:
        model.merger.load_state_dict(weights["token_merger"])


def read_saved_modules(folder: Path, backbone: LlavaBackbone) -> dict[str, dict[str, torch.Tensor]]:
    """The module state_dicts of a folder written by :func:`save_pretrained`, checked against ``backbone``'s shapes."""
    saved = _read(folder)
    _check_shapes(saved.backbone_shape, backbone_shapes(backbone), backbone.config.name_or_path)
    return saved.weights


def _check_shapes(saved: dict, actual: dict, name: str) -> None:
    wrong = [f"{k} {saved[k]} (saved) vs {actual[k]}" for k in SHAPE_KEYS if k in actual and saved.get(k) != actual[k]]
    if wrong:
        raise PrunedModelError(f"the pruning modules were trained on a backbone of other shapes than {name}: "
                               f"{'; '.join(wrong)}; load them on the backbone they were trained on "
                               f"({saved.get('name_or_path')})")
