import pytest
import torch
from torch import nn

from data.collator import VQACollator
from data.synthetic_vqa import SyntheticVQADataset
from models.layer_pruner import build_pruner
from models.llava_backbone import LlavaBackbone
from models.pruned_llava import PrunedLlava, question_token_mask
from models.sequences import IGNORE_INDEX
from models.token_merger import TokenMerger
from tests.helpers import llava_like
from trainers.inference.evaluation import generate_pruned

LAYERS = [1, 2, 3]


class FixedPruner(nn.Module):
    """Keep logits +a for every vision token whose rank in the sequence is not a multiple of `every`, -a else
    (`every=None`: keep all)."""

    def __init__(self, every: int | None, magnitude: float = 30.0):
        super().__init__()
        self.every, self.magnitude = every, magnitude

    def forward(self, vision, question, question_mask):
        n = vision.shape[1]
        keep = torch.ones(n, dtype=torch.bool) if self.every is None else torch.arange(n) % self.every != 0
        return torch.where(keep, self.magnitude, -self.magnitude).expand(vision.shape[0], n).clone()


@pytest.fixture(scope="module")
def tiny():
    model, processor = llava_like(96, 8, text_layers=4, seed=1)
    return LlavaBackbone(model, processor)


def make_batch(tiny, with_answers=True, n=3):
    data = SyntheticVQADataset(n, "eval", seed=2)
    return VQACollator(tiny.processor, with_answers=with_answers)([data[i] for i in range(n)])


def learned(tiny, budgets=(50, 35, 20), merger_keep=72, merger_type="simple", pruner_type="cross_attention"):
    torch.manual_seed(0)
    D = tiny.hidden_size
    merger = None if merger_keep is None else TokenMerger(tiny.vision_hidden_size, D, merger_keep, merger_keep / 144,
                                                          merger_type, hidden=32, num_heads=2)
    pruners = nn.ModuleList(build_pruner(pruner_type, D, 16, 2) for _ in budgets)
    model = PrunedLlava(tiny, merger, pruners, LAYERS[:len(budgets)], list(budgets))
    for p in [*model.pruners.parameters(), *(merger.parameters() if merger else [])]:
        nn.init.normal_(p, std=0.5)  # away from the keep-everything start, so choices differ between tokens
    return model


def fixed(tiny, every=(3, 4, 5), merger_keep=None, proportional=False):
    """Pruners with known choices: stage s drops every `every[s]`-th vision token; optionally a (random) merger,
    with proportional attention or not."""
    merger = None
    if merger_keep is not None:
        torch.manual_seed(0)
        merger = TokenMerger(tiny.vision_hidden_size, tiny.hidden_size, merger_keep, merger_keep / 144, hidden=32,
                             proportional_attention=proportional)
        nn.init.normal_(merger.scorer.net[-1].weight)
    budgets, n = [], merger_keep or 144
    for e in every:
        n -= 0 if e is None else len(range(0, n, e))
        budgets.append(n)
    return PrunedLlava(tiny, merger, nn.ModuleList(FixedPruner(e) for e in every), LAYERS, budgets).eval(), budgets


def test_no_merger_no_pruners_equals_stock_forward(tiny):
    batch = make_batch(tiny)
    assert (batch["attention_mask"] == 0).any(), "padding must be exercised"
    model = PrunedLlava(tiny)
    with torch.no_grad():
        expected = tiny.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                              attention_mask=batch["attention_mask"], use_cache=False).logits
        for mode in ("soft", "hard"):
            out = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], mode=mode)
            real = batch["attention_mask"].bool()
            torch.testing.assert_close(out.logits[real], expected[real], rtol=1e-5, atol=1e-5)
            assert out.vision_tokens_per_layer == [144] * 4


def test_hard_mode_really_shortens_the_sequence(tiny):
    batch = make_batch(tiny)
    model = learned(tiny).eval()
    with torch.no_grad():
        out = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], labels=batch["labels"],
                    mode="hard")
    T = batch["input_ids"].shape[1]
    assert out.vision_tokens_per_layer == [72, 50, 35, 20]
    assert out.seq_len_per_layer == [T - 144 + k for k in (72, 50, 35, 20)]
    assert out.logits.shape[:2] == out.labels.shape == (3, T - 124)
    # Text tokens are never pruned: every answer label survives.
    assert ((out.labels != IGNORE_INDEX).sum(1) == (batch["labels"] != IGNORE_INDEX).sum(1)).all()


@pytest.mark.parametrize("tau", [1.0, 0.1])
@pytest.mark.parametrize("merger_keep", [None, 96], ids=["no merger", "proportional merger"])
def test_soft_keep_zero_equals_hard_removal(tiny, tau, merger_keep):
    """Soft mode with m_j ~ 0 for exactly the tokens hard mode drops gives hard mode's logits on text tokens.

    Stage 1 drops every third vision token; the later stages keep all (in soft mode they see the dropped
    tokens too, so a rank-based choice there would differ between the modes). With a merger, its tokens carry
    their sizes (proportional attention) in both modes.
    """
    batch = make_batch(tiny)
    model, budgets = fixed(tiny, every=(3, None, None), merger_keep=merger_keep, proportional=True)
    entering = merger_keep or 144
    with torch.no_grad():
        hard = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], labels=batch["labels"],
                     mode="hard")
        soft = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], labels=batch["labels"],
                     mode="soft", tau=tau)
    if merger_keep is not None:
        assert hard.merge.sizes.max() > 1, "some merged token must stand for several"
    assert hard.vision_tokens_per_layer == [entering] + budgets
    assert soft.vision_tokens_per_layer == [entering] * 4
    assert soft.seq_len_per_layer[-1] == hard.seq_len_per_layer[0]
    # soft keeps, after the last stage, ~1 exactly for the tokens hard mode kept, ~0 for the rest
    final = soft.stage_keep_probs[-1]  # (B, 144)
    assert ((final > 0.5).sum(1) == budgets[-1]).all()
    assert ((final - final.round()).abs() < 1e-6).all()
    # compare the answer positions (text): the logits agree, with original positions kept in hard mode
    torch.testing.assert_close(hard.logits[hard.labels != IGNORE_INDEX], soft.logits[soft.labels != IGNORE_INDEX],
                               rtol=1e-4, atol=1e-4)


class PatchRulePruned(PrunedLlava):
    """Keep logits +-1e4 by a rule on each vision token's patch index: stage s drops patches p with
    p % MODULI[s] == s. The choice depends on the original patch only, so soft mode (which still carries
    the tokens earlier stages dropped) and hard mode make the same choices at every stage."""

    MODULI = (3, 4, 5)

    def forward(self, input_ids, *args, **kwargs):
        self.first_image = (input_ids == self.backbone.image_token_id).long().argmax(dim=1, keepdim=True)  # (B, 1)
        return super().forward(input_ids, *args, **kwargs)

    def _keep_logits(self, stage, layer, seq, cos_sin, previous_input, log_keep):
        patch = seq.index.gather(1, seq.vision_index) - self.first_image  # (B, n)
        return torch.where(patch % self.MODULI[stage] == stage, -1e4, 1e4)

    @classmethod
    def budgets(cls, n: int) -> list[int]:
        alive, budgets = list(range(n)), []
        for s, modulus in enumerate(cls.MODULI):
            alive = [p for p in alive if p % modulus != s]
            budgets.append(len(alive))
        return budgets


@pytest.mark.parametrize("tau", [1.0, 0.1])
@pytest.mark.parametrize("fold", [False, True], ids=["drop", "fold"])
def test_soft_equals_hard_in_the_limit_on_the_trained_backbone(shipped_backbone, tau, fold):
    """The shipped backbone's attention logits differ by 60-140 between tokens: a dropped token must get a bias
    that no such difference overcomes, or the student trained in soft mode is not the model hard mode runs. With
    ``fold`` the dropped tokens' weight goes to the kept ones (fold_weights), in both modes alike."""
    batch = make_batch(shipped_backbone, n=6)
    assert (batch["attention_mask"] == 0).any(), "padding must be exercised"
    layers = [2, 4, 6]
    budgets = PatchRulePruned.budgets(shipped_backbone.num_vision_tokens)
    model = PatchRulePruned(shipped_backbone, None, nn.ModuleList(nn.Identity() for _ in layers), layers, budgets,
                            fold_pruned=fold).eval()
    inputs = (batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    with torch.no_grad():
        hard = model(*inputs, labels=batch["labels"], mode="hard")
        soft = model(*inputs, labels=batch["labels"], mode="soft", tau=tau)
    assert hard.vision_tokens_per_layer == [144, 144, *[budgets[0]] * 2, *[budgets[1]] * 2, *[budgets[2]] * 2]
    answers = batch["labels"] != IGNORE_INDEX
    assert (hard.labels != IGNORE_INDEX).sum() == answers.sum()
    # the logits at the positions that predict the answer, and the answer's own
    predicting = answers.roll(-1, dims=1) | answers
    hard_predicting = (hard.labels != IGNORE_INDEX).roll(-1, dims=1) | (hard.labels != IGNORE_INDEX)
    torch.testing.assert_close(soft.logits[predicting], hard.logits[hard_predicting], rtol=0, atol=1e-4)


def test_soft_generation_shows_the_pruners_the_question_only(shipped_backbone):
    """Soft evaluation reruns the forward over prompt + answer so far; the answer must not count as question."""
    seen = []

    class Recording(nn.Module):
        def forward(self, vision, question, question_mask):
            seen.append(question_mask.sum(dim=1).tolist())
            return torch.full(vision.shape[:2], 4.0)

    model = PrunedLlava(shipped_backbone, None, nn.ModuleList([Recording()]), [2], [100]).eval()
    batch = make_batch(shipped_backbone, with_answers=False)
    answers, _ = generate_pruned(model, batch, "soft", 1.0, max_new_tokens=3)
    assert all(answers), "the trained backbone answers a word, then stops: at least two decoding steps"
    expected = question_token_mask(batch["input_ids"], batch["attention_mask"],
                                   shipped_backbone.image_token_id).sum(1).tolist()
    assert len(seen) >= 2 and all(counts == expected for counts in seen), (seen, expected)


def test_soft_at_low_temperature_agrees_with_hard_choices(tiny):
    batch = make_batch(tiny, with_answers=False)
    model = learned(tiny, merger_keep=None, budgets=(100,))
    model.eval()
    with torch.no_grad():
        out = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], mode="soft", tau=1e-3)
        logits = model.pruners[0](*_stage_inputs(model, batch))  # the logits the stage saw
    k = int((logits > 0).sum(1).min())
    soft_kept = out.stage_keep_probs[0] > 0.5
    assert torch.equal(soft_kept, logits > 0)
    hard_top = logits.topk(k, dim=1).indices
    assert soft_kept.gather(1, hard_top).all()  # hard mode's top-k are kept by soft mode at low temperature


def _stage_inputs(model, batch):
    """Hidden states entering layer 1 for a model whose single pruner sits there (no merger)."""
    seen = {}
    hook = model.backbone.layers[1].register_forward_pre_hook(lambda m, args, kw: seen.update(h=args[0]),
                                                              with_kwargs=True)
    try:
        PrunedLlava(model.backbone)(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    finally:
        hook.remove()
    h = seen["h"]
    is_image = model.backbone.image_token_mask(batch["input_ids"])
    vision = h[is_image].view(h.shape[0], 144, -1)
    q = question_token_mask(batch["input_ids"], batch["attention_mask"], model.backbone.image_token_id)
    return vision, h, q


def test_gradients_reach_merger_and_pruners_never_the_backbone(tiny):
    batch = make_batch(tiny)
    for merger_type, pruner_type in [("simple", "cross_attention"), ("question_aware", "mlp"), ("simple", "attention_aware")]:
        model = learned(tiny, merger_type=merger_type, pruner_type=pruner_type).train()
        # A high temperature: the std-0.5 random pruners give keep logits of -30 and below, whose sigmoid
        # has no gradient left at tau = 1 (that would test saturation, not the wiring).
        out = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], labels=batch["labels"],
                    mode="soft", tau=50.0)
        loss = nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), out.labels[:, 1:].flatten(),
                                           ignore_index=IGNORE_INDEX)
        loss.backward()
        trainable = [*model.merger.named_parameters(), *model.pruners.named_parameters()]
        missing = [name for name, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, (merger_type, pruner_type, missing)
        assert all(p.grad is None and not p.requires_grad for p in tiny.parameters())


def test_question_mask_excludes_image_padding_and_answer(tiny):
    batch = make_batch(tiny)
    tok = tiny.processor.tokenizer
    mask = question_token_mask(batch["input_ids"], batch["attention_mask"], tiny.image_token_id, batch["labels"])
    for row, m in zip(batch["input_ids"], mask):
        words = tok.decode(row[m]).split()
        assert words[-2:] == ["ASSISTANT", ":"] and "<image>" not in words and "</s>" not in words
        assert len(words) >= 5


def test_hard_generation_with_cache_matches_stock_and_recomputation(tiny):
    prompts = make_batch(tiny, with_answers=False)
    ids, pixels, mask = prompts["input_ids"], prompts["pixel_values"], prompts["attention_mask"]
    pad = tiny.processor.tokenizer.pad_token_id
    stock = tiny.model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=5,
                                do_sample=False, eos_token_id=-1, pad_token_id=pad)[:, ids.shape[1]:]
    tokens, _ = PrunedLlava(tiny).generate(ids, pixels, mask, max_new_tokens=5, eos_token_id=-1, pad_token_id=pad)
    assert torch.equal(tokens, stock)

    # With real pruning, cached decoding equals recomputing the pruned prefill over prompt + answer so far.
    for proportional in (False, True):
        model, budgets = fixed(tiny, merger_keep=96, proportional=proportional)
        tokens, prefill = model.generate(ids, pixels, mask, max_new_tokens=4, eos_token_id=-1, pad_token_id=pad)
        assert prefill.vision_tokens_per_layer == [96] + budgets
        grown_ids, grown_mask = ids, mask
        with torch.no_grad():
            for step in range(4):
                logits = model(grown_ids, pixels, grown_mask, mode="hard").logits[:, -1]
                assert torch.equal(logits.argmax(-1), tokens[:, step])
                grown_ids = torch.cat([grown_ids, tokens[:, step:step + 1]], dim=1)
                grown_mask = torch.cat([grown_mask, torch.ones_like(grown_mask[:, :1])], dim=1)


@pytest.mark.parametrize("proportional", [False, True])
def test_cached_decoding_logits_equal_recomputing_the_pruned_forward(tiny, proportional):
    """Each decoded step's logits from the KV cache (with each layer's log sizes under proportional attention)
    equal the last logits of the whole pruned forward over prompt + answer so far."""
    prompts = make_batch(tiny, with_answers=False)
    ids, pixels, mask = prompts["input_ids"], prompts["pixel_values"], prompts["attention_mask"]
    model, _ = fixed(tiny, merger_keep=96, proportional=proportional)
    pad = tiny.processor.tokenizer.pad_token_id
    with torch.no_grad():
        prefill, cache = model.prefill(ids, pixels, mask)
        tokens, scores = model.decode(prefill, cache, 3, eos_token_id=-1, pad_token_id=pad, return_scores=True)
        assert scores.shape[:2] == (ids.shape[0], 3)
        for step in range(3):
            grown = torch.cat([ids, tokens[:, :step + 1]], dim=1)
            grown_mask = torch.cat([mask, torch.ones_like(tokens[:, :step + 1])], dim=1)
            recomputed = model(grown, pixels, grown_mask, mode="hard").logits[:, -1]
            torch.testing.assert_close(scores[:, step], recomputed, rtol=1e-4, atol=1e-4)
            if proportional and step == 0:  # the sizes matter: the same model read as one token each differs
                model.merger.proportional_attention = False
                plain = model(grown, pixels, grown_mask, mode="hard").logits[:, -1]
                model.merger.proportional_attention = True
                assert (plain - recomputed).abs().max() > 1e-3


def test_adaptive_merger_batch_equals_each_image_alone(shipped_backbone):
    """Images keep different numbers of tokens; the batch pads the unused slots, which must change nothing."""
    bb = shipped_backbone
    torch.manual_seed(0)
    merger = TokenMerger(bb.vision_hidden_size, bb.hidden_size, 24, 24 / 144, hidden=16, budget="adaptive")
    nn.init.normal_(merger.scorer.net[-1].weight, std=1.0)
    pruners = nn.ModuleList(build_pruner("cross_attention", bb.hidden_size, 16, 2) for _ in range(2))
    for p in pruners.parameters():
        nn.init.normal_(p, std=0.3)
    model = PrunedLlava(bb, merger, pruners, [2, 5], [16, 10]).eval()
    batch = make_batch(bb, with_answers=False, n=4)
    inputs = (batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    tok = bb.processor.tokenizer
    with torch.no_grad():
        together = model(*inputs, mode="hard")
        merged = together.vision_counts[0]
        assert len(set(merged.tolist())) > 1, "the images must keep different numbers of tokens"
        tokens, _ = model.generate(*inputs, 3, tok.eos_token_id, tok.pad_token_id)
        soft = model(*inputs, mode="soft", tau=0.1)
        for b in range(4):
            one = [x[b:b + 1] for x in inputs]
            real = one[2].bool()[0]
            alone = model(one[0][:, real], one[1], one[2][:, real], mode="hard")
            assert [int(c[b]) for c in together.vision_counts] == [int(c[0]) for c in alone.vision_counts]
            torch.testing.assert_close(together.logits[b, -1], alone.logits[0, -1], rtol=1e-4, atol=1e-4)
            alone_tokens, _ = model.generate(one[0][:, real], one[1], one[2][:, real], 3, tok.eos_token_id,
                                             tok.pad_token_id)
            assert tokens[b, :alone_tokens.shape[1]].tolist() == alone_tokens[0].tolist()
    assert torch.isfinite(soft.logits).all()


class ReceivedAttentionRecorder(PatchRulePruned):
    """PatchRulePruned that records, at each stage, what an attention-aware pruner would read."""

    def forward(self, *args, **kwargs):
        self.seen = []  # per stage: ((B, n) sequence positions, (B, n) received attention)
        return super().forward(*args, **kwargs)

    def _keep_logits(self, stage, layer, seq, cos_sin, previous_input, log_keep):
        received = self._received_attention(layer, seq, cos_sin, previous_input, log_keep)
        self.seen.append((seq.index.gather(1, seq.vision_index), received))
        return super()._keep_logits(stage, layer, seq, cos_sin, previous_input, log_keep)


def test_attention_aware_pruners_read_the_previous_layers_attention(shipped_backbone):
    """What an attention-aware pruner reads at layer l is the attention the last question token pays each vision
    token in layer l - 1: equal to the eager model's before any pruning, and in soft mode (with earlier stages'
    decisions taken to the limit) equal to hard mode's on the tokens hard mode kept, ~0 on the ones it dropped."""
    bb = shipped_backbone
    batch = make_batch(bb, with_answers=False, n=4)
    inputs = (batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    layers = [2, 4, 6]
    model = ReceivedAttentionRecorder(bb, None, nn.ModuleList(nn.Identity() for _ in layers), layers,
                                      PatchRulePruned.budgets(bb.num_vision_tokens)).eval()
    with torch.no_grad():
        model(*inputs, mode="hard")
        hard = model.seen
        model(*inputs, mode="soft", tau=0.1)
        soft = model.seen
    bb.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = bb.model(input_ids=inputs[0], pixel_values=inputs[1], attention_mask=inputs[2],
                             output_attentions=True).attentions
    finally:
        bb.model.set_attn_implementation("sdpa")
    question = question_token_mask(inputs[0], inputs[2], bb.image_token_id)
    last = (question.long() * torch.arange(question.shape[1])).argmax(dim=1)  # (B,)
    image = bb.image_token_mask(inputs[0])
    for b in range(len(last)):
        expected = eager[layers[0] - 1][b, :, last[b]].mean(dim=0)[image[b]]  # (144,) before any pruning
        torch.testing.assert_close(hard[0][1][b], expected, rtol=1e-4, atol=1e-6)
    for (hard_positions, hard_received), (soft_positions, soft_received) in zip(hard[1:], soft[1:]):
        kept = (soft_positions[:, :, None] == hard_positions[:, None, :]).any(dim=-1)  # (B, 144) hard's tokens
        for b in range(len(last)):
            torch.testing.assert_close(soft_received[b][kept[b]], hard_received[b], rtol=1e-4, atol=1e-6)
            assert soft_received[b][~kept[b]].max() < 1e-6


def test_a_token_of_size_s_is_attended_as_s_copies(shipped_backbone):
    """Proportional attention: log s added to the logits towards a token equals that token present s times at its
    position, for every later query, through a real decoder layer (SDPA) of the trained backbone."""
    from models.pruned_llava import _Sequence
    from models.sequences import causal_padding_mask

    bb = shipped_backbone
    torch.manual_seed(0)
    T, j, s = 12, 4, 3
    hidden, positions = torch.randn(1, T, bb.hidden_size) * 3, torch.arange(T)[None]
    copies = torch.cat([torch.arange(j + 1), torch.full((s - 1,), j), torch.arange(j + 1, T)])
    with torch.no_grad():
        expected = bb.run_layer(0, hidden[:, copies], causal_padding_mask(torch.ones(1, T + s - 1), hidden.dtype),
                                positions[:, copies], bb.rotary(hidden, positions[:, copies]))
        log_size = torch.zeros(1, T).index_fill(1, torch.tensor([j]), torch.tensor(float(s)).log().item())
        seq = _Sequence(hidden, positions, positions, torch.ones(1, T, dtype=torch.long),
                        torch.zeros(1, T, dtype=torch.bool), torch.zeros(1, T, dtype=torch.bool), None, log_size)
        got = bb.run_layer(0, hidden, seq.layer_mask(), positions, bb.rotary(hidden, positions))
        plain = bb.run_layer(0, hidden, causal_padding_mask(torch.ones(1, T), hidden.dtype), positions,
                             bb.rotary(hidden, positions))
    torch.testing.assert_close(got[:, j + 1:], expected[:, j + s:], rtol=1e-5, atol=1e-5)
    assert (plain[:, j + 1:] - expected[:, j + s:]).abs().max() > 1e-3, "without the sizes the layer differs"


def test_folding_keeps_the_attention_weight_of_the_dropped_tokens(shipped_backbone):
    """Hard mode with folding: after every stage the kept vision tokens' sizes sum to the tokens that entered the
    LLM, each at least 1; a dropped token's weight goes to the kept token most like it; without folding nothing
    moves."""
    batch = make_batch(shipped_backbone, n=4)
    layers = [2, 4, 6]
    budgets = PatchRulePruned.budgets(shipped_backbone.num_vision_tokens)
    sizes = []
    model = PatchRulePruned(shipped_backbone, None, nn.ModuleList(nn.Identity() for _ in layers), layers, budgets,
                            fold_pruned=True).eval()
    original = model._fold_hard

    def recording(seq, stays):
        folded = original(seq, stays)
        sizes.append(folded.log_size.gather(1, seq.vision_index).exp() * (stays & seq.vision_alive))
        return folded

    model._fold_hard = recording
    with torch.no_grad():
        out = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], mode="hard")
    assert len(sizes) == 3
    for kept in sizes:
        torch.testing.assert_close(kept.sum(dim=1), torch.full((4,), 144.0), rtol=1e-5, atol=1e-3)
        assert (kept[kept > 0] >= 1 - 1e-5).all()
    assert out.layer_key_bias[-1] is not None and out.layer_key_bias[-1].max() > 0
