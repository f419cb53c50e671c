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


def describe(name: str, dataset) -> str:
    """'train set: 12 samples, 3 text-only records skipped, 1 bad records skipped, ...': what a data set kept and
    left out (LLaVA JSON files; a synthetic set keeps everything), for the log at start-up and in the summary."""
    counts = [(getattr(dataset, "text_only", 0), "text-only records skipped"),
              (len(getattr(dataset, "skipped", [])), "bad records skipped"),
              (len(getattr(dataset, "truncated", [])), "conversations cut to fit"),
              (len(getattr(dataset, "unreadable", [])), "images unreadable in full, replaced by the next sample")]
    return f"{name} set: {len(dataset)} samples" + "".join(f", {n} {what}" for n, what in counts if n)
