"""The converters to relevance boxes (data/grounding.py, scripts/*_to_llava.py, scripts/grounding_boxes.py), each on a
small file written by hand in its source's published format, and what they write read back as training data."""

import json

import pytest
from PIL import Image

from data.grounding import add_grounding_boxes, gqa_records, textvqa_records, unpadded_box, write_records
from data.instruction_json import BadSampleError, LlavaInstructionDataset
from scripts import gqa_to_llava, grounding_boxes, textvqa_to_llava

# GQA: questions (question id -> question, annotations: word span -> scene-graph object id) and scene graphs
GQA_QUESTIONS = {
    "201": {"imageId": "n1", "question": "What color is the cup to the left of the plate?", "answer": "white",
            "fullAnswer": "The cup is white.", "isBalanced": True, "types": {"structural": "query"},
            "annotations": {"question": {"4": "11", "10": "12"}, "answer": {}, "fullAnswer": {"1": "11"}}},
    "202": {"imageId": "n1", "question": "Is there a dog?", "answer": "no", "fullAnswer": "No, there is no dog.",
            "annotations": {"question": {}, "answer": {}, "fullAnswer": {}}},
    "203": {"imageId": "n2", "question": "Is the sky blue?", "answer": "yes", "fullAnswer": "Yes, the sky is blue.",
            "annotations": {"question": {"2": "21"}, "answer": {}, "fullAnswer": {"2": "21"}}},
}
GQA_SCENE_GRAPHS = {
    "n1": {"width": 500, "height": 333, "location": "kitchen", "objects": {
        "11": {"name": "cup", "x": 50, "y": 100, "w": 100, "h": 80, "attributes": ["white"],
               "relations": [{"name": "to the left of", "object": "12"}]},
        "12": {"name": "plate", "x": 300, "y": 120, "w": 150, "h": 60, "attributes": [], "relations": []},
        "13": {"name": "table", "x": 0, "y": 200, "w": 500, "h": 140, "attributes": ["wooden"], "relations": []}}},
}
CUP, PLATE, TABLE = [0.1, 0.3003, 0.3, 0.5405], [0.6, 0.3604, 0.9, 0.5405], [0.0, 0.6006, 1.0, 1.0]


def test_gqa_questions_get_the_boxes_of_the_objects_their_annotations_name():
    records, counts = gqa_records(GQA_QUESTIONS, GQA_SCENE_GRAPHS)
    assert [r["id"] for r in records] == ["201", "202", "203"]
    cup = records[0]
    assert cup["image"] == "gqa/images/n1.jpg" and cup["relevant_boxes"] == [CUP, PLATE]  # the cup once, then the plate
    assert cup["conversations"] == [
        {"from": "human", "value": "<image>\nWhat color is the cup to the left of the plate?\n"
                                   "Answer the question using a single word or phrase."},
        {"from": "gpt", "value": "white"}]
    assert "relevant_boxes" not in records[1] and "relevant_boxes" not in records[2]  # no object; no scene graph
    assert counts == {"with boxes": 1, "without boxes": 2, "no scene graph": 1}
    with_others, _ = gqa_records(GQA_QUESTIONS, GQA_SCENE_GRAPHS, prompt="", distractors=True)
    assert with_others[0]["distractor_boxes"] == [TABLE]  # the image's other objects
    assert with_others[0]["conversations"][0]["value"].endswith("plate?")


def write_images(folder, sizes: dict):
    for path, size in sizes.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size).save(folder / path)


def test_the_gqa_script_writes_a_file_that_trains_with_its_boxes(tmp_path):
    (tmp_path / "questions.json").write_text(json.dumps(GQA_QUESTIONS))
    (tmp_path / "graphs.json").write_text(json.dumps(GQA_SCENE_GRAPHS))
    write_images(tmp_path, {"gqa/images/n1.jpg": (500, 333), "gqa/images/n2.jpg": (320, 240)})
    out = tmp_path / "gqa.json"
    assert gqa_to_llava.main([str(tmp_path / "questions.json"), str(tmp_path / "graphs.json"), "--out", str(out)]) == 0
    data = LlavaInstructionDataset(out, tmp_path)
    assert len(data) == 3 and data.labelled == 1
    assert data[0].relevance.relevant == (tuple(CUP), tuple(PLATE)) and data[1].relevance is None
    with pytest.raises(SystemExit):  # the files swapped: refused with the format named
        gqa_to_llava.main([str(tmp_path / "graphs.json"), str(tmp_path / "questions.json"), "--out", str(out)])


# LLaVA-1.5's mixture: RefCOCO and Visual Genome records write regions in fractions of the padded square image
GROUNDING_RECORDS = [
    {"id": "refcoco-1", "image": "coco/train2017/wide.jpg", "conversations": [
        {"from": "human", "value": "<image>\nPlease provide the bounding box coordinate of the region this sentence "
                                   "describes: man in red."},
        {"from": "gpt", "value": "[0.27, 0.35, 0.52, 0.87]"},
        {"from": "human", "value": "Please provide a short description for this region: [0.0, 0.0, 0.5, 0.1]"},
        {"from": "gpt", "value": "sky above the padding"}]},
    {"id": "vg-2", "image": "vg/VG_100K/tall.jpg", "conversations": [
        {"from": "human", "value": "<image>\nPlease provide a short description for this region: [0.41, 0.0, 0.69, 0.45]"},
        {"from": "gpt", "value": "a red kite"}]},
    {"id": "count-3", "image": "coco/train2017/wide.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhich of [1, 2, 3, 4] is the number of dogs?"},
        {"from": "gpt", "value": "2"}]},
    {"id": "text-only-4", "conversations": [{"from": "human", "value": "Say [0.1, 0.2, 0.3, 0.4]."},
                                            {"from": "gpt", "value": "[0.1, 0.2, 0.3, 0.4]"}]},
]
SIZES = {"coco/train2017/wide.jpg": (640, 480), "vg/VG_100K/tall.jpg": (300, 400)}


def test_boxes_in_the_padded_square_move_onto_the_image():
    # 640 x 480 sits 80 px below the top of a 640 square; 300 x 400 sits 50 px right of the left of a 400 square
    assert unpadded_box((0.27, 0.35, 0.52, 0.87), 640, 480) == (0.27, 0.3, 0.52, 0.9933)
    assert unpadded_box((0.41, 0.0, 0.69, 0.45), 300, 400) == (0.38, 0.0, 0.7533, 0.45)
    assert unpadded_box((0.0, 0.0, 0.5, 0.1), 640, 480) is None  # all in the padding above the image
    assert unpadded_box((0.2, 0.1, 0.4, 0.6), 500, 500) == (0.2, 0.1, 0.4, 0.6)  # a square image has no padding


def test_grounding_records_get_the_regions_their_conversations_write():
    records = json.loads(json.dumps(GROUNDING_RECORDS))
    counts = add_grounding_boxes(records, SIZES.get)
    assert records[0]["relevant_boxes"] == [[0.27, 0.3, 0.52, 0.9933]]  # the region in the padding is dropped
    assert records[1]["relevant_boxes"] == [[0.38, 0.0, 0.7533, 0.45]]
    assert "relevant_boxes" not in records[2] and "relevant_boxes" not in records[3]  # no box; no image
    assert records[0]["conversations"] == GROUNDING_RECORDS[0]["conversations"]  # the text keeps its boxes
    assert counts == {"given boxes": 2, "regions outside the image": 1, "bracketed numbers that are no box": 1}
    unpadded = json.loads(json.dumps(GROUNDING_RECORDS))
    add_grounding_boxes(unpadded, None, padded=False)
    assert unpadded[0]["relevant_boxes"] == [[0.27, 0.35, 0.52, 0.87], [0.0, 0.0, 0.5, 0.1]]


def test_the_grounding_script_reads_the_image_sizes_and_the_result_trains(tmp_path):
    write_images(tmp_path, SIZES)
    source, out = tmp_path / "mix.json", tmp_path / "mix_boxes.json"
    source.write_text(json.dumps(GROUNDING_RECORDS))
    assert grounding_boxes.main([str(source), "--image-folder", str(tmp_path), "--out", str(out)]) == 0
    data = LlavaInstructionDataset(out, tmp_path)
    assert data.labelled == 2 and data.text_only == 1
    assert data[1].relevance.relevant == ((0.38, 0.0, 0.7533, 0.45),)
    with pytest.raises(SystemExit):  # padded boxes need the images' sizes
        grounding_boxes.main([str(source), "--out", str(out)])


# TextVQA: questions with ten answers, and the Rosetta OCR tokens with boxes in fractions of the image
TEXTVQA_QUESTIONS = {"dataset_name": "textvqa", "dataset_type": "train", "dataset_version": "0.5.1", "data": [
    {"question": "what brand is the soda?", "image_id": "t1", "image_classes": ["Tin can"], "image_width": 1024,
     "image_height": 768, "answers": ["coca cola"] * 6 + ["coca-cola"] * 3 + ["coke"], "question_id": 34602,
     "set_name": "train", "flickr_original_url": "", "flickr_300k_url": "", "question_tokens": ["what", "brand"]},
    {"question": "what is the price?", "image_id": "t1", "answers": ["$2"] * 10, "question_id": 34603},
    {"question": "what does the sign say?", "image_id": "t2", "answers": ["stop"] * 10, "question_id": 34604},
]}
TEXTVQA_OCR = {"dataset_name": "textvqa", "data": [
    {"image_id": "t1", "ocr_tokens": ["Coca-Cola", "the", "drink", "1"], "ocr_info": [
        {"word": "Coca-Cola", "bounding_box": {"top_left_x": 0.1, "top_left_y": 0.2, "width": 0.3, "height": 0.1,
                                               "rotation": 0, "roll": 0, "pitch": 0, "yaw": 0}},
        {"word": "the", "bounding_box": {"top_left_x": 0.5, "top_left_y": 0.5, "width": 0.05, "height": 0.04}},
        {"word": "drink", "bounding_box": {"top_left_x": 0.6, "top_left_y": 0.7, "width": 0.2, "height": 0.05}},
        {"word": "2", "bounding_box": {"top_left_x": 0.9, "top_left_y": 0.9, "width": 0.2, "height": 0.2}}]},
]}


def test_textvqa_questions_get_the_ocr_tokens_that_spell_their_answer():
    records, counts = textvqa_records(TEXTVQA_QUESTIONS, TEXTVQA_OCR)
    soda, price, sign = records
    assert soda["image"] == "textvqa/train_images/t1.jpg" and soda["conversations"][1]["value"] == "coca cola"
    assert soda["relevant_boxes"] == [[0.1, 0.2, 0.4, 0.3]]  # every word of the token is the answer's
    assert price["relevant_boxes"] == [[0.9, 0.9, 1.0, 1.0]]  # "$2" is the word "2"; the box clipped to the image
    assert "relevant_boxes" not in sign  # no OCR for its image
    assert counts == {"with boxes": 2, "without boxes": 1, "no OCR for the image": 1}
    with_others, _ = textvqa_records(TEXTVQA_QUESTIONS, TEXTVQA_OCR, distractors=True)
    assert with_others[0]["distractor_boxes"] == [[0.5, 0.5, 0.55, 0.54], [0.6, 0.7, 0.8, 0.75], [0.9, 0.9, 1.0, 1.0]]


def test_the_textvqa_script_writes_a_file_that_trains_with_its_boxes(tmp_path):
    (tmp_path / "questions.json").write_text(json.dumps(TEXTVQA_QUESTIONS))
    (tmp_path / "ocr.json").write_text(json.dumps(TEXTVQA_OCR))
    write_images(tmp_path, {"textvqa/train_images/t1.jpg": (1024, 768), "textvqa/train_images/t2.jpg": (640, 640)})
    out = tmp_path / "textvqa.json"
    assert textvqa_to_llava.main([str(tmp_path / "questions.json"), str(tmp_path / "ocr.json"), "--out", str(out),
                                  "--distractors"]) == 0
    data = LlavaInstructionDataset(out, tmp_path)
    assert data.labelled == 2 and data[0].relevance.distractors == ((0.5, 0.5, 0.55, 0.54), (0.6, 0.7, 0.8, 0.75),
                                                                     (0.9, 0.9, 1.0, 1.0))


def test_a_record_with_a_malformed_box_is_a_bad_record(tmp_path):
    write_images(tmp_path, {"a.jpg": (40, 30)})
    turn = [{"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "a cup"}]
    records = [{"id": "flipped", "image": "a.jpg", "conversations": turn, "relevant_boxes": [[0.5, 0.1, 0.2, 0.4]]},
               {"id": "pixels", "image": "a.jpg", "conversations": turn, "relevant_boxes": [[10, 5, 20, 15]]},
               {"id": "not-a-list", "image": "a.jpg", "conversations": turn, "distractor_boxes": "0.1 0.2 0.3 0.4"},
               {"id": "fine", "image": "a.jpg", "conversations": turn, "relevant_boxes": [[0.1, 0.2, 0.3, 0.4]]}]
    (tmp_path / "bad.json").write_text(json.dumps(records))
    with pytest.raises(BadSampleError) as err:
        LlavaInstructionDataset(tmp_path / "bad.json", tmp_path)
    assert "3 bad record(s)" in str(err.value) and "'relevant_boxes'[0] is [0.5, 0.1, 0.2, 0.4]" in str(err.value)
    assert "'pixels'" in str(err.value) and "'not-a-list'" in str(err.value) and "'fine'" not in str(err.value)


def test_a_converter_writes_in_place_and_a_failed_write_leaves_the_old_file(tmp_path):
    source = tmp_path / "mix.json"
    source.write_text(json.dumps(GROUNDING_RECORDS))
    assert grounding_boxes.main([str(source), "--unpadded", "--out", str(source)]) == 0  # the input, rewritten
    converted = json.loads(source.read_text())
    assert converted[1]["relevant_boxes"] and len(converted) == len(GROUNDING_RECORDS)
    with pytest.raises(TypeError):  # a record JSON cannot hold: nothing is written
        write_records(source, [{"boxes": {0.1}}], {})
    assert json.loads(source.read_text()) == converted and [p.name for p in tmp_path.iterdir()] == ["mix.json"]
    none = tmp_path / "none.json"
    assert write_records(none, [], {}) == f"wrote {none}: 0 records (no boxes found)"
