"""``pruned_llava``: lmms-eval's simple-model interface over trainers/inference/pruned_model.PrunedModel.

model_args (comma-separated, as lmms-eval passes them):
- ``pretrained``: the LLaVA backbone (a llava-hf folder or a model id in the local cache);
- ``pruner``: the trained modules (a folder written by save_pretrained, a run folder or a training state), or
- ``method`` and ``budget``: a training-free baseline by name (fastv, pyramiddrop, visionzip, tome, tome_pa,
  cdpruner, divpruner, vispruner, dart, pooling, random) keeping that fraction of the vision tokens; neither: the
  unpruned backbone through the same code;
- ``clip``: with ``method=cdpruner``, the folder of the saved CLIPModel whose text tower reads the instruction
  (default: the backbone folder's ``clip/``, else the word embeddings; models/clip_relevance.py);
- ``mode`` (hard | soft), ``device``, ``dtype``, ``batch_size``, ``max_new_tokens`` (when a task sets none).
"""

from __future__ import annotations

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from configs.schema import config_from_dict
from models.backbones import load_backbone
from models.baselines import BASELINES, build_baseline, kept_tokens
from models.pruned_llava import PrunedLlava
from trainers.inference.pruned_model import PrunedModel, load_pruned


def _load(pretrained: str | None, pruner: str | None, method: str | None, budget: float | None, device: str,
          dtype: str | None, clip: str | None = None) -> PrunedModel:
    if pruner is not None:
        if method is not None:
            raise ValueError("pass pruner=<trained modules> or method=<baseline>, not both")
        return load_pruned(pruner, backbone=pretrained, device=device, dtype=dtype)
    if pretrained is None:
        raise ValueError("pass pretrained=<llava backbone> (and pruner=<folder> or method=<baseline>,budget=<fraction>)")
    config = config_from_dict({"backbone_settings": {"name_or_path": pretrained}})
    backbone = load_backbone(pretrained, dtype or "float32", "sdpa", device)
    if method is None:
        return PrunedModel(PrunedLlava(backbone), config)
    if method not in BASELINES:
        raise ValueError(f"method={method!r} is not a training-free baseline; choose one of {list(BASELINES)}")
    if budget is None or not 0 < budget <= 1:
        raise ValueError(f"method={method} needs budget=<fraction of vision tokens kept, in (0, 1]>, got {budget}")
    layers = list(config.method_settings.pruning_layers)
    if max(layers) >= backbone.num_layers:  # the seed's [10, 20, 31] on a shallower backbone: 1/4, 1/2, 3/4
        layers = [backbone.num_layers * i // 4 for i in (1, 2, 3)]
    model = build_baseline(method, backbone, kept_tokens(backbone.num_vision_tokens, budget), layers,
                           fastv_layer=min(2, backbone.num_layers - 1), clip=clip)
    return PrunedModel(model, config)


class PrunedLlavaEval(lmms):
    is_simple = True

    def __init__(self, pretrained: str | None = None, pruner: str | None = None, method: str | None = None,
                 budget: float | None = None, mode: str = "hard", device: str = "cpu", dtype: str | None = None,
                 batch_size: int = 1, max_new_tokens: int = 16, clip: str | None = None, **kwargs) -> None:
        super().__init__()
        if mode not in ("hard", "soft"):
            raise ValueError(f"mode must be hard or soft, got {mode!r}")
        if clip is not None and method != "cdpruner":
            raise ValueError(f"clip= is read by method=cdpruner only, not {method!r}")
        self.pruned = _load(pretrained, pruner, method, None if budget is None else float(budget), device, dtype, clip)
        self.mode, self.device = mode, device
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, ``batch_size`` requests at a time, cut at the task's ``until`` strings."""
        answers = []
        for start in tqdm(range(0, len(requests), self.batch_size), desc="pruned_llava", disable=self.rank != 0):
            chunk = [r.args for r in requests[start:start + self.batch_size]]
            questions, images = [], []
            for context, gen_kwargs, doc_to_visual, doc_id, task, split in chunk:
                visuals = doc_to_visual(self.task_dict[task][split][doc_id])
                if len(visuals) != 1:
                    raise ValueError(f"{task} doc {doc_id} has {len(visuals)} images; this model takes one per question")
                questions.append(context.replace("<image>", "").strip())
                images.append(visuals[0].convert("RGB"))
            gen_kwargs = chunk[0][1]
            max_new = int(gen_kwargs.get("max_new_tokens", self.max_new_tokens))
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            for text in self.pruned.answer(images, questions, max_new, self.mode):
                for stop in until:
                    text = text.split(stop)[0]
                answers.append(text.strip())
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError("pruned_llava generates answers; use generate_until tasks")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("pruned_llava answers single-turn questions")
