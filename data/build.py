"""The train, validation and test data sets a config asks for, and the optimizer steps a run takes over its train
set."""

from __future__ import annotations

from configs.schema import Config, DataSettings
from data.instruction_json import LlavaInstructionDataset
from data.synthetic_vqa import SyntheticVQADataset


RUN_EVAL_SPLIT = "validation"  # the synthetic split a training run evaluates on


def build_datasets(settings: DataSettings):
    """(train, eval) data sets of a training run: it trains on the first, and evaluates on the second every
    ``eval_every`` steps, keeping its best checkpoint by it. Synthetic data draws these eval questions from its
    validation split, so the questions a benchmark reports (:func:`build_test_set`) never choose a checkpoint;
    instruction data evaluates on ``eval_json``."""
    if settings.source == "synthetic":
        return (SyntheticVQADataset(settings.synthetic_train_size, "train", settings.seed,
                                    settings.synthetic_labelled_fraction),
                SyntheticVQADataset(settings.synthetic_eval_size, RUN_EVAL_SPLIT, settings.seed))
    return (LlavaInstructionDataset(settings.train_json, settings.image_folder, settings.on_bad_sample),
            LlavaInstructionDataset(settings.eval_json, settings.image_folder, settings.on_bad_sample))


def build_test_set(settings: DataSettings):
    """The questions a benchmark reports: the synthetic eval split (``synthetic_eval_size`` questions), apart from
    the training run's validation questions, or ``eval_json``, the questions the run itself evaluated on (see
    :func:`validation_held_out`)."""
    if settings.source == "synthetic":
        return SyntheticVQADataset(settings.synthetic_eval_size, "eval", settings.seed)
    return LlavaInstructionDataset(settings.eval_json, settings.image_folder, settings.on_bad_sample)


def validation_held_out(settings: DataSettings) -> bool:
    """Whether a run's eval questions, which choose its best checkpoint, are apart from the test set's."""
    return settings.source == "synthetic"


def batches(dataset, collate, batch_size: int):
    """Consecutive batches of ``dataset`` in order (evaluation: deterministic, nothing dropped)."""
    for start in range(0, len(dataset), batch_size):
        yield collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


def unlabelled_data_problem(relevance_weight: float, train_set) -> str | None:
    """relevance_weight > 0 needs relevance boxes on some training sample (records without boxes only add none)."""
    if relevance_weight > 0 and not train_set.labelled:
        where = getattr(train_set, "json_path", "the synthetic train set (data_settings.synthetic_labelled_fraction)")
        return (f"method_settings.relevance_weight is {relevance_weight:g} but no sample of {where} carries relevance "
                "boxes (relevant_boxes): set it to 0, or add boxes to some records (docs/data.md: relevance boxes)")
    return None


def describe(name: str, dataset) -> str:
    """'train set: 12 samples, 2 with relevance boxes, 3 text-only records skipped, ...': what a data set kept, labelled
    and left out (LLaVA JSON files; a synthetic set keeps everything), for the log at start-up and in the summary."""
    counts = [(getattr(dataset, "labelled", 0), "with relevance boxes"),
              (getattr(dataset, "text_only", 0), "text-only records skipped"),
              (len(getattr(dataset, "skipped", [])), "bad records skipped"),
              (len(getattr(dataset, "truncated", [])), "conversations cut to fit"),
              (len(getattr(dataset, "unreadable", [])), "images unreadable in full, replaced by the next sample")]
    return f"{name} set: {len(dataset)} samples" + "".join(f", {n} {what}" for n, what in counts if n)


def planned_steps(config: Config, train_size: int, world_size: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) of a run on ``train_size`` samples over ``world_size`` processes.

    Equal micro-batches: every rank draws the same amount of noise, so the ranks' RNGs stay in step, and every
    micro-batch weighs the same in the step; a last batch that does not split evenly into processes x accumulation
    steps micro-batches is left out."""
    trainer = config.trainer_settings
    full, rest = divmod(train_size, trainer.dl_settings.batch_size)
    per_epoch = full + (rest > 0 and rest % (world_size * trainer.dl_settings.gradient_accumulation_steps) == 0)
    total = per_epoch * trainer.dl_settings.epochs
    return per_epoch, total if trainer.max_steps is None else min(total, trainer.max_steps)
