"""The tiny backbone knows only the synthetic scenes' words: a run on data it cannot read says so at start-up."""

import json

import main as entry
from tests.helpers import main_args, write_llava_665k_like
from trainers.training.world import UNKNOWN_SHARE, unknown_word_share

RUN = {"data_settings.source": "llava_json", "method_settings.relevance_weight": 0, "trainer_settings.max_steps": 1,
       "trainer_settings.eval_every": 1, "trainer_settings.save_every": 1, "trainer_settings.eval_soft": False,
       "trainer_settings.eval_baseline": False}


def test_the_share_of_unknown_words(processor):
    tokenizer = processor.tokenizer
    assert unknown_word_share(tokenizer, ["what color is the circle ?"]) == 0
    assert unknown_word_share(tokenizer, ["how many giraffes stand near the fence ?"]) == 4 / 8  # giraffes stand near fence
    assert unknown_word_share(tokenizer, []) is None


def test_a_run_on_words_the_backbone_cannot_read_warns_once(tmp_path, tiny_folder, capsys):
    data = write_llava_665k_like(tmp_path / "data", image_records=8, text_only=0)
    records = json.loads(data.json_path.read_text())
    plain = tmp_path / "plain.json"  # everyday questions: words the tiny backbone never saw
    for record in records:
        for turn in record["conversations"][::2]:
            turn["value"] = turn["value"].replace(turn["value"].replace("<image>", "").strip(),
                                                  "How many giraffes stand near the wooden fence?")
    plain.write_text(json.dumps(records))
    for path, warned in ((data.json_path, False), (plain, True)):
        settings = {**RUN, "data_settings.train_json": str(path), "data_settings.eval_json": str(data.json_path),
                    "data_settings.image_folder": str(data.image_folder), "data_settings.on_bad_sample": "skip"}
        args, _ = main_args(tmp_path / path.stem, tiny_folder, **settings)
        assert entry.main(args) == 0
        out = capsys.readouterr().out
        assert out.count("question words are unknown to the backbone's tokenizer") == warned, out
    line = next(line for line in out.splitlines() if "question words are unknown" in line)
    assert line.startswith("[WARNING] ") and int(line.split()[1].rstrip("%")) / 100 > UNKNOWN_SHARE
    assert "cannot read this data" in line and "with a real LLaVA backbone" in line
