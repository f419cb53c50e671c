import json

import pytest

from data.collator import IGNORE_INDEX, VQACollator
from data.instruction_json import BadSampleError, LlavaInstructionDataset
from data.synthetic_vqa import make_sample


def record(sample_id, image, question="what color is the object in the top row ?", answer="red"):
    return {"id": sample_id, "image": image,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


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


def test_loads_and_collates_like_synthetic_data(folder, processor):
    path = write(folder, [record("a", "img0.png"), record("b", "img1.png", answer="two")])
    data = LlavaInstructionDataset(path, folder)
    assert len(data) == 2 and data.skipped == []
    sample = data[1]
    assert (sample.id, sample.question, sample.answer) == ("b", "what color is the object in the top row ?", "two")
    batch = VQACollator(processor)([data[0], data[1]])
    labelled = [processor.tokenizer.decode(row[row != IGNORE_INDEX]) for row in batch["labels"]]
    assert labelled == ["red </s>", "two </s>"]
    assert batch["ids"] == ["a", "b"]


@pytest.mark.parametrize("bad, message", [
    (record("m", "absent.png"), "image file .*absent.png does not exist"),
    (record("u", "broken.png"), "broken.png is not a readable image"),
    (record("q", "img0.png", answer="  "), "the gpt turn \\(the answer\\) is empty"),
    ({"id": "c", "image": "img0.png", "conversations": [{"from": "human", "value": "<image>\nq"}]}, "at least a human"),
    ({"id": "o", "image": "img0.png", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "q"}]},
     "must come from 'human' then 'gpt'"),
    ({"id": "t", "conversations": []}, "no 'image' field"),
])
def test_bad_samples_are_named_or_skipped_and_counted(folder, bad, message):
    path = write(folder, [record("good", "img0.png"), bad])
    with pytest.raises(BadSampleError, match=message) as err:
        LlavaInstructionDataset(path, folder)
    assert str(path) in str(err.value) and repr(bad["id"]) in str(err.value)
    data = LlavaInstructionDataset(path, folder, on_bad_sample="skip")
    assert len(data) == 1 and len(data.skipped) == 1 and bad["id"] in data.skipped[0]


def test_file_level_errors(folder):
    with pytest.raises(BadSampleError, match="instruction file does not exist .*absent.json.*: set data_settings"):
        LlavaInstructionDataset(folder / "absent.json", folder)
    with pytest.raises(BadSampleError, match="image folder does not exist"):
        LlavaInstructionDataset(write(folder, [record("a", "img0.png")]), folder / "nowhere")
    (folder / "bad.json").write_text("{not json")
    with pytest.raises(BadSampleError, match="not valid JSON"):
        LlavaInstructionDataset(folder / "bad.json", folder)


def test_all_skipped_names_the_reasons(folder):
    path = write(folder, [record("m", "absent.png"), record("u", "broken.png")])
    with pytest.raises(BadSampleError, match="no usable samples, all 2 skipped") as err:
        LlavaInstructionDataset(path, folder, on_bad_sample="skip")
    assert "absent.png does not exist" in str(err.value) and "broken.png is not a readable image" in str(err.value)


def test_missing_or_repeated_image_marker_is_counted(folder):
    path = write(folder, [record("none", "img0.png"), record("one", "img0.png"), record("two", "img1.png")])
    records = json.loads(path.read_text())
    records[0]["conversations"][0]["value"] = "what color is the object in the top row ?"
    records[2]["conversations"][0]["value"] = "<image>\n<image> what color ?"
    path.write_text(json.dumps(records))
    data = LlavaInstructionDataset(path, folder)
    assert data.rewritten == ["none", "two"]
    assert data[2].question == "what color ?"


def test_image_broken_after_loading_names_file_and_id(folder):
    data = LlavaInstructionDataset(write(folder, [record("late", "img1.png")]), folder)
    (folder / "img1.png").write_bytes(b"truncated")
    with pytest.raises(BadSampleError, match="cannot read image .*img1.png.*sample 'late'\\): fix the record"):
        data[0]


def test_truncated_jpeg_body_is_skipped_under_skip(folder):
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
    assert lenient[0].id == "fine" and lenient.unreadable == ["cut"]
