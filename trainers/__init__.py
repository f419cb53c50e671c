"""Everything that runs the models: three subpackages by who uses them.

- ``trainers.training``: the training loop, its losses, schedules, data parallelism, logs and the checks before a
  run (main.py's train and eval modes);
- ``trainers.search``: the Optuna search over GPU subsets (main.py's optuna mode), which runs training subtasks;
- ``trainers.inference``: the pruned model you save, share, load and run, generation, evaluation and FLOPs
  accounting, pictures and timing. It imports nothing from the other two, so lmms-eval, ``scripts/predict.py`` and
  the benchmark load no training code.

``checkpoint.py`` (the files a run writes) and ``run_log.py`` (its log) are shared by all three.
"""
