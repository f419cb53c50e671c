import torch

from data.collator import VQACollator, build_prompt
from data.instruction_json import InstructionSample
from data.synthetic_vqa import SyntheticVQADataset, object_box, question_objects
from models.sequences import IGNORE_INDEX


def test_labels_cover_only_the_answer_and_eos(processor):
    data = SyntheticVQADataset(4, "train", seed=0)
    samples = [data[i] for i in range(4)]
    batch = VQACollator(processor)(samples)
    tok = processor.tokenizer
    assert batch["input_ids"].shape == batch["labels"].shape
    assert (batch["attention_mask"] == 0).any()
    for b, sample in enumerate(samples):
        labelled = batch["labels"][b][batch["labels"][b] != IGNORE_INDEX].tolist()
        assert tok.decode(labelled) == f"{sample.answer} </s>"
        # The labelled positions are the last real tokens; everything before them is the prompt.
        prompt_len = len(tok(build_prompt(sample.question).replace("<image>", "<image>" * 144))["input_ids"])
        real = batch["attention_mask"][b].nonzero().squeeze(-1)
        assert (batch["labels"][b][real[:prompt_len]] == IGNORE_INDEX).all()
        assert (batch["labels"][b][real[prompt_len:]] != IGNORE_INDEX).all()
    assert (batch["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum(1).tolist() == [144] * 4
    assert batch["pixel_values"].shape == (4, 3, 96, 96)


def test_prompt_only_batches_for_generation(processor):
    data = SyntheticVQADataset(3, "eval", seed=0)
    batch = VQACollator(processor, with_answers=False)([data[i] for i in range(3)])
    assert "labels" not in batch
    assert batch["answers"] == [data[i].answer for i in range(3)]
    tok = processor.tokenizer
    # Left padding: every prompt ends at the last position with "ASSISTANT :".
    assert {tok.decode(row[-2:]) for row in batch["input_ids"]} == {"ASSISTANT :"}
    assert batch["attention_mask"][:, -1].all()
    assert build_prompt(" what color ? ") == "USER: <image>\nwhat color ? ASSISTANT:"
    assert torch.is_tensor(batch["input_ids"])


def test_relevance_boxes_travel_with_the_samples_that_have_them(processor):
    data = SyntheticVQADataset(4, "train", seed=2)
    samples = [data[i] for i in range(4)]
    batch = VQACollator(processor)(samples)
    assert batch["image_sizes_wh"] == [(96, 96)] * 4
    for relevance, sample in zip(batch["relevance"], samples):
        asked = set(question_objects(sample))
        assert relevance.relevant == tuple(object_box(o) for o in sample.objects if o in asked)
        assert relevance.distractors == tuple(object_box(o) for o in sample.objects if o not in asked)
    assert any(r.distractors for r in batch["relevance"])  # some question here leaves an object out
    # samples without boxes (instruction data without them) give None, also beside samples with boxes
    unlabelled = [InstructionSample(s.id, s.image, s.question, s.answer) for s in samples[:2]]
    assert VQACollator(processor)(unlabelled)["relevance"] == [None, None]
    assert VQACollator(processor)([samples[0], unlabelled[0]])["relevance"] == [samples[0].relevance, None]