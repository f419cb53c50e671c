"""The Optuna search: a manager starts workers on GPU subsets; they pull trials from one study (study.py)."""
