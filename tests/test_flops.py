import pytest

from models.flops import (
    PrefillFlops,
    compare_prefill,
    cross_attention_pruner_flops,
    decoder_layer_flops,
    llm_prefill_flops,
    projector_flops,
    token_merger_flops,
    vision_tower_flops,
)


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


def test_vision_tower_flops_by_hand():
    # n=3, d=2, m=5 per layer: 4*3*4 + 2*9*2 + 2*3*2*5 = 48 + 36 + 60 = 144; two layers
    assert vision_tower_flops(3, 2, 5, num_layers=2) == 288


def test_projector_flops_by_hand():
    # n=3, d_vision=2, d=4: 3 * (8 + 16)
    assert projector_flops(3, 2, 4) == 72


def test_token_merger_flops_by_hand():
    # n=4, k=2, d_vision=3, d_hidden=5: scorer 4 * (15 + 5) = 80; assignment 2*4*2*3 = 48
    assert token_merger_flops(4, 2, 3, 5) == 128


def test_cross_attention_pruner_flops_by_hand():
    # n_vision=4, n_text=3, d=2, d_internal=5: q 4*2*5 = 40; k, v 2*3*2*5 = 60;
    # scores and sum 2*4*3*5 = 120; output 4*5 = 20
    assert cross_attention_pruner_flops(4, 3, 2, 5) == 240
