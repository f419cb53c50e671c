"""Training-free baselines, run through the same pruned forward as the learned method.

Each baseline is a small parameter-free module that takes the place of a learned one in
PrunedLlava (models/pruned_llava.py), so the hard-mode forward, the KV-cached generation, the
token counts and the FLOPs are shared rather than copied (models/baselines/base.py):

=============  ===========================  ====================================================
name           where it acts                paper
=============  ===========================  ====================================================
random         before the projector         (the floor; FastV's and PyramidDrop's ablation)
pooling        before the projector         uniform spatial average pooling
visionzip      before the projector         VisionZip, Yang et al. 2024
tome           before the projector         ToMe, Bolya et al. 2023 (the LLM sees each merged token as one)
tome_pa        before the projector         the same, with ToMe's proportional attention in the LLM
fastv          before decoder layer K       FastV, Chen et al. 2024
pyramiddrop    at every pruning layer       PyramidDrop, Xing et al. 2024
cdpruner       before the projector         CDPruner, Zhang et al. 2025 (a DPP conditioned on the instruction)
divpruner      before the projector         DivPrune, Alvar et al. 2025 (max-min diversity)
vispruner      before the projector         VisPruner, Zhang et al. 2025 (CLS-important and diverse tokens)
dart           before decoder layer K       DART, Wen et al. 2025 (drops the duplicates of pivot tokens)
=============  ===========================  ====================================================

A budget is the number K of vision tokens left after the last stage: the tokens entering the
LLM for the methods that act before the projector, the tokens after layer K for FastV and DART,
the tokens of the last stage for PyramidDrop. Methods that prune later spend more FLOPs at the same
K, which is why the benchmark reports FLOPs and time beside accuracy.
"""

from __future__ import annotations

import functools

from torch import nn

from models.baselines.cdpruner import CDPruner
from models.baselines.dart import DART
from models.baselines.divprune import DivPrune
from models.baselines.fastv import FastV
from models.baselines.pyramid_drop import PyramidDrop, pyramid_budgets
from models.baselines.random_pruning import RandomPruning
from models.baselines.spatial_pooling import SpatialPooling, pooling_grid
from models.baselines.subset import linear_cost_per_token
from models.baselines.tome import ToMe
from models.baselines.visionzip import VisionZip
from models.baselines.vispruner import VisPruner
from models.clip_relevance import ClipTextRelevance, clip_folder_of, load_clip_relevance
from models.llava_backbone import LlavaBackbone
from models.pruned_llava import PrunedLlava

BASELINES = ("random", "pooling", "fastv", "pyramiddrop", "visionzip", "tome", "tome_pa", "cdpruner", "divpruner",
             "vispruner", "dart")


def kept_tokens(num_tokens: int, budget: float) -> int:
    """K = round(budget x N) vision tokens, checked to be a usable count."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget {budget:g} is not a fraction of the vision tokens in (0, 1]; e.g. 0.25 keeps a quarter")
    k = round(budget * num_tokens)
    if k < 1:
        raise ValueError(f"budget {budget:g} keeps {k} of {num_tokens} vision tokens; the smallest budget that keeps "
                         f"one is {1 / num_tokens:.4f}")
    return k


def check_baseline(name: str, num_tokens: int, num_layers: int, num_keep: int, pruning_layers: list[int],
                   fastv_layer: int = 2) -> None:
    """Raise a ValueError naming the problem and the fix when ``name`` cannot keep ``num_keep`` tokens here."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    if not 1 <= num_keep <= num_tokens:
        raise ValueError(f"{name} cannot keep {num_keep} of {num_tokens} vision tokens; choose 1..{num_tokens}")
    if name == "pooling":
        pooling_grid(num_tokens, num_keep)
    if name == "fastv" and not 1 <= fastv_layer < num_layers:
        raise ValueError(f"FastV's layer K={fastv_layer} is outside 1..{num_layers - 1} (it ranks by layer K-1's "
                         f"attention and prunes before layer K of {num_layers}); choose K in that range")
    if name == "dart" and not 1 <= fastv_layer < num_layers:
        raise ValueError(f"DART's layer K={fastv_layer} (FastV's K) is outside 1..{num_layers - 1} (it prunes before "
                         f"layer K of {num_layers}, on what layers 0..K-1 made of the tokens); choose K in that range")
    if name == "pyramiddrop" and not pruning_layers:
        raise ValueError("PyramidDrop needs at least one pruning layer (method_settings.pruning_layers)")


def text_relevance(backbone: LlavaBackbone, clip: str | None) -> ClipTextRelevance | None:
    """The CLIP text tower CDPruner reads on ``backbone``: the one in ``clip``, or beside the backbone, or None."""
    folder = clip if clip is not None else clip_folder_of(backbone.model.name_or_path)
    if folder is None:
        return None
    return _loaded_clip(str(folder), backbone.processor.tokenizer, backbone.vision_hidden_size, str(backbone.device))


@functools.lru_cache(maxsize=1)
def _loaded_clip(folder: str, tokenizer, vision_width: int, device: str) -> ClipTextRelevance:
    """One load of a CLIP for a backbone, however many CDPruners use it (the benchmark builds one per budget; a
    llava-1.5 CLIP is 1.7 GB). The module is read-only: the CDPruners share it."""
    return load_clip_relevance(folder, tokenizer, vision_width).to(device)


def build_baseline(name: str, backbone: LlavaBackbone, num_keep: int, pruning_layers: list[int],
                   fastv_layer: int = 2, seed: int = 0, clip: str | None = None) -> PrunedLlava:
    """The baseline ``name`` keeping ``num_keep`` vision tokens, on ``backbone``, in eval mode.

    ``pruning_layers`` are PyramidDrop's stage starts; ``fastv_layer`` is FastV's and DART's K; ``seed`` the random
    draw's; ``clip`` the folder of the CLIP whose text tower CDPruner reads (default: the ``clip/`` saved beside the
    backbone, if there is one; else CDPruner reads the word embeddings).
    """
    n = backbone.num_vision_tokens
    check_baseline(name, n, backbone.num_layers, num_keep, pruning_layers, fastv_layer)
    layers = list(pruning_layers)
    projected = lambda: (backbone.project, linear_cost_per_token(backbone.projector), backbone.hidden_size)
    pre_projector = {"random": lambda: RandomPruning(num_keep, seed, reference_tokens=n),
                     "pooling": lambda: SpatialPooling(n, num_keep),
                     "visionzip": lambda: VisionZip(num_keep, backbone.vision_hidden_size),
                     "tome": lambda: ToMe(num_keep, backbone.vision_hidden_size, reference_tokens=n),
                     "tome_pa": lambda: ToMe(num_keep, backbone.vision_hidden_size, reference_tokens=n,
                                             proportional_attention=True),
                     "cdpruner": lambda: CDPruner(num_keep, *projected(), reference_tokens=n,
                                                  text_relevance=text_relevance(backbone, clip)),
                     "divpruner": lambda: DivPrune(num_keep, *projected(), reference_tokens=n),
                     "vispruner": lambda: VisPruner(num_keep, backbone.vision_hidden_size, reference_tokens=n)}
    at_layer_k = {"fastv": FastV, "dart": lambda: DART(num_keep, n, backbone.hidden_size)}
    if name in pre_projector:
        model = PrunedLlava(backbone, pre_projector[name]())
    elif name in at_layer_k:
        model = PrunedLlava(backbone, None, nn.ModuleList([at_layer_k[name]()]), [fastv_layer], [num_keep])
    else:
        model = PrunedLlava(backbone, None, nn.ModuleList(PyramidDrop() for _ in layers), layers,
                            pyramid_budgets(n, num_keep, len(layers)))
    return model.to(backbone.device).eval()
