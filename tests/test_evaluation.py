"""trainers/inference/evaluation.py: what the per-batch results add up to."""

from trainers.inference.evaluation import vision_tokens_per_layer


def test_vision_tokens_per_layer_is_the_mean_over_samples_not_over_batches():
    # a batch of 3 images kept 10 then 5 tokens, a batch of 1 image kept 6 then 1
    results = [{"n": 3, "per_layer": [10.0, 5.0]}, {"n": 1, "per_layer": [6.0, 1.0]}]
    assert vision_tokens_per_layer(results) == [9.0, 4.0]
