"""Contracts between stages: the prediction files, freshness fingerprints, Optuna study storage."""
