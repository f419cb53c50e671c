"""The real job on the tiny backbone: a LLaVA-665K-shaped file (multi-turn, text-only, grounding and broken records, a
tenth of the records with relevance boxes) trains end to end through main.py, and the held-out eval file is cut from
it."""

import json

import pytest

import main as entry
from data.collator import VQACollator
from data.instruction_json import LlavaInstructionDataset
from models.sequences import IGNORE_INDEX
from scripts import hold_out_eval
from tests.helpers import main_args, write_llava_665k_like

RUN = {"data_settings.source": "llava_json", "method_settings.relevance_weight": 1,
       "trainer_settings.max_steps": 3, "trainer_settings.eval_every": 3, "trainer_settings.save_every": 3,
       "trainer_settings.log_every": 1, "trainer_settings.dl_settings.batch_size": 4,
       "trainer_settings.dl_settings.gradient_accumulation_steps": 2}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava665k")
    return (write_llava_665k_like(folder, image_records=12, text_only=3, boxed_every=10),
            write_llava_665k_like(folder, image_records=6, text_only=1, split="eval", name="eval.json"))


def data_settings(train, evaluation, on_bad_sample):
    return {"data_settings.train_json": str(train.json_path), "data_settings.eval_json": str(evaluation.json_path),
            "data_settings.image_folder": str(train.image_folder), "data_settings.on_bad_sample": on_bad_sample}


def test_a_665k_shaped_file_trains_on_every_answer_and_counts_what_it_leaves_out(tmp_path, tiny_folder, files,
                                                                                  processor):
    train, evaluation = files
    args, out = main_args(tmp_path, tiny_folder, **RUN, **data_settings(train, evaluation, "skip"))
    assert entry.main(args) == 0
    log = (out / "logs" / "training.log").read_text()
    assert train.labelled == 2  # of 16 records: boxes on a tenth, as GQA's and RefCOCO's share of the mixture
    counts = (f"train set: {train.samples} samples, {train.labelled} with relevance boxes, {train.text_only} text-only "
              f"records skipped, {len(train.bad)} bad records skipped")
    assert log.count(counts) == 2 and log.rindex(counts) > log.index("[Summary]")  # at start-up and in the summary
    assert f"sample {train.bad[0]!r}" in log and "does not exist" in log
    assert "[Eval Step 3]" in log and (out / "pruned_final").is_dir()
    assert "pruner_relevance_loss" in log and "merge_relevance_loss" in log  # trained on the boxed records only

    # what the run trained on: every answer of every turn, and nothing else
    data = LlavaInstructionDataset(train.json_path, train.image_folder, on_bad_sample="skip")
    batch = VQACollator(processor)([data[i] for i in range(len(data))])
    answers = [[a.strip() for a in processor.tokenizer.decode(row[row != IGNORE_INDEX]).split("</s>")[:-1]]
               for row in batch["labels"]]
    assert [len(a) for a in answers] == [len(data.records[i].turns) for i in range(len(data))]
    assert sum(map(len, answers)) == train.turns and train.multi_turn > 0
    assert [a for sample in answers for a in sample] == [
        " ".join(processor.tokenizer.tokenize(answer)) for r in data.records for _, answer in r.turns]


def test_every_broken_record_is_listed_before_the_weights_load(tmp_path, tiny_folder, files, capsys, monkeypatch):
    train, evaluation = files
    records = json.loads(train.json_path.read_text())
    records += [{"id": "no-answer", "image": records[0].get("image", "x.jpg"),
                 "conversations": [{"from": "human", "value": "<image>\nwhat ?"}]},
                {"id": "two-images", "image": ["a.jpg", "b.jpg"], "conversations": records[0]["conversations"]}]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(records))
    settings = {**data_settings(train, evaluation, "error"), "data_settings.train_json": str(broken)}
    args, out = main_args(tmp_path, tiny_folder, **RUN, **settings)
    monkeypatch.setattr("models.llava_backbone.LlavaBackbone.from_pretrained",
                        lambda *a, **k: pytest.fail("the weights load before the data is checked"))
    assert entry.main(args) == 2
    err = capsys.readouterr().err
    assert "3 bad record(s)" in err
    for name in (*train.bad, "no-answer", "two-images"):
        assert repr(name) in err
    assert "on_bad_sample: skip" in err and not out.exists()


def test_relevance_weight_on_a_file_without_boxes_is_refused_before_the_weights_load(tmp_path, tiny_folder, files,
                                                                                     capsys, monkeypatch):
    train, evaluation = files
    settings = {**data_settings(train, evaluation, "skip"), "data_settings.train_json": str(evaluation.json_path)}
    args, out = main_args(tmp_path, tiny_folder, **RUN, **settings)
    monkeypatch.setattr("models.llava_backbone.LlavaBackbone.from_pretrained",
                        lambda *a, **k: pytest.fail("the weights load before the data is checked"))
    assert entry.main(args) == 2
    err = capsys.readouterr().err
    assert f"relevance_weight is 1 but no sample of {evaluation.json_path} carries relevance boxes" in err
    assert not out.exists()


def test_hold_out_eval_cuts_short_answer_questions_out_of_the_mixture(tmp_path, files):
    train, _ = files
    records = json.loads(train.json_path.read_text())
    assert hold_out_eval.main([str(train.json_path), "--out", str(tmp_path), "--size", "4"]) == 0
    kept, held = (json.loads((tmp_path / name).read_text()) for name in ("train.json", "eval.json"))
    assert len(held) == 4 and len(kept) == len(records) - 4
    assert {r["id"] for r in held}.isdisjoint(r["id"] for r in kept)
    assert all(len(r["conversations"]) == 2 and len(r["conversations"][1]["value"].split()) <= 3 for r in held)
    assert [r["id"] for r in kept] == [r["id"] for r in records if r["id"] not in {h["id"] for h in held}]
    with pytest.raises(SystemExit):
        hold_out_eval.main([str(train.json_path), "--out", str(tmp_path), "--size", str(len(records) + 1)])
