"""The train and eval data sets a config asks for."""

from __future__ import annotations

from configs.schema import DataSettings
from data.instruction_json import LlavaInstructionDataset
from data.synthetic_vqa import SyntheticVQADataset


def build_datasets(settings: DataSettings):
    """(train, eval) data sets for ``data_settings``."""
    if settings.source == "synthetic":
        return (SyntheticVQADataset(settings.synthetic_train_size, "train", settings.seed),
                SyntheticVQADataset(settings.synthetic_eval_size, "eval", settings.seed))
    return (LlavaInstructionDataset(settings.train_json, settings.image_folder, settings.on_bad_sample),
            LlavaInstructionDataset(settings.eval_json, settings.image_folder, settings.on_bad_sample))


def batches(dataset, collate, batch_size: int):
    """Consecutive batches of ``dataset`` in order (evaluation: deterministic, nothing dropped)."""
    for start in range(0, len(dataset), batch_size):
        yield collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
