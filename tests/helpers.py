"""What several test modules build: tiny random LLaVA models, the shrunk tiny run (as a Config or main.py args) and a
LLaVA-665K-shaped instruction file."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data.collator import VQACollator
from data.processors import word_level_processor
from data.synthetic_vqa import SyntheticVQADataset
from models.llava_backbone import LlavaBackbone
from models.tiny_llava import build_llava

SHIPPED_BACKBONE = "backbones/tiny-llava"

# configs/tiny.yaml shrunk to seconds on a random tiny backbone with 4 decoder layers (dotted key -> value)
TINY_RUN = {
    "method_settings.pruning_layers": [1, 2, 3],
    "method_settings.pruner_d_internal": 16,
    "method_settings.merger_d_internal": 16,
    "method_settings.discriminator_hidden": 16,
    "trainer_settings.dl_settings.batch_size": 4,
    "trainer_settings.log_every": 2,
    "trainer_settings.eval_every": 4,
    "trainer_settings.save_every": 2,
    "trainer_settings.max_steps": 4,
    "data_settings.synthetic_train_size": 32,
    "data_settings.synthetic_eval_size": 6,
    "data_settings.eval_batch_size": 3,
    "data_settings.max_new_tokens": 2,
}


def llava_like(image_size: int, patch_size: int, text_layers: int = 2, seed: int = 0):
    """A random-init LLaVA with llava-1.5's structure (feature layer -2, `default` strategy) at toy widths."""
    torch.manual_seed(seed)
    processor = word_level_processor(image_size, patch_size)
    model = build_llava(processor.tokenizer, "toy", image_size=image_size, patch_size=patch_size, text_layers=text_layers)
    return model.eval(), processor


def sharpen_attention(layers, std: float = 0.5) -> None:
    """Peaked, content-dependent attention in these decoder layers: a random init attends almost
    uniformly, so attention rankings would be positional and an attention target flat."""
    with torch.no_grad():
        for layer in layers:
            layer.self_attn.q_proj.weight.normal_(std=std)
            layer.self_attn.k_proj.weight.normal_(std=std)


def sharp_llava_and_eager(text_layers: int, seed: int):
    """The tiny LLaVA (96 px, 8 px patches) with sharpened attention as a LlavaBackbone (SDPA), and an eager copy of
    the same weights, for reference attention maps and the hidden states entering each layer."""
    model, processor = llava_like(96, 8, text_layers=text_layers, seed=seed)
    sharpen_attention(model.model.language_model.layers)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return LlavaBackbone(model, processor), eager


def padded_prompts(processor, size: int = 3, seed: int = 4) -> dict:
    """A batch of ``size`` eval prompts (no answers) of the synthetic data, checked to hold padding."""
    data = SyntheticVQADataset(size, "eval", seed=seed)
    out = VQACollator(processor, with_answers=False)([data[i] for i in range(size)])
    assert (out["attention_mask"] == 0).any(), "padding must be exercised"
    return out


def tiny_settings(tmp_path, backbone_folder, **overrides) -> dict:
    return {"manager_settings.output_dir": str(tmp_path / "out"), "backbone_settings.name_or_path": str(backbone_folder),
            **TINY_RUN, **overrides}


def tiny_run_config(tmp_path, backbone_folder, **overrides):
    """configs/tiny.yaml with TINY_RUN (and ``overrides``, dotted keys) as a Config."""
    from configs.schema import apply_overrides, config_from_dict, read_yaml

    settings = tiny_settings(tmp_path, backbone_folder, **overrides)
    return config_from_dict(apply_overrides(read_yaml("configs/tiny.yaml"), [f"{k}={v}" for k, v in settings.items()]))


def main_args(tmp_path, backbone_folder, *extra, **overrides):
    """The same run as ``python main.py`` arguments (``extra``: more arguments), and its output folder."""
    args = ["--config", "configs/tiny.yaml"]
    for key, value in tiny_settings(tmp_path, backbone_folder, **overrides).items():
        args += ["--set", f"{key}={value}"]
    return [*args, *extra], tmp_path / "out"


def resized_batch(processor, sizes: list[tuple[int, int]], with_answers: bool = True, seed: int = 4,
                  only: int | None = None) -> dict:
    """Synthetic questions whose images are resized to ``sizes`` ((height, width) each), collated: on a backbone
    whose token count follows the image, different numbers of vision tokens and left padding. ``only``: the batch
    of that one sample."""
    from data.collator import VQACollator
    from data.synthetic_vqa import SyntheticVQADataset

    data = SyntheticVQADataset(len(sizes), "eval", seed=seed)
    samples = [dataclasses.replace(data[i], image=data[i].image.resize((w, h))) for i, (h, w) in enumerate(sizes)]
    return VQACollator(processor, with_answers=with_answers)(samples if only is None else [samples[only]])


class ChosenShare(nn.Module):
    """Keep logits +a for ``keep[b]`` tokens of sample b chosen by a fixed scatter over their ranks, -a for the
    rest: exactly the tokens hard mode keeps when its budget for sample b is ``keep[b]``."""

    def __init__(self, keep: list[int], tokens: list[int]):
        super().__init__()
        self.keep, self.tokens = torch.tensor(keep), torch.tensor(tokens)

    def forward(self, vision, question, question_mask):
        rank = torch.arange(vision.shape[1])
        priority = ((rank * 7919) % 1009).float().expand(vision.shape[0], -1)
        priority = priority.masked_fill(rank >= self.tokens[:, None], -1.0)  # a shorter sample's padding slots
        order = priority.argsort(dim=1, descending=True).argsort(dim=1)  # each token's place in the priority
        return torch.where(order < self.keep[:, None], 30.0, -30.0)


@dataclasses.dataclass(frozen=True)
class LlavaLikeFile:
    """What :func:`write_llava_665k_like` wrote, with the counts a data set over it reports under
    ``on_bad_sample: skip``."""

    json_path: Path
    image_folder: Path  # data_settings.image_folder: the records' 'image' paths are relative to it
    records: int  # every record of the file
    samples: int  # the image records a data set keeps (len(dataset))
    multi_turn: int  # of those, the ones of 2 to 4 turns
    turns: int  # the (question, answer) turns of those samples, all together
    text_only: int  # records without 'image' (dataset.text_only)
    bad: tuple[str, ...]  # ids of the bad records (an image file that does not exist): one reason each in skipped
    labelled: int = 0  # image records that carry relevant_boxes (dataset.labelled)


def write_llava_665k_like(folder, image_records: int = 12, text_only: int = 3, seed: int = 0, split: str = "train",
                          name: str = "llava_665k_like.json", boxed_every: int | None = None,
                          sizes: list[tuple[int, int]] | None = None) -> LlavaLikeFile:
    """A file shaped like LLaVA-1.5's llava_v1_5_mix665k.json, in the tiny backbone's vocabulary, and its images.

    Image records over synthetic scenes (data/synthetic_vqa.py), images as JPEGs under ``folder/coco/train2017/``:
    1 to 4 turns each (the scene's own question first, then others about the same scene, every answer read off it),
    one with ``<image>`` after its question, one grounding-style question naming an object's box as
    ``[x0, y0, x1, y1]`` (its digits and brackets are unknown words to the tiny tokenizer); ``text_only`` records
    without an image (ShareGPT-like); one record whose image file is missing. Records in a fixed shuffled order;
    ``split`` and ``seed`` name the images, so a train and an eval file can share ``folder``. ``boxed_every``: every
    so many image records carry relevant_boxes (the boxes of the objects their first question is about; none where
    it is about none); ``sizes``: the images resized to these (width, height) in turn."""
    from data.synthetic_vqa import GRID, make_sample, scene_questions

    folder = Path(folder)
    (folder / "coco" / "train2017").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, image_records, text_only])
    records, turn_counts = [], []
    for index in range(image_records):
        sample = make_sample(seed, split, index)
        image = f"coco/train2017/{split}_{seed}_{index:012d}.jpg"
        picture = sample.image if sizes is None else sample.image.resize(sizes[index % len(sizes)])
        picture.save(folder / image, quality=95)
        others = [(q, a) for _, q, a in scene_questions(sample.objects, rng) if q != sample.question]
        turns = [(sample.question, sample.answer), *others[: index % 4]]
        if index == 1:  # grounding: a region given as a normalized box, as in LLaVA's RefCOCO / VG records
            obj = sample.objects[0]
            row, col = obj.patch
            box = ", ".join(f"{v / GRID:.2f}" for v in (col, row, col + 1, row + 1))
            turns = [(f"what color is the object in [{box}] ?", obj.color)]
        values = [text for pair in turns for text in pair]  # human, gpt, human, gpt, ...
        values[0] = f"{values[0]}\n<image>" if index == 2 else f"<image>\n{values[0]}"
        records.append({"id": sample.id, "image": image, "conversations": [
            {"from": ("human", "gpt")[i % 2], "value": value} for i, value in enumerate(values)]})
        if boxed_every and index % boxed_every == 0 and index != 1 and sample.relevance.relevant:
            records[-1]["relevant_boxes"] = [list(box) for box in sample.relevance.relevant]
        turn_counts.append(len(turns))
    for i in range(text_only):
        records.append({"id": f"sharegpt-{split}-{i}", "conversations": [
            {"from": "human", "value": "what shape is a circle ?"}, {"from": "gpt", "value": "circle"},
            {"from": "human", "value": "how many objects are there ?"}, {"from": "gpt", "value": "two"}]})
    bad = f"{split}-{seed}-missing"
    records.append({"id": bad, "image": f"coco/train2017/{split}_{seed}_missing.jpg", "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the object in the top row ?"}, {"from": "gpt", "value": "red"}]})
    order = rng.permutation(len(records))
    json_path = folder / name
    json_path.write_text(json.dumps([records[i] for i in order], indent=1))
    return LlavaLikeFile(json_path, folder, len(records), image_records, sum(n > 1 for n in turn_counts),
                         sum(turn_counts), text_only, (bad,), sum("relevant_boxes" in r for r in records))
