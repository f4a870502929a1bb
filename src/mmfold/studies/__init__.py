"""Studies over a model: Optuna sweeps and ablation tables."""
