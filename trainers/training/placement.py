"""One subtask on several GPUs: the frozen decoder layers spread over them, each pruner beside its layer.

Naive model parallelism (layers run one after another, no pipelining), for backbones too big
for one GPU. The decoder layers are split into contiguous blocks, one block per GPU, balanced
by parameter count; the first GPU also holds everything else of the backbone (vision tower,
projector, embeddings, final norm, LM head), which it counts as load. That first GPU is the
run's home: batches, masks, positions and keep probabilities stay there. Each moved layer gets
an accelerate hook that brings its inputs to its GPU and its output back home, so the pruned
forward runs unchanged and only hidden states travel. The pruner that acts before layer L sits
on layer L's GPU behind the same kind of hook; the token merger and the discriminator serve
the vision tower and the final norm, so they stay home.
"""

from __future__ import annotations

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from torch import nn

from models.llava_backbone import LlavaBackbone
from models.pruned_llava import PrunedLlava

# The cache object holds each layer's keys and values on that layer's GPU: hooks must not move it.
CACHE_KEYS = ["past_key_values", "cache"]


def split_layers(layer_sizes: list[int], num_devices: int, home_extra: int = 0) -> list[int]:
    """Device index of each decoder layer: contiguous blocks that minimise the largest load.

    Device 0 carries ``home_extra`` on top of its layers. Exact, by dynamic programming over
    (devices, layers); every device gets at least one layer.
    """
    n = len(layer_sizes)
    if not 1 <= num_devices <= n:
        raise ValueError(f"cannot spread {n} decoder layers over {num_devices} GPUs; use 1 to {n} GPUs per subtask")
    prefix = [0]
    for size in layer_sizes:
        prefix.append(prefix[-1] + size)
    load = lambda d, i, j: prefix[j] - prefix[i] + (home_extra if d == 0 else 0)  # layers i..j-1 on device d
    inf = float("inf")
    # best[d][j]: smallest largest load with layers 0..j-1 on devices 0..d; cut[d][j]: where device d's block starts
    best = [[inf] * (n + 1) for _ in range(num_devices)]
    cut = [[0] * (n + 1) for _ in range(num_devices)]
    for j in range(1, n + 1):
        best[0][j] = load(0, 0, j)
    for d in range(1, num_devices):
        for j in range(d + 1, n + 1):
            for i in range(d, j):
                value = max(best[d - 1][i], load(d, i, j))
                if value < best[d][j]:
                    best[d][j], cut[d][j] = value, i
    devices, j = [0] * n, n
    for d in range(num_devices - 1, 0, -1):
        i = cut[d][j]
        devices[i:j] = [d] * (j - i)
        j = i
    return devices


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layer_device_map(backbone: LlavaBackbone, devices: list[torch.device]) -> list[torch.device]:
    """The device of each decoder layer when the backbone is spread over ``devices`` (``devices[0]`` is home)."""
    sizes = [parameter_count(layer) for layer in backbone.layers]
    home_extra = parameter_count(backbone) - sum(sizes)
    return [devices[d] for d in split_layers(sizes, len(devices), home_extra)]


def place_beside(module: nn.Module, device: torch.device) -> None:
    """Move ``module`` to ``device`` behind a hook that moves its inputs there and its outputs back."""
    module.to(device)
    add_hook_to_module(module, AlignDevicesHook(execution_device=device, io_same_device=True, skip_keys=CACHE_KEYS))


def spread_backbone(backbone: LlavaBackbone, devices: list[torch.device]) -> list[torch.device]:
    """Put the backbone home (``devices[0]``) and its decoder layers over ``devices``; returns each layer's device."""
    layer_devices = layer_device_map(backbone, devices)
    backbone.to(devices[0])
    for layer, device in zip(backbone.layers, layer_devices):
        place_beside(layer, device)
    return layer_devices


def place_pruners(model: PrunedLlava, layer_devices: list[torch.device]) -> None:
    """Each pruner on the device of the layer it acts before."""
    for layer, stage in model.stage_of_layer.items():
        place_beside(model.pruners[stage], layer_devices[layer])
