"""Learned pruning against FastV, PyramidDrop, VisionZip, ToMe, CDPruner, DivPrune, VisPruner, DART, random and
pooling at equal token budgets.

    python scripts/benchmark.py --train-missing           # tiny default: train what is missing, then benchmark
    python scripts/benchmark.py                           # the same, once the learned checkpoints exist
    python scripts/benchmark.py --budgets 0.5 0.25 --methods learned fastv tome

A budget is the fraction of the N vision tokens left after the last stage (models/baselines
explains what that means for each method). For every budget and method, in one process and
through the same hard-pruned forward, cached greedy generation and answer scoring: accuracy on
the synthetic data's eval split (``--eval-size`` questions; the learned runs choose their checkpoint on their own
eval questions, the validation split, never on these) and the accuracy retained against the unpruned model, LLM
prefill FLOPs per sample (models/flops.py, all tokens, the selection modules' own cost included), the
measured prefill time (median of repeats on one batch), and the vision tokens entering the LLM
and each pruning stage, counted from the tensors. Writes results.csv, results.md and
accuracy_vs_flops.png to --out.

The learned method is compared at equal FLOPs: at budget K, for each method M of ``--match-flops``
(default ToMe, the cheapest strong baseline, and FastV), one run of ``main.py`` in
``<learned-root>/learned_<pct>_<M>`` (the checkpoint of its best evaluation: ``--checkpoint``) whose schedule
spends at most M's measured prefill FLOPs at K (trainers/inference/flops_match.py): each pruning stage keeps 3/4
of what enters it (``--stage-keep``; more pruning only where needed to end at K at most), and the merger keeps the
most tokens that fit (when it keeps all N and FLOPs are left, the stages keep more, up to the FLOPs).
The command that trains a missing run is printed; ``--train-missing`` runs it (about 2 minutes
per run on 2 CPU cores for the tiny default). ``--variant LABEL KEY=VALUE ...`` also trains and reports the
learned method with other settings, each at the same FLOPs, in ``learned_<pct>_<M>_<label>``.
The benchmark itself is trainers/inference/benchmark.py; this script parses the command line and calls it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from configs.schema import ConfigError  # noqa: E402
from data.build import build_datasets, validation_held_out  # noqa: E402
from models.backbones import load_backbone  # noqa: E402
from models.llava_backbone import BackboneNotFoundError  # noqa: E402
from trainers.inference.benchmark import (BUDGETS, METHODS, BenchmarkError, benchmark_batches,  # noqa: E402
                                          build_setups, check_request, fingerprint, header, learned_runs,
                                          load_trained, measure_rows, notes, train, train_searched)
from trainers.inference.benchmark_report import write_report  # noqa: E402
from trainers.inference.build import resolve_device  # noqa: E402
from trainers.inference.flops_match import STAGE_KEEP  # noqa: E402
from trainers.inference.timing import machine  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml", help="the run's config: backbone, eval data, pruning layers")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="dotted.key=value",
                        help="override a config key (also passed to main.py when training the learned method)")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS),
                        help="fractions of the vision tokens left after the last stage (default: "
                             f"{' '.join(f'{b:g}' for b in BUDGETS)})")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--match-flops", nargs="+", default=["tome", "fastv"], choices=[m for m in METHODS if m != "learned"],
                        metavar="METHOD", help="train one learned run per budget and METHOD, spending at most METHOD's "
                                               "prefill FLOPs at that budget (default: tome fastv)")
    parser.add_argument("--stage-keep", type=float, default=STAGE_KEEP, metavar="R",
                        help="share of the tokens entering it that each pruning stage of a learned row keeps "
                             f"(less only where needed to end at the budget; default {STAGE_KEEP})")
    parser.add_argument("--fastv-layer", type=int, default=2, help="FastV's and DART's K: prune before decoder layer K")
    parser.add_argument("--learned-root", type=Path, default=Path("outputs/benchmark"),
                        help="holds learned_<pct>_<method>/, one main.py run per budget and --match-flops method "
                             "(and learned_<pct>_<method>_<label>/ per --variant)")
    parser.add_argument("--variant", dest="variants", action="append", nargs="+", default=[], metavar="WORD",
                        help="LABEL dotted.key=value ...: also train and report the learned method with these settings "
                             "(repeatable), e.g. --variant 'no labels' method_settings.relevance_weight=0 "
                             "method_settings.merger_type=simple")
    parser.add_argument("--checkpoint", choices=["best", "final"], default="best",
                        help="which checkpoint of a learned run to report: best, that of its best evaluation on its "
                             "own eval questions (synthetic data: the validation split, apart from the benchmark's; "
                             "instruction data, whose runs evaluate on the benchmark's questions: final), or final")
    parser.add_argument("--train-missing", action="store_true", help="train (or finish) missing learned runs with main.py")
    parser.add_argument("--schedules-from", type=Path, metavar="ROOT",
                        help="report 'learned (searched)' with the schedules a search under ROOT found (its "
                             "searched_<pct>/best_schedule.yaml), trained on this run's data: no new search")
    parser.add_argument("--search", type=int, default=0, metavar="N",
                        help="also report the learned method with a schedule found by an N-trial Optuna search per "
                             "budget under ToMe's FLOPs (run when missing; 0: off)")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmark"))
    parser.add_argument("--eval-size", type=int, metavar="N",
                        help="synthetic data: draw N eval questions for the table (default: the config's "
                             "synthetic_eval_size; the learned runs' own evaluations keep the config's)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N eval questions")
    parser.add_argument("--timing-batch", type=int, default=8, help="batch size of the timed prefill")
    parser.add_argument("--repeats", type=int, default=20, help="timed prefills per setting (median)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="the random baseline's draw")
    parser.add_argument("--clip", metavar="FOLDER",
                        help="the saved CLIPModel whose text tower CDPruner reads (default: the backbone folder's clip/, "
                             "else the word embeddings; models/clip_relevance.py)")
    return parser.parse_args(argv)


def refused(err: BenchmarkError) -> int:
    print(f"error: the benchmark cannot run as asked:\n{err}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config, shape, kept, searched = check_request(args)
    except (ConfigError, BackboneNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BenchmarkError as err:
        return refused(err)

    settings = config.backbone_settings
    backbone = load_backbone(settings.name_or_path, settings.dtype, settings.attn_implementation,
                             resolve_device(settings.device))
    args.fingerprint = fingerprint(backbone, *build_datasets(config.data_settings))
    args.best = args.checkpoint == "best" and validation_held_out(config.data_settings)
    data = benchmark_batches(args, config, backbone)
    try:
        runs, to_train, targets = learned_runs(args, config, backbone, kept, data.flops)
    except BenchmarkError as err:
        return refused(err)
    if to_train:
        train(to_train, args, shape.num_vision_tokens)
    train_searched(searched, args, config, backbone, kept, targets, data.flops)
    try:
        learned, learned_searched = load_trained(runs, searched, args, backbone)
    except BenchmarkError as err:
        return refused(err)

    setups = build_setups(args, config, backbone, kept, learned, learned_searched)
    rows = measure_rows(setups, data, config.data_settings.max_new_tokens, args.repeats)
    title = f"{Path(settings.name_or_path).name}: accuracy against cost, {data.questions} questions, {machine()}"
    report = write_report(rows, args.out, shape.num_vision_tokens, header(args, config, data),
                          notes(args, learned, learned_searched, targets), title)
    print(f"\n{report}\nwrote {args.out}/results.md, results.csv, accuracy_vs_flops.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
