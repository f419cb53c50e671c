"""What a run trains on: the frozen backbone on its device(s) and the train / eval data sets.

Devices: one data-parallel rank uses its own device (cuda:LOCAL_RANK on GPUs); otherwise
``backbone_settings.device``, and with ``manager_settings.gpus_per_subtask`` > 1 on CUDA the
decoder layers are spread over that many GPUs (trainers/training/placement.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState

from configs.schema import Config
from data.build import build_datasets, describe
from models.backbones import load_backbone
from models.llava_backbone import LlavaBackbone
from trainers.inference.build import resolve_device
from trainers.run_log import RunLog
from trainers.training.placement import place_pruners, spread_backbone
from trainers.training.trainer import Trainer


@dataclass
class BackboneAndData:
    backbone: LlavaBackbone
    train_set: object
    eval_set: object
    layer_devices: list[torch.device] | None = None  # set when the decoder layers are spread over several GPUs


def subtask_devices(config: Config, processes: PartialState | None = None) -> list[torch.device]:
    """The devices of this process: its rank's, or the config's device, or ``gpus_per_subtask`` GPUs from it on."""
    if processes is not None and processes.num_processes > 1:
        if config.manager_settings.gpus_per_subtask > 1:
            raise ValueError("data-parallel launches put one process on each GPU; set manager_settings."
                             "gpus_per_subtask to 1, or start one process without accelerate to spread the backbone")
        return [processes.device]
    device = resolve_device(config.backbone_settings.device)
    count = config.manager_settings.gpus_per_subtask
    if device.type != "cuda" or count == 1:
        return [device]
    first = device.index or 0
    if first + count > torch.cuda.device_count():
        raise ValueError(f"manager_settings.gpus_per_subtask is {count} from {device} on, but "
                         f"{torch.cuda.device_count()} GPU(s) are visible; lower it or widen CUDA_VISIBLE_DEVICES")
    return [torch.device("cuda", first + i) for i in range(count)]


UNKNOWN_SHARE = 0.2  # of the question words (one in five): above it, the backbone cannot read the data


def question_texts(dataset, limit: int = 2000) -> list[str]:
    """The human turns of up to ``limit`` records of an instruction data set (none for the synthetic scenes, whose
    words the tiny backbone knows by construction)."""
    records = getattr(dataset, "records", [])[:limit]
    return [question for record in records for question, _ in record.turns]


def unknown_word_share(tokenizer, texts: list[str]) -> float | None:
    """The share of ``texts``' tokens that the tokenizer maps to its unknown token (None: no texts, or a tokenizer
    without one, as byte-level BPE tokenizers are)."""
    if not texts or tokenizer.unk_token_id is None:
        return None
    ids = [i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in row]
    return sum(i == tokenizer.unk_token_id for i in ids) / len(ids) if ids else None


def load_world(config: Config, log: RunLog, data=None, processes: PartialState | None = None) -> BackboneAndData:
    """The frozen backbone and the train / eval data sets (``data``, checked before: trainers/training/preflight.py; built
    here when None), with what the seed guide prints. ``processes``: the launch's (trainers/training/distributed.py)."""
    settings = config.backbone_settings
    devices = subtask_devices(config, processes)
    log.info("Preloading backbone and dataset...")
    backbone = load_backbone(settings.name_or_path, settings.dtype, settings.attn_implementation,
                                             devices[0])
    backbone.apply_bounds(config.data_settings.max_vision_tokens, config.data_settings.image_max_size)
    layer_devices = spread_backbone(backbone, devices) if len(devices) > 1 else None
    train_set, eval_set = data if data is not None else build_datasets(config.data_settings)
    for name, dataset in (("train", train_set), ("eval", eval_set)):
        skipped, rewritten = getattr(dataset, "skipped", []), getattr(dataset, "rewritten", [])
        truncated = getattr(dataset, "truncated", [])
        log.info(describe(name, dataset))
        for reason in skipped[:5]:
            log.info(f"  skipped: {reason}")
        if truncated:
            log.info(f"  {len(truncated)} conversations keep only the whole turns that fit the backbone's positions "
                     f"(e.g. {', '.join(truncated[:3])})")
        if rewritten:
            log.info(f"  {len(rewritten)} samples had no <image>, several, or one after the first question (e.g. "
                     f"{', '.join(rewritten[:3])}); the image is placed once, before the first question")
    share = unknown_word_share(backbone.processor.tokenizer, question_texts(train_set))
    if share is not None and share > UNKNOWN_SHARE:
        log.warning(f"{share:.0%} of the train set's question words are unknown to the backbone's tokenizer (they "
                    f"read as {backbone.processor.tokenizer.unk_token}): {settings.name_or_path} cannot read this data. "
                    "The shipped tiny backbone knows only the synthetic scenes' words and is there to try the code on "
                    "a CPU; train on your own data with a real LLaVA backbone (backbone_settings.name_or_path)")
    log.info("Freezing backbone parameters...")
    frozen = sum(p.numel() for p in backbone.parameters() if not p.requires_grad)
    where = (f"decoder layers over {', '.join(str(d) for d in devices)}" if layer_devices else f"device {devices[0]}")
    log.info(f"Backbone: {settings.name_or_path}, {frozen:,} frozen parameters, {backbone.num_layers} decoder layers, "
             f"{'up to ' if backbone.variable_token_count else ''}{backbone.num_vision_tokens} vision tokens per image "
             f"({type(backbone).__name__}), {where}")
    return BackboneAndData(backbone, train_set, eval_set, layer_devices)


def make_trainer(config: Config, world: BackboneAndData, log: RunLog, output_dir: str | Path) -> Trainer:
    trainer = Trainer(config, world.backbone, world.train_set, world.eval_set, log, output_dir)
    if world.layer_devices is not None:
        place_pruners(trainer.model, world.layer_devices)
    return trainer
