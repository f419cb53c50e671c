import copy

import pytest
import torch

from data.build import build_datasets
from models.backbones import load_backbone
from tests.helpers import sharpen_attention, tiny_run_config
from trainers import checkpoint as checkpoint_module
from trainers.run_log import RunLog
from trainers.training import trainer as trainer_module
from trainers.training.trainer import NonFiniteLossError, Trainer


def make_trainer(tmp_path, folder, **overrides):
    config = tiny_run_config(tmp_path, folder, **overrides)
    torch.manual_seed(config.manager_settings.seed)
    backbone = load_backbone(str(folder))
    train_set, eval_set = build_datasets(config.data_settings)
    log = RunLog(tmp_path / "out" / "logs" / "training.log")
    return Trainer(config, backbone, train_set, eval_set, log, tmp_path / "out")


def first_batch(trainer):
    """The micro-batches of the first step (one without gradient accumulation)."""
    return next(trainer.train_batches())


def test_each_optimizer_owns_exactly_its_group_and_the_backbone_never_changes(tmp_path, tiny_folder):
    trainer = make_trainer(tmp_path, tiny_folder)
    groups = {name: {id(p) for g in opt.param_groups for p in g["params"]} for name, opt in trainer.optimizers.items()}
    assert groups["token_merger"] == {id(p) for p in trainer.model.merger.parameters()}
    assert groups["layer_pruners"] == {id(p) for p in trainer.model.pruners.parameters()}
    assert groups["discriminator"] == {id(p) for p in trainer.discriminator.parameters()}
    backbone_before = copy.deepcopy(trainer.backbone.state_dict())
    trainable_before = {n: p.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    data = trainer.train_batches()
    for _ in range(2):
        assert trainer.training_step(next(data)) is not None
        trainer.step += 1
    for name, value in trainer.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[name]), name
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, trainable_before[n])]
    assert any(n.startswith("merger.") for n in changed) and any(n.startswith("pruners.") for n in changed)
    assert not any(p.requires_grad for p in trainer.backbone.parameters())


def test_temperature_follows_the_schedule(tmp_path, tiny_folder):
    trainer = make_trainer(tmp_path, tiny_folder, **{"trainer_settings.max_steps": 10, "data_settings.synthetic_train_size": 64,
                                                    "method_settings.temperature_anneal_rate": 0.4})
    values = []
    data = trainer.train_batches()
    for _ in range(5):
        values.append(trainer.training_step(next(data))["temperature"])
        trainer.step += 1
    assert values == pytest.approx([1.0, 0.775, 0.55, 0.325, 0.1])


def test_disc_reinit_prob_one_reinitialises_every_step(tmp_path, tiny_folder, monkeypatch):
    trainer = make_trainer(tmp_path, tiny_folder, **{"method_settings.disc_reinit_prob": 1.0})
    resets = []
    original = trainer.discriminator.reset_parameters
    monkeypatch.setattr(trainer.discriminator, "reset_parameters", lambda: (resets.append(1), original()))
    data = trainer.train_batches()
    for _ in range(3):
        trainer.training_step(next(data))
        trainer.step += 1
        state = trainer.optimizers["discriminator"].state
        assert all(int(s["step"]) == 1 for s in state.values())  # fresh Adam state: one update since the reset
    assert len(resets) == 3


def test_nan_loss_stops_the_update_before_any_optimizer_step(tmp_path, tiny_folder, monkeypatch):
    trainer = make_trainer(tmp_path, tiny_folder, **{"trainer_settings.max_nonfinite_steps": 2})
    before = {n: p.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    monkeypatch.setattr(trainer_module, "task_loss", lambda logits, labels: logits.sum() * float("nan"))
    data = trainer.train_batches()
    batch = next(data)
    assert trainer.training_step(batch) is None
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert not trainer.optimizers["token_merger"].state and not trainer.optimizers["layer_pruners"].state
    log = (tmp_path / "out" / "logs" / "training.log").read_text()
    # numbered as the loss log numbers the step (the step is counted after training_step), naming the samples
    assert (f"[Step 1] non-finite task_loss: update skipped (1 in a row, limit 2); batch samples: "
            f"{', '.join(i for micro in batch for i in micro['ids'])}") in log
    with pytest.raises(NonFiniteLossError, match="last good state is saved"):
        trainer.training_step(next(data))
    assert trainer.checkpointer.latest() is not None


def run_steps(tmp_path, folder, steps, resume=None, **overrides):
    trainer = make_trainer(tmp_path, folder, **{"trainer_settings.max_steps": 6, "trainer_settings.eval_every": 100,
                                                "trainer_settings.save_every": 3, **overrides})
    if resume is not None:
        trainer.load_training_state(resume)
    data = trainer.train_batches()
    while trainer.step < steps:
        trainer.training_step(next(data))
        trainer.step += 1
        if trainer.step % 3 == 0:
            trainer.save()
    return trainer


def test_resume_continues_bit_for_bit(tmp_path, tiny_folder):
    straight = run_steps(tmp_path / "a", tiny_folder, 6)
    run_steps(tmp_path / "b", tiny_folder, 3)
    torch.manual_seed(12345)  # a resumed run must not depend on the RNG it starts with
    resumed = run_steps(tmp_path / "b", tiny_folder, 6, resume=tmp_path / "b" / "out" / "checkpoints" /
                        "training_state_step_3.pt")
    for name, state in straight.module_states().items():
        other = resumed.module_states()[name]
        for key, value in state.items():
            assert torch.equal(value, other[key]), (name, key)


def test_checkpoints_are_plain_state_dicts_and_rotate(tmp_path, tiny_folder):
    trainer = run_steps(tmp_path, tiny_folder, 6, **{"trainer_settings.keep_last": 1})
    folder = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{n}_step_6.pt" for n in ("token_merger", "layer_pruners", "discriminator", "training_state"))
    merger = copy.deepcopy(trainer.model.merger)
    for parameter in merger.parameters():
        torch.nn.init.zeros_(parameter)
    merger.load_state_dict(torch.load(folder / "token_merger_step_6.pt"))  # the seed guide's way
    for name, value in trainer.model.merger.state_dict().items():
        assert torch.equal(merger.state_dict()[name], value), name
    trainer.model.pruners.load_state_dict(torch.load(folder / "layer_pruners_step_6.pt", weights_only=True))
    trainer.discriminator.load_state_dict(torch.load(folder / "discriminator_step_6.pt", weights_only=True))


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, tiny_folder, monkeypatch):
    trainer = run_steps(tmp_path, tiny_folder, 3, **{"trainer_settings.keep_last": 1})
    folder = tmp_path / "out" / "checkpoints"
    calls = []

    def crashing_save(obj, path):
        calls.append(path)
        if len(calls) == 2:  # die while writing the second file of the new step
            path.write_bytes(b"half a file")
            raise KeyboardInterrupt("killed")
        return real_save(obj, path)

    real_save = torch.save
    monkeypatch.setattr(checkpoint_module.torch, "save", crashing_save)
    trainer.step = 6
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.undo()
    assert trainer.checkpointer.latest().name == "training_state_step_3.pt"
    state = checkpoint_module.load(folder / "training_state_step_3.pt")
    assert state["step"] == 3
    for name in ("token_merger", "layer_pruners", "discriminator"):
        torch.load(folder / f"{name}_step_3.pt", weights_only=True)
    assert not (folder / "layer_pruners_step_6.pt").exists()  # the half-written file never got its final name


@pytest.mark.parametrize("merger_type", ["simple", "question_aware"])
def test_importance_losses_are_logged_and_train_merger_and_pruners_towards_the_teacher(tmp_path, tiny_folder,
                                                                                      merger_type):
    only_importance = {f"method_settings.{k}": 0.0 for k in
                       ("task_loss_weight", "adv_loss_weight", "merge_sparsity_weight", "pruner_sparsity_weight",
                        "distill_weight", "relevance_weight")}
    trainer = make_trainer(tmp_path, tiny_folder, **only_importance, **{"method_settings.merge_importance_weight": 1.0,
                                                                        "method_settings.pruner_importance_weight": 1.0,
                                                                        "method_settings.merger_type": merger_type})
    sharpen_attention(trainer.backbone.layers)  # else the teacher's attention is flat: nothing to learn
    batch = first_batch(trainer)
    names = ("merge_importance_loss", "pruner_importance_loss")
    history = []
    for _ in range(6):
        values = trainer.training_step(batch)
        history.append([values[n] for n in names])
        trainer.step += 1
    for name, losses in zip(names, zip(*history)):
        # every step lowers it, in all by far more than float32 rounding (the question-aware merger's by about 8e-4
        # over the 6 steps from its random start, the others' by more)
        assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 2e-4, (name, history)
    trainer.log_step(values)
    text = (tmp_path / "out" / "logs" / "training.log").read_text()
    assert all(name in text for name in names)


@pytest.mark.parametrize("merger_type,ranking", [("simple", "last"), ("question_aware", "last"),
                                                  ("question_aware", "below_relevant")])
def test_relevance_labels_rank_the_distractors_below_the_asked_tokens_or_last(tmp_path, tiny_folder, monkeypatch,
                                                                             merger_type, ranking):
    trainer = make_trainer(tmp_path, tiny_folder, **{"method_settings.relevance_weight": 1.0,
                                                     "method_settings.relevance_ranking": ranking,
                                                     "method_settings.merger_type": merger_type,
                                                     "method_settings.merge_importance_weight": 1.0,
                                                     "method_settings.pruner_importance_weight": 1.0})
    seen = {}

    def recording(name, loss, index):
        def wrapped(*args):
            seen[name] = args[index]
            return loss(*args)
        return wrapped

    for name, index in [("pruner_importance_loss", 2), ("merge_importance_loss", 1), ("relevance_loss", -1),
                        ("pruner_relevance_loss", -1)]:
        monkeypatch.setattr(trainer_module, name, recording(name, getattr(trainer_module, name), index))
    (batch,) = micro_batches = first_batch(trainer)
    values = trainer.training_step(micro_batches)
    distractors, asked, labelled = trainer.relevance_labels(batch)  # (B, 144): the scenes' boxes on the patch grid
    assert labelled.all() and distractors.any(dim=1).sum() >= 2  # the batch has distractors to drop
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        attention = trainer.teacher(ids, batch["pixel_values"], mask, labels=labels, record_attention=True).vision_attention
    assert (attention > 0).all()
    # last: a zero importance target at the distractors, pushed below every other token's median; below_relevant:
    # the teacher's attention everywhere, pushed below the asked tokens' median
    target = torch.where(distractors, 0.0, attention) if ranking == "last" else attention
    assert torch.equal(seen["pruner_importance_loss"], target)
    reference = seen["pruner_relevance_loss"]
    assert reference is None if ranking == "last" else torch.equal(reference, asked)
    # a question-blind merger cannot know what is asked: it keeps learning the teacher's attention, with no push
    aware = merger_type == "question_aware"
    assert torch.equal(seen["merge_importance_loss"], target if aware else attention)
    assert values["pruner_relevance_loss"] > 0 and ("merge_relevance_loss" in values) == aware
    assert ("relevance_loss" in seen) == aware


def test_relevance_weight_without_boxes_in_the_data_is_refused(tmp_path, tiny_folder):
    with pytest.raises(ValueError, match="relevance_weight is 1 but no sample of the synthetic train set"):
        make_trainer(tmp_path, tiny_folder, **{"method_settings.relevance_weight": 1.0,
                                               "data_settings.synthetic_labelled_fraction": 0.0})


def test_relevance_weight_without_boxes_stops_main_before_the_weights_load(tmp_path, tiny_folder, monkeypatch, capsys):
    import main as entry
    from models import llava_backbone
    from tests.helpers import main_args

    monkeypatch.setattr(llava_backbone.LlavaBackbone, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    args, out = main_args(tmp_path, tiny_folder, **{"method_settings.relevance_weight": 1.0,
                                                    "data_settings.synthetic_labelled_fraction": 0.0})
    assert entry.main(args) == 2
    err = capsys.readouterr().err
    assert "relevance_weight is 1 but no sample of" in err and "set it to 0, or add boxes" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_partly_labelled_train_set_trains_its_relevance_losses_on_the_labelled_samples(tmp_path, tiny_folder):
    trainer = make_trainer(tmp_path, tiny_folder, **{"method_settings.relevance_weight": 1.0,
                                                     "data_settings.synthetic_labelled_fraction": 0.3,
                                                     "trainer_settings.dl_settings.gradient_accumulation_steps": 2})
    micro_batches = first_batch(trainer)
    counts = [int(trainer.relevance_labels(b).labelled.sum()) for b in micro_batches]
    assert [len(b["ids"]) for b in micro_batches] == [2, 2] and 0 < sum(counts) < 4
    assert trainer.labelled_per_batch(micro_batches) == sum(counts) / 2
    values = trainer.training_step(micro_batches)
    assert values is not None and values["pruner_relevance_loss"] > 0
