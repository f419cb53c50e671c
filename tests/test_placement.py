"""Spreading one subtask's backbone over several GPUs: the layer split, and hooks that leave the forward unchanged.

The CPU has one device, so the hooked forward is checked with every "GPU" being the CPU: the
hooks, call signatures and the KV cache's path through them are exercised; moving tensors
between real GPUs is not.
"""

import itertools

import pytest
import torch
from accelerate.hooks import AlignDevicesHook

from data.collator import VQACollator
from data.synthetic_vqa import SyntheticVQADataset
from models.backbones import load_backbone
from tests.helpers import tiny_run_config
from trainers.inference.build import build_pruned_model
from trainers.training.placement import place_pruners, split_layers, spread_backbone


def largest_load(devices, sizes, home_extra):
    loads = [home_extra if d == 0 else 0 for d in range(max(devices) + 1)]
    for d, size in zip(devices, sizes):
        loads[d] += size
    return max(loads)


def test_layers_split_into_contiguous_balanced_blocks():
    assert split_layers([1] * 8, 2) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert split_layers([1] * 8, 2, home_extra=2) == [0, 0, 0, 1, 1, 1, 1, 1]  # home also holds the rest
    sizes, extra = [5, 1, 1, 4, 2, 2, 3], 2
    devices = split_layers(sizes, 3, home_extra=extra)
    assert devices == sorted(devices) and set(devices) == {0, 1, 2}
    best = min(largest_load([d for d, n in enumerate(counts) for _ in range(n)], sizes, extra)
               for counts in itertools.product(range(1, 6), repeat=3) if sum(counts) == len(sizes))
    assert largest_load(devices, sizes, extra) == best  # as good as every contiguous split
    # llava-1.5-7b in parameter counts (millions): 32 layers of 202, 700 elsewhere (CLIP, embeddings, LM head)
    devices = split_layers([202] * 32, 4, home_extra=700)
    assert [devices.count(d) for d in range(4)] == [5, 9, 9, 9]
    with pytest.raises(ValueError, match="cannot spread 4 decoder layers over 5 GPUs"):
        split_layers([1] * 4, 5)


def test_spread_backbone_keeps_the_pruned_forward(tmp_path, tiny_folder):
    backbone = load_backbone(str(tiny_folder))
    torch.manual_seed(0)
    model = build_pruned_model(tiny_run_config(tmp_path, tiny_folder).method_settings, backbone).eval()
    data = SyntheticVQADataset(3, "eval", seed=2)
    batch = VQACollator(backbone.processor, with_answers=False)([data[i] for i in range(3)])
    args = (batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    soft = model(*args, mode="soft", tau=0.5).logits
    tokens, _ = model.generate(*args, 3, eos_token_id=-1, pad_token_id=0)

    cpu = torch.device("cpu")
    layer_devices = spread_backbone(backbone, [cpu, cpu, cpu])
    place_pruners(model, layer_devices)
    assert len(layer_devices) == backbone.num_layers
    hooked = [backbone.layers[i] for i in range(backbone.num_layers)] + list(model.pruners)
    assert all(isinstance(getattr(m, "_hf_hook", None), AlignDevicesHook) and m._hf_hook.io_same_device for m in hooked)
    assert torch.allclose(model(*args, mode="soft", tau=0.5).logits, soft, atol=1e-6)
    assert torch.equal(model.generate(*args, 3, eos_token_id=-1, pad_token_id=0)[0], tokens)  # through the KV cache
