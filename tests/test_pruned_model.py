"""Save a trained pruned model, load it from a script, check shapes before weights, answer questions."""

import base64
import json
import shutil
import stat

import pytest
import torch

from data.synthetic_vqa import SyntheticVQADataset
from tests.helpers import llava_like
from trainers.inference.pruned_model import CONFIG_FILE, PrunedModel, PrunedModelError, backbone_record, load_pruned


def test_training_writes_loadable_folders_and_the_round_trip_is_exact(finished_tiny_run, tmp_path):
    for saved in ("pruned_best", "pruned_final"):
        assert (finished_tiny_run / saved / CONFIG_FILE).is_file()
    data = SyntheticVQADataset(4, "eval", seed=5)
    images, questions = [s.image for s in data], [s.question for s in data]
    from_run = load_pruned(finished_tiny_run)  # a run folder: its pruned_best/
    first = from_run.answer(images, questions, max_new_tokens=3)
    from_run.save_pretrained(tmp_path / "shared")
    again = load_pruned(tmp_path / "shared")
    assert again.answer(images, questions, max_new_tokens=3) == first
    for a, b in zip(from_run.model.pruners.parameters(), again.model.pruners.parameters()):
        assert torch.equal(a, b)
    step = load_pruned(finished_tiny_run / "checkpoints" / "training_state_step_4.pt")  # a step
    assert step.model.stage_budgets == from_run.model.stage_budgets
    inputs = from_run.processor(images=images, text=from_run.prompts(questions), padding=True, return_tensors="pt")
    answers, prefill = from_run.generate(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], 3)
    assert answers == first and prefill.vision_tokens_per_layer[-1] == from_run.model.stage_budgets[-1]


def test_a_backbone_of_other_shapes_is_refused_before_its_weights_load(finished_tiny_run, tmp_path, monkeypatch):
    model, processor = llava_like(96, 8, text_layers=6, seed=4)  # 6 decoder layers instead of 4
    other = tmp_path / "other"
    model.save_pretrained(other)
    processor.save_pretrained(other)
    from models.llava_backbone import LlavaBackbone

    monkeypatch.setattr(LlavaBackbone, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("weights loaded")))
    with pytest.raises(PrunedModelError, match=r"other shapes than .*other: num_layers 4 \(saved\) vs 6"):
        load_pruned(finished_tiny_run / "pruned_final", backbone=str(other))


def test_nothing_to_load_is_named(tmp_path):
    with pytest.raises(PrunedModelError, match="does not exist"):
        load_pruned(tmp_path / "absent")
    with pytest.raises(PrunedModelError, match="holds no saved pruned model"):
        load_pruned(tmp_path)
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / CONFIG_FILE).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(PrunedModelError, match="format version 99"):
        load_pruned(saved)


def test_predict_prints_the_answer_and_draws_the_kept_patches(finished_tiny_run, tmp_path, capsys):
    from scripts import predict

    image = tmp_path / "image.png"
    SyntheticVQADataset(1, "eval", seed=5)[0].image.save(image)
    out = tmp_path / "kept.png"
    assert predict.main(["--model", str(finished_tiny_run), "--image", str(image), "--question", "what color ?",
                         "--out", str(out), "--max-new-tokens", "2"]) == 0
    printed = capsys.readouterr().out
    model = load_pruned(finished_tiny_run).model
    counts = " → ".join(str(c) for c in [144, model.merged_tokens, *model.stage_budgets])
    assert "answer: " in printed and f"vision tokens: {counts} (merger" in printed and "saved" in printed
    assert out.read_bytes()[:4] == b"\x89PNG"
    # a folder gets kept_tokens.png in it, a name without a suffix .png, and the line printed names that file
    assert predict.picture_path(tmp_path) == tmp_path / "kept_tokens.png"
    assert predict.picture_path(tmp_path / "new" / "kept") == tmp_path / "new" / "kept.png"
    assert predict.main(["--model", str(tmp_path / "absent"), "--image", str(image), "--question", "q"]) == 2


def test_hard_mode_runs_at_the_temperature_training_ended_at(finished_tiny_run):
    meta = json.loads((finished_tiny_run / "pruned_final" / CONFIG_FILE).read_text())
    config = meta["config"]["method_settings"]
    assert meta["temperature"] == config["temperature_min"] != config["temperature"]  # annealed over half the steps
    for source in (finished_tiny_run / "pruned_final", finished_tiny_run / "checkpoints" / "training_state_step_4.pt"):
        assert load_pruned(source).model.temperature == meta["temperature"], source
    pruned = load_pruned(finished_tiny_run / "pruned_final")
    data = SyntheticVQADataset(4, "eval", seed=5)
    inputs = pruned.processor(images=[s.image for s in data], text=pruned.prompts([s.question for s in data]),
                              padding=True, return_tensors="pt")
    run = lambda **tau: pruned.model(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                                     mode="hard", **tau).logits
    with torch.no_grad():
        default, trained, first = run(), run(tau=meta["temperature"]), run(tau=config["temperature"])
    assert torch.equal(default, trained)
    assert not torch.allclose(default, first, atol=1e-4)  # the merger's soft assignment depends on it
    answers, prefill = pruned.generate(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"], 1)
    assert torch.equal(prefill.logits, default)  # generation's prefill too


def test_a_saved_folder_is_shareable_loads_from_anywhere_and_has_a_model_card(finished_tiny_run, tiny_folder, tmp_path,
                                                                              monkeypatch):
    shared = tmp_path / "copied" / "model"
    shutil.copytree(finished_tiny_run / "pruned_best", shared)
    monkeypatch.chdir(tmp_path)  # another working directory, another folder
    model = PrunedModel.from_pretrained(str(shared))
    data = SyntheticVQADataset(2, "eval", seed=5)
    assert len(model.answer([s.image for s in data], [s.question for s in data], max_new_tokens=2)) == 2
    model.save_pretrained(tmp_path / "resaved")
    resaved = tmp_path / "resaved"
    assert sorted(p.name for p in resaved.iterdir()) == ["README.md", CONFIG_FILE, "pruning_modules.safetensors"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in resaved.iterdir())
    card = (resaved / "README.md").read_text()
    meta = json.loads((resaved / CONFIG_FILE).read_text())
    assert meta["backbone"]["name_or_path"] == str(tiny_folder.resolve()) and meta["evaluation"]["accuracy_hard"] >= 0
    assert str(tiny_folder.resolve()) in card and "| accuracy_hard |" in card and "PrunedModel.from_pretrained" in card


def test_a_backbone_recorded_by_hub_id_or_path(tmp_path):
    snapshot = tmp_path / "hub" / "models--llava-hf--llava-1.5-7b-hf" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert backbone_record(str(snapshot)) == {"name_or_path": str(snapshot), "hub_id": "llava-hf/llava-1.5-7b-hf"}
    assert backbone_record("llava-hf/llava-1.5-7b-hf") == {"name_or_path": "llava-hf/llava-1.5-7b-hf",
                                                           "hub_id": "llava-hf/llava-1.5-7b-hf"}
    local = tmp_path / "mine"
    local.mkdir()
    assert backbone_record(str(local)) == {"name_or_path": str(local.resolve()), "hub_id": None}


def test_a_model_whose_backbone_is_elsewhere_says_what_to_pass(finished_tiny_run, tiny_folder, tmp_path):
    moved = tmp_path / "model"
    shutil.copytree(finished_tiny_run / "pruned_final", moved)
    meta = json.loads((moved / CONFIG_FILE).read_text())
    meta["backbone"]["name_or_path"] = str(tmp_path / "gone")
    (moved / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(PrunedModelError, match=r"is not on this machine \(.*gone\): pass backbone="):
        PrunedModel.from_pretrained(str(moved))
    assert PrunedModel.from_pretrained(str(moved), backbone=str(tiny_folder)).model.stage_budgets


def test_push_to_hub_uploads_the_saved_folder(finished_tiny_run, monkeypatch):
    """Offline: the hub's HTTP API answered by a mock transport; what the commit carries is what save_pretrained
    writes."""
    try:
        import httpx2 as httpx  # the HTTP client huggingface_hub 2.x uses
    except ImportError:
        import httpx
    import huggingface_hub
    from huggingface_hub.utils import _http

    uploaded, calls = {}, []

    def hub(request):
        calls.append(request.url.path)
        if request.url.path == "/api/repos/create":
            return httpx.Response(200, json={"url": "https://huggingface.co/me/pruned", "name": "me/pruned"})
        if request.url.path == "/api/validate-yaml":  # the model card's metadata
            return httpx.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in request.url.path:
            return httpx.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False}
                                                       for f in json.loads(request.content)["files"]]})
        if "/commit/" in request.url.path:
            for line in request.content.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    uploaded[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return httpx.Response(200, json={"commitUrl": "https://huggingface.co/me/pruned/commit/1",
                                             "commitOid": "1" * 40, "pullRequestUrl": None})
        return httpx.Response(404, json={"error": "not part of an upload"})

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    huggingface_hub.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(hub)))
    try:
        model = PrunedModel.from_pretrained(str(finished_tiny_run / "pruned_final"))
        model.push_to_hub("me/pruned", token="hf_test")
    finally:
        huggingface_hub.set_client_factory(_http.default_client_factory)
    assert "/api/repos/create" in calls
    assert sorted(uploaded) == ["README.md", CONFIG_FILE, "pruning_modules.safetensors"]
    assert uploaded[CONFIG_FILE] == (finished_tiny_run / "pruned_final" / CONFIG_FILE).read_bytes()
