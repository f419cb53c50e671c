import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.flops import (PrefillFlops, compare_prefill, decoder_layer_flops, llm_prefill_flops, projector_flops,
                          vision_tower_flops)
from models.layer_pruner import build_pruner
from models.token_merger import TokenMerger


def test_decoder_layer_flops_by_hand():
    # n=10, d=4, m=6: 4*10*16 + 2*100*4 + 3*10*4*6 = 640 + 800 + 720
    assert decoder_layer_flops(10, 4, 6) == 2160
    # n=5: 4*5*16 + 2*25*4 + 3*5*4*6 = 320 + 200 + 360
    assert decoder_layer_flops(5, 4, 6) == 880
    assert decoder_layer_flops(0, 4, 6) == 0


def test_llm_prefill_flops_sums_layers():
    assert llm_prefill_flops([10, 10, 5], d=4, m=6) == 2160 + 2160 + 880
    assert llm_prefill_flops([], d=4, m=6) == 0


@pytest.mark.parametrize("tokens", [[10, -1, 5], [10, 2.5]])
def test_llm_prefill_flops_rejects_bad_counts(tokens):
    with pytest.raises(ValueError, match=r"tokens_per_layer\[1\] must be a non-negative integer"):
        llm_prefill_flops(tokens, d=4, m=6)


def test_compare_prefill_reduction():
    # baseline 3 * 2160 = 6480; pruned 2160 + 880 + 0 + 200 extra = 3240, half the baseline
    result = compare_prefill([10, 10, 10], [10, 5, 0], d=4, m=6, extra_pruned=200)
    assert result == PrefillFlops(baseline=6480, pruned=3240)
    assert result.reduction == pytest.approx(0.5)
    assert compare_prefill([10, 10, 10], [10, 5, 0], d=4, m=6).reduction == pytest.approx(1 - 3040 / 6480)
    assert PrefillFlops(baseline=0, pruned=0).reduction == 0.0


def test_compare_prefill_rejects_layer_mismatch():
    with pytest.raises(ValueError, match="got 3 and 2 layers"):
        compare_prefill([10, 10, 10], [10, 5], d=4, m=6)


def test_compare_prefill_rejects_negative_extra():
    with pytest.raises(ValueError, match="extra_pruned must be a non-negative integer, got -1"):
        compare_prefill([10], [5], d=4, m=6, extra_pruned=-1)


def math_attention(q, k, v, attn_mask=None):
    """scaled_dot_product_attention as explicit matmuls: FlopCounterMode does not count the CPU SDPA kernel."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def multiply_adds(fn) -> int:
    """What torch's FlopCounterMode counts for fn() on a batch of one, in multiply-adds (it counts 2 FLOPs each)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


@pytest.fixture(autouse=True)
def countable_attention(monkeypatch):
    monkeypatch.setattr("models.cross_attention.F.scaled_dot_product_attention", math_attention)


def test_decoder_layer_formula_matches_the_flop_counter_on_a_llama_layer():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                         attn_implementation="eager")
    layer, rotary = LlamaDecoderLayer(config, 0).eval(), LlamaRotaryEmbedding(config)
    n = 37
    x, positions = torch.randn(1, n, 64), torch.arange(n)[None]
    mask = torch.full((1, 1, n, n), float("-inf")).triu(1)
    counted = multiply_adds(lambda: layer(x, attention_mask=mask, position_ids=positions,
                                         position_embeddings=rotary(x, positions)))
    assert counted == decoder_layer_flops(n, 64, 96)


@pytest.mark.parametrize("n_vision, n_text", [(30, 7), (1, 1)])
def test_pruner_formulas_match_the_flop_counter_on_the_modules(n_vision, n_text):
    D, d = 48, 32
    vision, question, mask = torch.randn(1, n_vision, D), torch.randn(1, n_text, D), torch.ones(1, n_text, dtype=torch.bool)
    received = torch.rand(1, n_vision)  # what an attention-aware pruner reads besides
    for kind in ("cross_attention", "mlp", "attention_aware"):
        pruner = build_pruner(kind, D, d, 4).eval()
        extra = (received,) if kind == "attention_aware" else ()
        assert multiply_adds(lambda: pruner(vision, question, mask, *extra)) == pruner.flops(n_vision, n_text), kind


@pytest.mark.parametrize("kind", ["simple", "question_aware"])
def test_token_merger_formula_matches_the_flop_counter_on_the_module(kind):
    n, k, dv, dt, h = 40, 12, 24, 20, 16
    merger = TokenMerger(dv, dt, k, k / n, kind, hidden=h, num_heads=4).eval()
    features, question, mask = torch.randn(1, n, dv), torch.randn(1, 9, dt), torch.ones(1, 9, dtype=torch.bool)
    counted = multiply_adds(lambda: merger(features, 0.5, question=question, question_mask=mask))
    assert counted == merger.flops(n, k, 9)


def test_vision_tower_and_projector_formulas_by_hand():
    # n=3, d=2, m=5, 2 layers: 2 * (4*3*4 + 2*9*2 + 2*3*2*5) = 2 * (48 + 36 + 60)
    assert vision_tower_flops(3, 2, 5, num_layers=2) == 288
    assert projector_flops(3, 2, 4) == 3 * (2 * 4 + 4 * 4)
    with pytest.raises(ValueError, match="num_layers must be a non-negative integer"):
        vision_tower_flops(3, 2, 5, num_layers=-1)


def test_encoder_flops_match_the_flop_counter_on_the_backbones_vision_tower_and_projector():
    """The whole vision side of the tiny LLaVA (CLIP with its CLS token, every layer, then the projector), eager
    attention so that FlopCounterMode sees the matmuls; the patch convolution is the only term left out."""
    from models.llava_backbone import LlavaBackbone
    from tests.helpers import llava_like

    model, _ = llava_like(96, 8, text_layers=1)
    model.set_attn_implementation("eager")
    backbone = LlavaBackbone(model)
    vision = model.config.vision_config
    pixels = torch.randn(1, 3, 96, 96)
    conv = (96 // 8) ** 2 * vision.hidden_size * 3 * 8 * 8  # the patch embedding's multiply-adds
    counted_tower = multiply_adds(lambda: backbone.vision_features(pixels)) - conv
    features = torch.randn(1, 37, vision.hidden_size)
    counted_projector = multiply_adds(lambda: backbone.project(features))
    assert counted_tower + counted_projector == backbone.encoder_flops(37)
    assert counted_projector == projector_flops(37, vision.hidden_size, backbone.hidden_size)


@pytest.mark.parametrize("n", [7, 40])
def test_fold_formula_matches_the_flop_counter(n):
    from models.flops import fold_flops
    from models.pruned_llava import fold_weights

    d = 24
    stays = torch.arange(n) % 3 != 0
    zero, never = torch.zeros(1, n), torch.full((1, n), -1e9)
    stay = torch.where(stays, zero, never)
    leave = torch.where(stays, never, zero)
    assert multiply_adds(lambda: fold_weights(torch.randn(1, n, d), zero, stay, leave, stay,
                                              torch.ones(1, n, dtype=torch.bool))) == fold_flops(n, d)
