import copy
import json
import logging

import pytest

from data.collator import VQACollator
from data.instruction_json import BadSampleError, InstructionSample, LlavaInstructionDataset, image_problems
from data.processors import word_level_processor
from data.synthetic_vqa import make_sample
from models.sequences import IGNORE_INDEX
from tests.helpers import write_llava_665k_like
from trainers.run_log import RunLog


def record(sample_id, image, question="what color is the object in the top row ?", answer="red"):
    return {"id": sample_id, "image": image,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


def conversation(sample_id, image, *values):
    """A record of the turns ``values`` (human, gpt, human, ...), <image> before the first."""
    values = [f"<image>\n{values[0]}", *values[1:]]
    return {"id": sample_id, "image": image,
            "conversations": [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]}


THREE_TURNS = ("what color is the object in the top row ?", "red", "is there a red circle ?", "yes",
               "how many blue objects are there ?", "two")


@pytest.fixture
def folder(tmp_path):
    for i in range(2):
        make_sample(0, "train", i).image.save(tmp_path / f"img{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    return tmp_path


def write(folder, records):
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def labelled(processor, batch) -> list[str]:
    return [processor.tokenizer.decode(row[row != IGNORE_INDEX]) for row in batch["labels"]]


def test_loads_and_collates_like_synthetic_data(folder, processor):
    path = write(folder, [record("a", "img0.png"), record("b", "img1.png", answer="two")])
    data = LlavaInstructionDataset(path, folder)
    assert len(data) == 2 and data.skipped == [] and data.text_only == 0 and data.truncated == []
    sample = data[1]
    assert (sample.id, sample.question, sample.answer) == ("b", "what color is the object in the top row ?", "two")
    batch = VQACollator(processor)([data[0], data[1]])
    assert labelled(processor, batch) == ["red </s>", "two </s>"]
    assert batch["ids"] == ["a", "b"]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_every_turn_is_trained_on_and_only_the_answers_are_labelled(folder, padding_side):
    """A trailing question without an answer is dropped; the first pair stays the sample's question / answer."""
    processor = copy.deepcopy(word_level_processor())
    processor.tokenizer.padding_side = padding_side
    long = conversation("long", "img0.png", *THREE_TURNS, "what row is the red object in ?")
    data = LlavaInstructionDataset(write(folder, [long, record("one", "img1.png", answer="blue")]), folder)
    sample = data[0]
    assert sample.turns == (("what color is the object in the top row ?", "red"), ("is there a red circle ?", "yes"),
                            ("how many blue objects are there ?", "two"))
    assert (sample.question, sample.answer) == sample.turns[0]
    batch = VQACollator(processor)([data[0], data[1]])
    assert labelled(processor, batch) == ["red </s> yes </s> two </s>", "blue </s>"]
    tok = processor.tokenizer
    real = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    assert tok.decode(real[real != tok.convert_tokens_to_ids("<image>")]) == (
        "<s> USER : what color is the object in the top row ? ASSISTANT : red </s> USER : is there a red circle ? "
        "ASSISTANT : yes </s> USER : how many blue objects are there ? ASSISTANT : two </s>")
    pad = (batch["attention_mask"][1] == 0).nonzero().squeeze(-1)
    assert len(pad) > 0 and (pad[0] == 0 if padding_side == "left" else pad[-1] == batch["input_ids"].shape[1] - 1)
    # generation prompts stay the first question's
    prompts = VQACollator(processor, with_answers=False)([data[0]])
    assert tok.decode(prompts["input_ids"][0][-2:]) == "ASSISTANT :" and prompts["answers"] == ["red"]
    assert "is there" not in tok.decode(prompts["input_ids"][0])


# LLaVA-1.5's conversation as llava-hf checkpoints template it, here with LLaVA's system prompt and behind the
# begin-of-sequence token, as many templates write it: the collator must not add a second one.
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")
LLAVA_TEMPLATE = (
    "{{ bos_token }}{{ '" + SYSTEM.replace("'", "\\'") + " ' }}"
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_a_chat_template_renders_the_conversation(folder):
    processor = word_level_processor()
    processor.chat_template = LLAVA_TEMPLATE
    data = LlavaInstructionDataset(write(folder, [conversation("c", "img0.png", *THREE_TURNS),
                                                  record("one", "img1.png", answer="blue")]), folder)
    batch = VQACollator(processor)([data[0], data[1]])
    assert labelled(processor, batch) == ["red </s> yes </s> two </s>", "blue </s>"]
    tok = processor.tokenizer
    real = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    expected = (f"<s>{SYSTEM} USER: what color is the object in the top row ? ASSISTANT: red</s> USER: is there a red "
                "circle ? ASSISTANT: yes</s> USER: how many blue objects are there ? ASSISTANT: two</s>")
    assert real[real != tok.convert_tokens_to_ids("<image>")].tolist() == tok(expected, add_special_tokens=False)[
        "input_ids"]
    assert (real == tok.convert_tokens_to_ids("<image>")).sum() == 144


def test_a_template_that_writes_the_prompt_unlike_the_conversation_is_named(folder):
    """A prompt that is not the start of the answered text cannot mark the answer: refused, naming the sample."""
    processor = word_level_processor()
    processor.chat_template = LLAVA_TEMPLATE.replace("'ASSISTANT:'", "'ASSISTANT : what'")
    data = LlavaInstructionDataset(write(folder, [record("c", "img0.png")]), folder)
    with pytest.raises(ValueError, match="sample 'c': the conversation cut before answer 1 does not tokenize as the "
                                         "start of the longer text"):
        VQACollator(processor)([data[0]])


def test_samples_without_turns_are_one_turn(processor):
    sample = make_sample(0, "train", 0)
    bare = InstructionSample("bare", sample.image, sample.question, sample.answer)
    batch = VQACollator(processor)([sample, bare])
    assert labelled(processor, batch) == [f"{sample.answer} </s>"] * 2
    assert batch["input_ids"][0].tolist() == batch["input_ids"][1].tolist()


def test_text_only_records_are_counted_not_refused(folder):
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "what is red ?"}, {"from": "gpt", "value": "a"}]}
    path = write(folder, [text_only, record("a", "img0.png"), dict(text_only, id="u"), record("b", "img1.png")])
    data = LlavaInstructionDataset(path, folder)
    assert [data[i].id for i in range(len(data))] == ["a", "b"]
    assert data.text_only == 2 and data.skipped == []


def test_a_file_of_text_only_records_says_so(folder):
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "what is red ?"}, {"from": "gpt", "value": "a"}]}
    with pytest.raises(BadSampleError, match="all 2 records are text-only, with no 'image'.*give a file of image"):
        LlavaInstructionDataset(write(folder, [text_only, dict(text_only, id="u")]), folder, on_bad_sample="skip")


@pytest.mark.parametrize("bad, message", [
    (record("m", "absent.png"), "image file .*absent.png does not exist"),
    (record("u", "broken.png"), "broken.png is not a readable image"),
    (record("q", "img0.png", answer="  "), r"conversations\[1\] \(a gpt turn, the answer\) is empty"),
    (conversation("later", "img0.png", *THREE_TURNS[:3], ""), r"conversations\[3\] \(a gpt turn, the answer\) is empty"),
    (record("e", "img0.png", question=""), r"conversations\[0\] \(a human turn\) has no question besides <image>"),
    ({"id": "c", "image": "img0.png", "conversations": [{"from": "human", "value": "<image>\nq"}]}, "at least a human"),
    ({"id": "o", "image": "img0.png", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "q"}]},
     r"conversations\[0\] must come from 'human' \(turns alternate human, gpt\), got 'gpt'"),
    ({"id": "w", "image": "img0.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                         {"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]},
     r"conversations\[2\] must come from 'human'"),
    ({"id": "v", "image": "img0.png", "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]},
     r"conversations\[0\] must be an object with a string 'value'"),
    ({"id": "n", "image": None, "conversations": []}, r"the image is null"),
    ({"id": "l", "image": ["img0.png", "img1.png"], "conversations": []},
     "'image' is a list of 2: several images per record are not supported"),
])
def test_bad_samples_are_named_or_skipped_and_counted(folder, bad, message):
    path = write(folder, [record("good", "img0.png"), bad])
    with pytest.raises(BadSampleError, match=message) as err:
        LlavaInstructionDataset(path, folder)
    assert str(path) in str(err.value) and f"sample {bad['id']!r}: " in str(err.value)
    assert "1 bad record(s)" in str(err.value) and "on_bad_sample: skip" in str(err.value)
    data = LlavaInstructionDataset(path, folder, on_bad_sample="skip")
    assert len(data) == 1 and len(data.skipped) == 1 and repr(bad["id"]) in data.skipped[0]


def test_every_bad_record_is_listed_at_once(folder):
    broken = [record("m", "absent.png"), {"id": "n", "image": None}, "not an object",
              record("u", "broken.png"), {"id": "o", "image": "img0.png", "conversations": [{"from": "gpt"}] * 2}]
    path = write(folder, [record("a", "img0.png"), *broken, record("b", "img1.png")])
    with pytest.raises(BadSampleError) as err:
        LlavaInstructionDataset(path, folder)
    message = str(err.value)
    assert message.startswith(f"5 bad record(s) in {path}: ")
    positions = [message.index(f"sample {i!r}: ") for i in ("m", "n", "#3", "u", "o")]  # '#3': the record's index
    assert positions == sorted(positions), "in the file's order"
    assert "got str" in message and "more" not in message and "\n" not in message
    data = LlavaInstructionDataset(path, folder, on_bad_sample="skip")
    assert [data[i].id for i in range(len(data))] == ["a", "b"]
    assert [s.split("sample ")[-1] for s in data.skipped] == ["'m')", "'n')", "'#3')", "'u')", "'o')"]


def test_a_long_list_of_bad_records_is_cut_at_twenty(folder):
    path = write(folder, [record("a", "img0.png"), *(record(f"m{i}", f"absent{i}.png") for i in range(25))])
    with pytest.raises(BadSampleError, match="^25 bad record\\(s\\) in ") as err:
        LlavaInstructionDataset(path, folder)
    assert "sample 'm19'" in str(err.value) and "sample 'm20'" not in str(err.value)
    assert "; and 5 more: fix them" in str(err.value)


def test_file_level_errors(folder):
    with pytest.raises(BadSampleError, match="instruction file does not exist .*absent.json.*: set data_settings"):
        LlavaInstructionDataset(folder / "absent.json", folder)
    with pytest.raises(BadSampleError, match="image folder does not exist"):
        LlavaInstructionDataset(write(folder, [record("a", "img0.png")]), folder / "nowhere")
    (folder / "bad.json").write_text("{not json")
    with pytest.raises(BadSampleError, match="not valid JSON"):
        LlavaInstructionDataset(folder / "bad.json", folder)
    with pytest.raises(BadSampleError, match="the file holds no records, an empty list"):
        LlavaInstructionDataset(write(folder, []), folder, on_bad_sample="skip")


def test_all_skipped_names_the_reasons(folder):
    text_only = {"id": "t", "conversations": []}
    path = write(folder, [record("m", "absent.png"), record("u", "broken.png"), text_only])
    with pytest.raises(BadSampleError, match="no usable samples, all 2 skipped and 1 text-only records left out") as err:
        LlavaInstructionDataset(path, folder, on_bad_sample="skip")
    assert "absent.png does not exist" in str(err.value) and "broken.png is not a readable image" in str(err.value)


def test_image_checks_keep_the_file_order(folder):
    """Threads answer out of order; the problems come back in the paths' order, across many chunks."""
    paths = [folder / ("img0.png" if i % 3 else f"absent{i}.png") for i in range(700)]
    problems = image_problems(paths)
    assert [p is None for p in problems] == [bool(i % 3) for i in range(700)]
    assert all(f"absent{i}.png" in problems[i] for i in range(0, 700, 3))


def test_missing_or_repeated_image_marker_is_counted(folder):
    path = write(folder, [record("none", "img0.png"), record("one", "img0.png"), record("two", "img1.png"),
                          conversation("later", "img1.png", "what color ?", "red", "<image> what shape ?", "circle")])
    records = json.loads(path.read_text())
    records[0]["conversations"][0]["value"] = "what color is the object in the top row ?"
    records[2]["conversations"][0]["value"] = "<image>\n<image> what color ?"
    path.write_text(json.dumps(records))
    data = LlavaInstructionDataset(path, folder)
    assert data.rewritten == ["none", "two", "later"]
    assert data[2].question == "what color ?"
    assert data[3].turns == (("what color ?", "red"), ("what shape ?", "circle"))


def test_a_llava_665k_like_file_gives_the_counts_it_declares(tmp_path, processor):
    written = write_llava_665k_like(tmp_path)
    records = json.loads(written.json_path.read_text())
    assert len(records) == written.records == written.samples + written.text_only + len(written.bad)
    assert any("[0." in r["conversations"][0]["value"] for r in records), "a grounding box"
    with pytest.raises(BadSampleError, match=f"1 bad record\\(s\\).*sample {written.bad[0]!r}: image file"):
        LlavaInstructionDataset(written.json_path, written.image_folder)
    data = LlavaInstructionDataset(written.json_path, written.image_folder, on_bad_sample="skip")
    assert (len(data), data.text_only, len(data.skipped)) == (written.samples, written.text_only, len(written.bad))
    samples = [data[i] for i in range(len(data))]
    assert sum(len(s.turns) > 1 for s in samples) == written.multi_turn >= 3
    assert sum(len(s.turns) for s in samples) == written.turns
    batch = VQACollator(processor)(samples)
    assert labelled(processor, batch) == [" ".join(f"{a} </s>" for _, a in s.turns) for s in samples]


def test_image_broken_after_loading_names_file_and_id(folder):
    data = LlavaInstructionDataset(write(folder, [record("late", "img1.png")]), folder)
    (folder / "img1.png").write_bytes(b"truncated")
    with pytest.raises(BadSampleError, match="cannot read image .*img1.png.*sample 'late'\\): fix the record"):
        data[0]


def test_truncated_jpeg_body_is_skipped_under_skip(folder, caplog):
    """The header reads fine at load; the body fails only when decoded in full."""
    image = make_sample(0, "train", 3).image
    image.save(folder / "whole.jpg", quality=95)
    body = (folder / "whole.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(body[: len(body) // 2])
    path = write(folder, [record("cut", "cut.jpg"), record("fine", "whole.jpg")])
    strict = LlavaInstructionDataset(path, folder)
    with pytest.raises(BadSampleError, match="cannot read image .*cut.jpg"):
        strict[0]
    lenient = LlavaInstructionDataset(path, folder, on_bad_sample="skip")
    assert len(lenient) == 2, "the header check passes"
    with caplog.at_level(logging.WARNING, logger="data"):
        assert lenient[0].id == "fine" and lenient.unreadable == ["cut"]
    (line,) = caplog.messages  # said once, naming the file and the sample, and counted
    assert "cut.jpg of sample 'cut' cannot be read in full" in line and "the next sample takes its place" in line


def test_the_run_log_shows_the_data_sets_warnings(tmp_path):
    log = RunLog(tmp_path / "training.log", echo=False)
    logging.getLogger("data.instruction_json").warning("image x.jpg of sample 'a' cannot be read in full")
    log.close()
    logging.getLogger("data.instruction_json").warning("after the run: not in its log")
    assert (tmp_path / "training.log").read_text() == "[WARNING] image x.jpg of sample 'a' cannot be read in full\n"
