"""The lmms-eval integration, run for real and offline through lmms-eval's own command line.

lmms-eval lives in its own venv (.venv-lmms, built by scripts/setup_lmms_eval.sh; .ci/run builds it). A
local task over synthetic questions (lmms_plugin/synthetic_task.py) must score exactly what the project's
evaluator gives the same model on the same questions: the harness sees the same pruned model.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from lmms_plugin.synthetic_task import TASK, write_task
from tests.helpers import SHIPPED_BACKBONE

ROOT = Path(__file__).resolve().parents[1]
LMMS_EVAL = ROOT / ".venv-lmms" / "bin" / "lmms-eval"
SIZE, SEED = 24, 3

pytestmark = pytest.mark.skipif(
    not LMMS_EVAL.exists(), reason="lmms-eval is not installed: bash scripts/setup_lmms_eval.sh (CI runs it)")


def lmms_eval_score(tmp_path, model_args: str) -> float:
    task = write_task(tmp_path / "task", SIZE, SEED)
    out = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    run = subprocess.run([str(LMMS_EVAL), "--model", "pruned_llava", "--model_args", model_args, "--tasks", TASK,
                          "--include_path", str(task), "--batch_size", "1", "--output_path", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"|{TASK}|" in run.stdout.replace(" ", "")  # lmms-eval's own results table
    [results] = out.rglob("*_results.json")
    return json.loads(results.read_text())["results"][TASK]["exact_match,none"]


# The project's evaluator on the same questions, run by the same interpreter as lmms-eval: torch builds differ in
# the last float bits (5e-6 at the logits between this venv's CPU torch and lmms-eval's), which a discrete choice such
# as ToMe's matching can turn into another answer.
OUR_ACCURACY = """
import sys
from data.build import batches
from data.collator import VQACollator
from data.synthetic_vqa import SyntheticVQADataset
from models.backbones import load_backbone
from models.baselines import build_baseline, kept_tokens
from models.llava_backbone import LlavaBackbone
from trainers.inference.evaluation import evaluate_pruned
from trainers.inference.pruned_model import load_pruned

what, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if what == "tome":
    backbone = load_backbone("backbones/tiny-llava")
    model = build_baseline("tome", backbone, kept_tokens(backbone.num_vision_tokens, 0.25), [2, 4, 6])
else:
    model = load_pruned(what).model
data = SyntheticVQADataset(size, "eval", seed)
prompts = VQACollator(model.backbone.processor, with_answers=False)
print(evaluate_pruned(model, batches(data, prompts, 8), 0.1, 4, show_progress=False, soft=False)["accuracy_hard"])
"""


def our_accuracy(what: str) -> float:
    run = subprocess.run([str(LMMS_EVAL.parent / "python"), "-c", OUR_ACCURACY, what, str(SIZE), str(SEED)], cwd=ROOT,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return float(run.stdout.strip().splitlines()[-1])


def test_lmms_eval_scores_a_training_free_baseline_as_the_project_does(tmp_path):
    expected = our_accuracy("tome")
    assert lmms_eval_score(tmp_path, f"pretrained={ROOT / SHIPPED_BACKBONE},method=tome,budget=0.25") == \
        pytest.approx(expected)
    assert 0.5 < expected <= 1  # the shipped backbone answers most of them (all, in some venvs): not empty answers


def test_lmms_eval_runs_trained_pruners(tmp_path, finished_tiny_run):
    saved = finished_tiny_run / "pruned_final"
    expected = our_accuracy(str(saved))
    assert lmms_eval_score(tmp_path, f"pruner={saved}") == pytest.approx(expected)
