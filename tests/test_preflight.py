"""Bad input and faults: one line 'error: what (where): fix', exit 2, before any weight loads, nothing overwritten."""

import json
import shutil

import pytest
import torch

import main as entry
from data.synthetic_vqa import make_sample
from models.llava_backbone import LlavaBackbone
from tests.helpers import llava_like, main_args
from trainers import checkpoint
from trainers.checkpoint import CheckpointError, atomic_save


@pytest.fixture
def no_weights(monkeypatch):
    """Loading the backbone's weights fails the test: every check here must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the backbone's weights were loaded before the input was checked")

    monkeypatch.setattr(LlavaBackbone, "from_pretrained", classmethod(refuse))


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def copy_run(finished_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    return out


@pytest.mark.parametrize("make, expected", [
    (lambda tmp: tmp / "absent", "no such backbone folder"),
    (lambda tmp: tmp, "the backbone folder has no config.json"),
])
def test_missing_or_empty_backbone_folder(tmp_path, capsys, no_weights, make, expected):
    folder = make(tmp_path)
    args, _ = main_args(tmp_path, folder)
    assert entry.main(args) == 2
    err = one_error(capsys)
    assert expected in err and "hf download" not in err and "python main.py --config configs/tiny.yaml" in err


def test_backbone_without_processor_files(tmp_path, tiny_folder, capsys, no_weights):
    folder = tmp_path / "weights-only"
    shutil.copytree(tiny_folder, folder)
    for name in ("preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)
    args, _ = main_args(tmp_path, folder)
    assert entry.main(args) == 2
    assert "has no image processor and no tokenizer files" in one_error(capsys)


def test_output_dir_that_is_a_file(tmp_path, tiny_folder, capsys, no_weights):
    args, out = main_args(tmp_path, tiny_folder)
    out.write_text("not a folder")
    assert entry.main(args) == 2
    assert "output_dir is a file, not a folder" in one_error(capsys)
    assert out.read_text() == "not a folder"


def test_output_dir_on_a_read_only_disk(tmp_path, tiny_folder, capsys, no_weights, monkeypatch):
    """As root every folder is writable; the write probe is what meets a read-only mount, so it fails here."""
    import errno

    from trainers.training import preflight

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(preflight.tempfile, "TemporaryFile", read_only)
    args, _ = main_args(tmp_path, tiny_folder)
    assert entry.main(args) == 2
    err = one_error(capsys)
    assert "cannot write in manager_settings.output_dir (Read-only file system)" in err and "writable disk" in err


def test_resume_of_a_truncated_file_and_auto_falls_back(tmp_path, finished_tiny_run, tiny_folder, capsys,
                                                         monkeypatch):
    out = copy_run(finished_tiny_run, tmp_path)
    latest = out / "checkpoints" / "training_state_step_4.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    args, _ = main_args(tmp_path, tiny_folder, "--resume", str(latest))
    monkeypatch.setattr(LlavaBackbone, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("weights loaded")))
    assert entry.main(args) == 2
    assert "the checkpoint cannot be read (truncated or not a checkpoint)" in one_error(capsys)
    monkeypatch.undo()
    args, _ = main_args(tmp_path, tiny_folder, "--resume", "auto")
    assert entry.main(args) == 0  # step 2 is read instead; the run ends at step 4 again
    assert "Resumed from " in capsys.readouterr().out and "training_state_step_2.pt at step 2" in (
        out / "logs" / "training.log").read_text()


def test_resume_of_a_module_file(tmp_path, finished_tiny_run, tiny_folder, capsys, no_weights):
    out = copy_run(finished_tiny_run, tmp_path)
    args, _ = main_args(tmp_path, tiny_folder, "--resume", str(out / "checkpoints" / "token_merger_step_2.pt"))
    assert entry.main(args) == 2
    err = one_error(capsys)
    assert "the token_merger module's state_dict, not a training state" in err and "training_state_step_2.pt" in err


@pytest.mark.parametrize("override, key", [
    ({"method_settings.pruning_layers": "[1,3]", "method_settings.pruner_keep_ratios": "[0.7,0.7]"},
     "method_settings.pruning_layers: [1, 2, 3] -> [1, 3]"),
    ({"trainer_settings.dl_settings.batch_size": 2}, "trainer_settings.dl_settings.batch_size: 4 -> 2"),
])
def test_resume_with_another_config_names_the_keys_and_changes_nothing(tmp_path, finished_tiny_run, tiny_folder,
                                                                        capsys, no_weights, override, key):
    out = copy_run(finished_tiny_run, tmp_path)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args, _ = main_args(tmp_path, tiny_folder, "--resume", "auto", **override)
    assert entry.main(args) == 2
    err = one_error(capsys)
    assert "the checkpoint was trained with another config" in err and key in err
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # resolved_config.yaml too


def test_a_full_disk_leaves_the_old_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "training_state_step_2.pt"
    atomic_save({"old": 1}, path)

    def disk_full(obj, f):
        open(f, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint: \[enforce fail.*free space"):
        atomic_save({"new": 2}, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert torch.load(path) == {"old": 1}


# ----------------------------------------------------------------------------- LLaVA instruction data
def llava_json(tmp_path, records, images=("img0.png",)):
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(images):
        make_sample(0, "train", i).image.save(folder / name)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return {"data_settings.source": "llava_json", "method_settings.relevance_weight": 0,  # no labels in such files
            "data_settings.train_json": str(path),
            "data_settings.eval_json": str(path), "data_settings.image_folder": str(folder)}


def record(sample_id, image="img0.png", question="what color is the object in the top row ?", answer="red"):
    return {"id": sample_id, "image": image,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


@pytest.mark.parametrize("bad, expected", [
    (record("m", image="absent.png"), "absent.png does not exist"),
    (record("g", image="garbage.jpg"), "garbage.jpg is not a readable image"),
    ({"id": "c", "image": "img0.png", "conversations": [{"from": "human", "value": "<image>\nq"}]},
     "at least a human and a gpt turn"),
])
def test_bad_llava_samples_fail_before_the_weights(tmp_path, tiny_folder, capsys, no_weights, bad, expected):
    data = llava_json(tmp_path, [record("a"), bad])
    (tmp_path / "images" / "garbage.jpg").write_bytes(b"\x00garbage")
    args, out = main_args(tmp_path, tiny_folder, **data)
    assert entry.main(args) == 2
    err = one_error(capsys)
    assert expected in err and repr(bad["id"]) in err and "on_bad_sample: skip" in err
    assert not (out / "resolved_config.yaml").exists()


def test_missing_data_file_fails_before_the_weights(tmp_path, tiny_folder, capsys, no_weights):
    data = llava_json(tmp_path, [record("a")])
    data["data_settings.train_json"] = str(tmp_path / "nowhere.json")
    args, _ = main_args(tmp_path, tiny_folder, **data)
    assert entry.main(args) == 2
    assert "instruction file does not exist" in one_error(capsys)


def test_question_longer_than_the_model_positions(tmp_path, tiny_folder, capsys, no_weights):
    long_question = " ".join(["what color is the object in the top row ?"] * 100)  # ~1000 words, 1024 positions
    data = llava_json(tmp_path, [record("a"), record("long", question=long_question)])
    args, _ = main_args(tmp_path, tiny_folder, **data)
    assert entry.main(args) == 2
    err = one_error(capsys)
    assert "sample 'long' takes" in err and "max_position_embeddings is 1024" in err


TURNS = (("what color is the object in the top row ?", "red"), ("is there a red circle ?", "yes"),
         ("how many blue objects are there ?", "two"), ("what shape is the red object ?", "circle"),
         ("what row is the red object in ?", "top"))


def conversation(sample_id, turns):
    values = [text for pair in turns for text in pair]
    values[0] = f"<image>\n{values[0]}"
    return {"id": sample_id, "image": "img0.png",
            "conversations": [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]}


def positions(processor, turns) -> int:
    """The positions the collator's training text of ``turns`` takes."""
    from data.collator import VQACollator
    from data.instruction_json import InstructionSample

    sample = InstructionSample("x", make_sample(0, "train", 0).image, *turns[0], turns=turns)
    return int(VQACollator(processor)([sample])["attention_mask"].sum())


def instruction_data(tmp_path, records, on_bad_sample="error"):
    from data.instruction_json import LlavaInstructionDataset

    settings = llava_json(tmp_path, records)
    return LlavaInstructionDataset(settings["data_settings.train_json"], settings["data_settings.image_folder"],
                                   on_bad_sample)


@pytest.mark.parametrize("fitting", [1, 3])
def test_long_conversations_keep_the_whole_turns_that_fit(tmp_path, processor, fitting):
    """The limit is exactly the positions of the first ``fitting`` turns (one fewer: one turn fewer fits)."""
    from tests.helpers import SHIPPED_BACKBONE
    from trainers.training.preflight import check_prompt_lengths

    limit = positions(processor, TURNS[:fitting])
    assert positions(processor, TURNS[:fitting + 1]) > limit
    data = instruction_data(tmp_path, [conversation("long", TURNS), conversation("short", TURNS[:1])])
    check_prompt_lengths(data, SHIPPED_BACKBONE, 144, limit)
    assert [r.turns for r in data.records] == [TURNS[:fitting], TURNS[:1]]
    assert data.truncated == ["long"] and data.skipped == []
    assert data[0].turns == TURNS[:fitting] and positions(processor, data[0].turns) <= limit

    data = instruction_data(tmp_path, [conversation("long", TURNS), conversation("short", TURNS[:1])])
    check_prompt_lengths(data, SHIPPED_BACKBONE, 144, limit + 1000)
    assert [r.turns for r in data.records] == [TURNS, TURNS[:1]] and data.truncated == []


def test_a_first_turn_longer_than_the_positions_is_a_bad_record(tmp_path, processor):
    from tests.helpers import SHIPPED_BACKBONE
    from trainers.training.preflight import PreflightError, check_prompt_lengths

    long_first = ((" ".join(["what color is the object in the top row ?"] * 3), "red"), *TURNS[1:])
    limit = positions(processor, long_first[:1]) - 1
    records = [conversation("a", TURNS[:2]), conversation("long", long_first), conversation("b", TURNS[:1])]
    with pytest.raises(PreflightError, match=f"1 sample\\(s\\) need more positions than the model has for their first "
                                             f"turn alone.*max_position_embeddings is {limit}\\): sample 'long' takes "
                                             f"{limit + 1} tokens .*on_bad_sample: skip"):
        check_prompt_lengths(instruction_data(tmp_path, records), SHIPPED_BACKBONE, 144, limit)
    data = instruction_data(tmp_path, records, on_bad_sample="skip")
    check_prompt_lengths(data, SHIPPED_BACKBONE, 144, limit)
    assert [r.id for r in data.records] == ["a", "b"] and data.truncated == []
    assert len(data.skipped) == 1 and "sample 'long'" in data.skipped[0] and "first turn is longer" in data.skipped[0]


def test_a_resume_continues_on_the_same_backbone_moved_elsewhere(tmp_path, tiny_folder, capsys):
    backbone, other = tmp_path / "backbone", tmp_path / "other"
    shutil.copytree(tiny_folder, backbone)
    model, processor = llava_like(96, 8, text_layers=4, seed=4)  # the same shapes and config, other weights
    model.save_pretrained(other)
    processor.save_pretrained(other)
    run = {"trainer_settings.max_steps": 2, "trainer_settings.save_every": 2, "trainer_settings.eval_every": 2}
    args, out = main_args(tmp_path, backbone, **run)
    assert entry.main(args) == 0
    moved = backbone.rename(tmp_path / "moved")
    stale, _ = main_args(tmp_path, backbone, "--resume", "auto", **run)
    assert entry.main(stale) == 2  # the old path: it is gone
    capsys.readouterr()
    elsewhere, _ = main_args(tmp_path, other, "--resume", "auto", **run)
    assert entry.main(elsewhere) == 2  # another backbone where the old one was
    err = one_error(capsys)
    assert f"the checkpoint's backbone folder {backbone} no longer exists, and {other} is not the same " \
           "backbone" in err and f"put the backbone back at {backbone}" in err
    resumed, _ = main_args(tmp_path, moved, "--resume", "auto", **{**run, "trainer_settings.max_steps": 3})
    assert entry.main(resumed) == 0
    assert "Resumed from" in capsys.readouterr().out and (out / "checkpoints" / "training_state_step_3.pt").is_file()


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_eval_of_a_saved_folder_with_broken_weights_stops_before_the_backbone_loads(tmp_path, finished_tiny_run,
                                                                                     tiny_folder, damage, no_weights,
                                                                                     capsys):
    folder = tmp_path / "pruned_best"
    shutil.copytree(finished_tiny_run / "pruned_best", folder)
    weights = folder / "pruning_modules.safetensors"
    weights.unlink() if damage == "missing" else weights.write_bytes(weights.read_bytes()[:100])
    args, _ = main_args(tmp_path, tiny_folder, "--resume", str(folder), **{"manager_settings.mode": "eval"})
    assert entry.main(args) == 2
    err = one_error(capsys)
    assert str(weights) in err and ("is missing" if damage == "missing" else "it is truncated") in err
